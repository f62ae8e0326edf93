"""Property-based fuzzing of a real server: whatever a client sends to /chat, KServe's v1 and v2 routes, the OpenAI
routes or the tokenizer routes, the answer is never a 5xx and the server keeps serving.

Payloads are generated with hypothesis: any JSON value; /chat-shaped objects whose known fields (and every
generate option the schema knows, plus those that load code) hold values of random types and ranges, with random
unknown keys mixed in; valid payloads with a few bytes changed; random bytes. The server caps new tokens at 16,
so a payload that happens to be valid is still cheap to serve.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from predictor.api.chat.schema import CODE_LOADING_OPTIONS, GenerateKwargs

MAX_NEW_TOKENS = 16
NORMAL = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 2}}
BYSTANDER = {"prompt": "An innocent request", "generate_kwargs": {"max_new_tokens": MAX_NEW_TOKENS,
                                                                   "min_new_tokens": MAX_NEW_TOKENS}}


@pytest.fixture(scope="module")
def fuzz_server(start_server, tiny_dir):
    server = start_server(tiny_dir, "--max_new_tokens", str(MAX_NEW_TOKENS), "--request_timeout", "10")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=120) as http:
        yield http


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 40)
                | st.floats(allow_nan=False, allow_infinity=False) | st.floats(0, 2) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
token_ids = st.integers(-2, 1030)  # around the tiny vocabulary's bounds (1024)
option_values = (json_scalars | st.integers(0, 20) | st.sampled_from([0, 1, 2, 4, 8, 16, 0.5, 1.0, "never"])
                 | st.lists(token_ids, max_size=4) | st.lists(st.lists(token_ids, max_size=3), max_size=3)
                 | json_values)
known_options = sorted(GenerateKwargs.model_fields) + sorted(CODE_LOADING_OPTIONS)
generate_kwargs = st.builds(
    lambda known, unknown: {**unknown, **known},
    st.dictionaries(st.sampled_from(known_options), option_values, max_size=6),
    st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=1))
prompts = st.text(max_size=40) | st.sampled_from(["Hello", "", " ", "\x00", "\U0001f600" * 3]) | json_values
top_level = st.fixed_dictionaries({}, optional={
    "prompt": prompts,
    "generate_kwargs": generate_kwargs | json_values,
    "return_full_text": json_scalars,
    "clean_up_tokenization_spaces": json_scalars,
    "prefix": st.text(max_size=10) | json_scalars,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=10)}), max_size=3) | json_values,
    "handle_long_generation": st.sampled_from(["hole", None, "middle"]) | json_scalars,
    "seed": st.integers(-1, 2**64) | json_scalars,
    "stream": json_scalars,
    "model": st.text(max_size=10),
})
chaotic_payloads = st.builds(lambda fields, prompt: {"prompt": prompt, **fields}, top_level, prompts)

# Values of the right type around the edges of each option's range, so that most of these payloads pass validation
# and reach generation, where a value that validation let through can still break the model's arithmetic.
tiny_and_huge = [5e-324, 1e-300, 1e-30, 1e-5, 1e30, 1e308]
probabilities = st.sampled_from([5e-324, 1e-300, 1e-10, 0.01, 0.5, 1.0]) | st.floats(0, 1, exclude_min=True)
positive = st.sampled_from(tiny_and_huge) | st.sampled_from([0.5, 1.0, 1.2, 2.0, 100.0]) | st.floats(
    0, 1e308, exclude_min=True)
some_ids = st.lists(st.integers(0, 1023), min_size=1, max_size=3)
plausible_options = {
    "max_new_tokens": st.integers(1, MAX_NEW_TOKENS), "min_new_tokens": st.integers(0, MAX_NEW_TOKENS),
    "max_length": st.integers(1, 24), "min_length": st.integers(0, 24),
    "do_sample": st.booleans(), "early_stopping": st.sampled_from([True, False, "never"]),
    "num_beams": st.integers(1, 9), "num_beam_groups": st.integers(1, 4), "num_return_sequences": st.integers(1, 4),
    "diversity_penalty": st.floats(0, 1e308) | st.sampled_from([0.0, 0.5, 1e308]),
    "temperature": st.just(0) | positive, "top_k": st.integers(0, 2000) | st.just(10**12),
    "top_p": probabilities, "typical_p": probabilities, "repetition_penalty": positive,
    "length_penalty": st.floats(-1e308, 1e308) | st.sampled_from([-1e308, -2.0, 0.0, 1.0, 2.0, 1e308]),
    "no_repeat_ngram_size": st.integers(0, 4), "encoder_no_repeat_ngram_size": st.integers(0, 4),
    "bad_words_ids": st.lists(some_ids, min_size=1, max_size=4), "output_scores": st.booleans(),
    "return_dict_in_generate": st.booleans(), "remove_invalid_values": st.booleans(),
    "forced_bos_token_id": st.integers(0, 1023), "forced_eos_token_id": st.integers(0, 1023) | some_ids,
    "pad_token_id": st.integers(0, 1023), "eos_token_id": st.integers(0, 1023) | some_ids,
    "min_p": probabilities | st.just(0.0), "top_h": probabilities, "epsilon_cutoff": st.floats(0, 1, exclude_max=True),
    "eta_cutoff": st.floats(0, 1, exclude_max=True), "renormalize_logits": st.booleans(),
    "suppress_tokens": some_ids, "begin_suppress_tokens": some_ids, "use_cache": st.booleans(),
    "sequence_bias": st.lists(st.tuples(some_ids, st.floats(-100, 100)).map(list), min_size=1, max_size=3),
    "exponential_decay_length_penalty": st.tuples(st.integers(0, 20), positive).map(list),
    "stop_strings": st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=3),
}
plausible_payloads = st.builds(
    lambda options, new_tokens, fields: {"prompt": fields.pop("prompt", "Hello"), **fields,
                                         "generate_kwargs": {"max_new_tokens": new_tokens, **options}},
    st.lists(st.sampled_from(sorted(plausible_options)), max_size=5, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: plausible_options[name] for name in names})),
    st.integers(1, MAX_NEW_TOKENS),
    st.fixed_dictionaries({}, optional={
        "prompt": st.text(min_size=1, max_size=60), "prefix": st.text(max_size=10), "seed": st.integers(0, 2**63),
        "return_full_text": st.booleans(), "clean_up_tokenization_spaces": st.booleans(),
        "handle_long_generation": st.sampled_from(["hole", None]), "stream": st.booleans()}))
with_messages = plausible_payloads.map(lambda p: {**{k: v for k, v in p.items() if k != "prompt"},
                                                  "messages": [{"role": "user", "content": p["prompt"]}]})
chat_payloads = plausible_payloads | chaotic_payloads


@st.composite
def mutated_json(draw) -> bytes:
    """A valid-looking payload with a few bytes replaced, inserted or cut."""
    raw = bytearray(json.dumps(draw(chat_payloads)).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        patch = draw(st.binary(min_size=0, max_size=3))
        raw[at:at + draw(st.integers(0, 3))] = patch
    return bytes(raw)


valid_looking = plausible_payloads.map(lambda p: json.dumps(p).encode())
bodies = st.sampled_from([  # most examples should reach generation: more draws of the valid-looking kind
    *[valid_looking] * 5,
    with_messages.map(lambda p: json.dumps(p).encode()),
    chaotic_payloads.map(lambda p: json.dumps(p).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_json(),
    st.binary(max_size=64),
]).flatmap(lambda strategy: strategy)
routes = st.sampled_from(["/chat", "/v1/models/tiny-falcon:predict", "/v1/models/tiny-falcon:explain",
                          "/v1/models/other:predict", "/v2/models/tiny-falcon/infer",
                          "/v2/models/tiny-falcon/versions/1/infer", "/v2/models/other/infer"])


def stream_errors(text: str) -> list[dict]:
    """The error events of a server-sent event stream (the generated text may say "error" as any other word)."""
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: {")]
    return [e for e in events if isinstance(e, dict) and ("error" in e or "error_type" in e)]


@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(route=routes, body=bodies)
def test_no_payload_gets_a_5xx(fuzz_server, client, route: str, body: bytes) -> None:
    response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics: how many got through validation
    assert response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):  # "stream": true
        assert not stream_errors(response.text), f"failed after the 200 went out: {response.text[-300:]}"
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")
        assert "error" in response.json()
    assert fuzz_server.process.poll() is None, "the server died"


KSERVE_PATHS = ["/v1/models", "/v1/models/{m}", "/v1/models/{m}:predict", "/v1/models/{m}:explain", "/v2",
                "/v2/health/live", "/v2/health/ready", "/v2/models", "/v2/models/{m}", "/v2/models/{m}/ready",
                "/v2/models/{m}/infer", "/v2/models/{m}/versions/{v}", "/v2/models/{m}/versions/{v}/ready",
                "/v2/models/{m}/versions/{v}/infer", "/v2/repository/index", "/v2/repository/models/{m}/unload"]
model_names = st.sampled_from(["tiny-falcon", "other", ""]) | st.text(max_size=8)
queries = st.dictionaries(st.sampled_from(["model_version", "version", "verbose"]) | st.text(max_size=6),
                          st.text(max_size=6), max_size=2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(method="POST", template="/v2/models/{m}/infer", name="tiny-falcon", version="1", query={},
         body=b'{"inputs": [{"name": "\\ud800"}]}')  # a lone surrogate: KServe's v2 parsing answered 500
@example(method="GET", template="/v2/models/{m}", name="tiny-falcon", version="1", query={"model_version": "1"},
         body=b"")  # KServe answered 501
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), template=st.sampled_from(KSERVE_PATHS),
       name=model_names, version=st.sampled_from(["1", "0", "x"]) | st.text(max_size=4), query=queries,
       body=bodies)
def test_no_kserve_route_gets_a_5xx(fuzz_server, client, method: str, template: str, name: str, version: str,
                                    query: dict[str, str], body: bytes) -> None:
    path = template.format(m=quote(name, safe=""), v=quote(version, safe=""))
    response = client.request(method, path, params=query, content=body if method != "GET" else None,
                              headers={"Content-Type": "application/json"})
    event(f"{method} {template}: HTTP {response.status_code}")
    assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text
    assert fuzz_server.process.poll() is None, "the server died"


def test_one_requests_bad_numbers_do_not_fail_concurrent_requests(fuzz_server) -> None:
    """Requests share forward passes, so a request whose own options break the arithmetic (a temperature so small
    that its logits overflow) must be refused or contained, never fail the other clients' requests in its batch."""
    stop = threading.Event()
    bystanders: list[int] = []

    def keep_asking() -> None:
        with httpx.Client(base_url=fuzz_server.url, timeout=120) as http:
            while not stop.is_set():
                bystanders.append(http.post("/chat", json=BYSTANDER).status_code)

    threads = [threading.Thread(target=keep_asking) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=fuzz_server.url, timeout=120) as http:
            bad = [http.post("/chat", json={"prompt": "Hello", "generate_kwargs": {
                "max_new_tokens": 4, "do_sample": True, "temperature": 1e-300}}).status_code for _ in range(10)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert bystanders and all(status == 200 for status in bystanders), f"bystanders got {bystanders}, bad got {bad}"
    assert all(status < 500 for status in bad), bad


def test_the_server_still_serves_after_fuzzing(fuzz_server, client) -> None:
    response = client.post("/chat", json=NORMAL)
    assert response.status_code == 200, response.text
    assert client.get("/health").status_code == 200


# -- the OpenAI and tokenizer routes -------------------------------------------------------------------------------
openai_fields = {  # values of the right types around the edges of their ranges, as plausible_options
    "max_tokens": st.integers(1, MAX_NEW_TOKENS), "temperature": st.floats(0, 2), "top_p": probabilities,
    "top_k": st.integers(0, 2000), "min_p": st.floats(0, 1), "n": st.integers(1, 4), "seed": st.integers(0, 2**63),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "repetition_penalty": positive,
    "logit_bias": st.dictionaries(st.integers(0, 1023).map(str), st.floats(-100, 100), max_size=3),
    "min_tokens": st.integers(0, MAX_NEW_TOKENS), "stop_token_ids": st.lists(st.integers(0, 1023), max_size=3),
    "ignore_eos": st.booleans(), "return_tokens_as_token_ids": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                            "type": "object", "properties": {"a": {"type": "boolean"}}}}},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                            "type": "nonsense"}}}]),
}
completion_fields = {**openai_fields, "logprobs": st.integers(0, 5), "echo": st.booleans()}
chat_fields = {**openai_fields, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
chat_messages = with_messages.map(lambda p: p["messages"])


def openai_body(fields: dict, required: dict) -> st.SearchStrategy:
    """A few plausible fields, now and then one of any JSON value or an unknown or refused one."""
    some = st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: fields[name] for name in names}))
    odd = st.dictionaries(st.sampled_from([*fields, "tools", "best_of", "x"]), json_values, max_size=1)
    return st.builds(lambda body, extra, base: {**base, **body, **extra}, some, st.just({}) | odd,
                     st.fixed_dictionaries({"model": st.just("tiny-falcon"), **required}))


openai_payloads = st.one_of(
    st.tuples(st.just("/v1/completions"), openai_body(completion_fields, {"prompt": st.text(min_size=1, max_size=30)})),
    st.tuples(st.just("/v1/chat/completions"), openai_body(chat_fields, {"messages": chat_messages})),
    st.tuples(st.just("/tokenize"), st.fixed_dictionaries({}, optional={
        "prompt": st.text(max_size=20) | json_scalars, "messages": chat_messages | json_values,
        "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()})),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": st.lists(token_ids, max_size=5) | json_values})),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(route_and_body=openai_payloads)
def test_no_openai_payload_gets_a_5xx(fuzz_server, client, route_and_body) -> None:
    route, body = route_and_body
    response = client.post(route, json=body)
    event(f"{route} HTTP {response.status_code}")
    assert response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert not stream_errors(response.text), f"failed after the 200 went out: {response.text[-300:]}"
    elif response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert fuzz_server.process.poll() is None, "the server died"
