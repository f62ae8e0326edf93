"""POST /chat over real HTTP: the request fields other than generate_kwargs, errors, routes, health and metrics.

Every test talks to a real ``python -m predictor`` process (see conftest). The tiny checkpoints have random weights,
so texts are noise, but greedy decoding is deterministic and can be compared with transformers' ``generate`` on the
same checkpoint loaded in this process.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor.engine.model.loading import resolve_device_and_dtype

MISSING_PROMPT = "Text generation parameter prompt required"
PROMPT = "The quick brown fox"  # plain ASCII: the continuation decodes alone exactly as it does after the prompt
GREEDY = {"do_sample": False, "max_new_tokens": 8}
CONTEXT = 2048  # the tiny checkpoints' max_position_embeddings

# The request the Falcon /chat clients send, every field at its documented default (issue 2), exactly.
FULL_DEFAULT_PAYLOAD = {
    "prompt": "...", "return_full_text": True, "clean_up_tokenization_spaces": False, "prefix": None,
    "handle_long_generation": None,
    "generate_kwargs": {
        "max_length": 200, "min_length": 0, "do_sample": True, "early_stopping": False, "num_beams": 1,
        "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 10, "top_p": 1, "typical_p": 1,
        "repetition_penalty": 1, "length_penalty": 1, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
        "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": None, "pad_token_id": None,
        "eos_token_id": None, "max_new_tokens": None, "min_new_tokens": None,
    },
}


def post(url: str, body: Any, path: str = "/chat") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def chat(url: str, prompt: str = PROMPT, path: str = "/chat", **fields: Any) -> dict[str, Any]:
    """A request that must succeed; returns the decoded response."""
    fields.setdefault("generate_kwargs", GREEDY)
    response = post(url, {"prompt": prompt, **fields}, path)
    assert response.status_code == 200, response.text
    return response.json()


def assert_client_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """A refused request: the status asked for and the error shape, naming the field at fault."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] and body["error"] == body["detail"] and body["error_type"], body
    if param is not None:
        assert body["param"] == param, body
    return body


@pytest.fixture(scope="module")
def reference(tiny_dirs):
    """The 7B-style tiny checkpoint's tokenizer and model, in this process, on the device and in the dtype the server
    picks (the CPU and float32 without a GPU)."""
    device, dtype = resolve_device_and_dtype("auto", "auto")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["7b"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["7b"], dtype=dtype).to(device).eval()
    return tokenizer, model


def generate_greedy(reference, prompt_ids: list[int], max_new_tokens: int) -> str:
    tokenizer, model = reference
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=11)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# -- servers started fresh by this module ----------------------------------------------------------------------
@dataclass
class HealthWatch:
    """The /health answers of a server, polled from the moment its process starts: (seconds, status, body)."""

    answers: list[tuple[float, int | None, Any]] = field(default_factory=list)  # status None: refused

    def poll(self, server, deadline_s: float = 120) -> None:
        start = time.monotonic()
        while time.monotonic() - start < deadline_s and server.process.poll() is None:
            try:
                response = httpx.get(f"{server.url}/health", timeout=2)
                answer = (response.status_code, response.json())
            except httpx.TransportError:
                answer = (None, None)
            if not self.answers or self.answers[-1][1:] != answer:
                self.answers.append((round(time.monotonic() - start, 2), *answer))
            if answer[0] == 200:
                return
            time.sleep(0.05)

    @property
    def statuses(self) -> list[int | None]:
        return [status for _, status, _ in self.answers]


@dataclass
class FreshServers:
    demo: Any  # no --model_dir: builds its tiny Falcon while the port is already open
    demo_health: HealthWatch
    demo_watcher: threading.Thread
    cleanup: Any  # a tokenizer that applies clean_up_tokenization_spaces (see the test)


@pytest.fixture(scope="module")
def fresh_servers(start_server, tiny_dirs, tmp_path_factory) -> Iterator[FreshServers]:
    """Two servers launched together so that they load side by side, and stopped after this module."""
    cache = tmp_path_factory.mktemp("predictor-cache")
    demo = start_server(None, wait=False, env={"PREDICTOR_CACHE": str(cache)})
    health = HealthWatch()
    watcher = threading.Thread(target=health.poll, args=(demo,), daemon=True)
    watcher.start()

    # transformers 5 ignores clean_up_tokenization_spaces for BPE tokenizers (Falcon's kind) unless the tokenizer
    # opts in; a copy of the checkpoint that opts in shows whether the server passes the field to decoding.
    opted_in = tmp_path_factory.mktemp("tiny-cleanup") / "7b"
    shutil.copytree(tiny_dirs["7b"], opted_in)
    config_path = opted_in / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    config_path.write_text(json.dumps(config))
    cleanup = start_server(opted_in, wait=False, model_name="tiny-falcon-cleanup")
    yield FreshServers(demo, health, watcher, cleanup)
    for server in (demo, cleanup):  # both drain at once
        server.process.terminate()
    for server in (demo, cleanup):
        server.stop()


def test_health_is_503_while_loading_then_200(fresh_servers):
    # The demo default builds its tiny Falcon (seconds) in a fresh cache after the port opens: probes must see 503.
    fresh_servers.demo_watcher.join(timeout=150)
    answers = fresh_servers.demo_health.answers
    assert answers and answers[-1][1] == 200, f"{answers}\n{fresh_servers.demo.log()[-3000:]}"
    assert answers[-1][2] == {"status": "Healthy"}
    answered = [status for status in fresh_servers.demo_health.statuses if status is not None]
    assert answered[0] == 503 and answered.index(200) > 0, answers
    loading = next(body for _, status, body in answers if status == 503)
    assert loading == {"status": "Loading"}


# -- health, metrics, routes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/health", "/healthz"])
def test_health_routes_answer_200_once_loaded(any_server, path):
    response = httpx.get(f"{any_server.url}{path}", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "Healthy"}


def test_metrics_are_prometheus_text_counting_chat_requests(tiny_server):
    def chat_successes() -> float:
        response = httpx.get(f"{tiny_server.url}/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "# TYPE falcon_requests_total counter" in response.text
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "falcon_requests_total" and sample.labels == {"route": "/chat",
                                                                                "outcome": "success"}:
                    return sample.value
        return 0.0

    before = chat_successes()
    chat(tiny_server.url)
    assert chat_successes() == before + 1


def test_full_default_payload_answers_on_both_architectures(any_server):
    response = post(any_server.url, FULL_DEFAULT_PAYLOAD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["Result"], str) and body["Result"].startswith("...")
    details = body["details"]
    assert len(details["generated_tokens"]) == 1 and details["generated_tokens"][0] >= 1
    assert details["prompt_tokens"] + details["generated_tokens"][0] <= 200  # max_length
    assert details["finish_reasons"][0] in ("stop", "length")


def test_v1_predict_route_answers_like_chat(any_server):
    body = {"prompt": PROMPT, "return_full_text": False, "generate_kwargs": GREEDY}
    on_chat = post(any_server.url, body)
    on_v1 = post(any_server.url, body, f"/v1/models/{any_server.model_name}:predict")
    assert on_chat.status_code == on_v1.status_code == 200, on_v1.text
    assert on_v1.json() == on_chat.json()


def test_v1_predict_route_refuses_like_chat(tiny_server):
    refused = post(tiny_server.url, {"prompt": ""}, f"/v1/models/{tiny_server.model_name}:predict")
    assert assert_client_error(refused, 400, "prompt")["detail"].startswith(MISSING_PROMPT)


# -- prompt and the fields around it ----------------------------------------------------------------------------
@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": None}, {"generate_kwargs": GREEDY}],
                         ids=["absent", "empty", "null", "only-kwargs"])
def test_missing_or_empty_prompt_is_400(any_server, body):
    response = post(any_server.url, body)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(MISSING_PROMPT)


def test_return_full_text(any_server):
    continuation = chat(any_server.url, return_full_text=False)["Result"]
    full = chat(any_server.url, return_full_text=True)["Result"]
    assert continuation and not continuation.startswith(PROMPT)
    assert full == PROMPT + continuation
    assert chat(any_server.url)["Result"] == full  # the default


def test_prefix_is_generated_from_but_never_returned(tiny_server):
    prefix = "Once upon a time. "
    with_prefix = chat(tiny_server.url, prefix=prefix)
    assert with_prefix["Result"].startswith(PROMPT) and prefix not in with_prefix["Result"]
    as_one_prompt = chat(tiny_server.url, prompt=prefix + PROMPT, return_full_text=False)
    assert with_prefix["Result"] == PROMPT + as_one_prompt["Result"]
    assert with_prefix["details"]["prompt_tokens"] == as_one_prompt["details"]["prompt_tokens"]
    without = chat(tiny_server.url, return_full_text=False)
    assert without["Result"] != as_one_prompt["Result"]  # the prefix changed what was generated
    assert chat(tiny_server.url, prefix=prefix, return_full_text=False)["Result"] == as_one_prompt["Result"]


def long_prompt(reference) -> tuple[str, list[int]]:
    text = "hello world, " * 800
    ids = reference[0](text, add_special_tokens=False)["input_ids"]
    assert len(ids) > CONTEXT
    return text, ids


def test_handle_long_generation_hole_cuts_the_prompt_from_the_left(tiny_server, reference):
    text, ids = long_prompt(reference)
    new = 4
    body = chat(tiny_server.url, prompt=text, handle_long_generation="hole", return_full_text=False,
                generate_kwargs={"do_sample": False, "max_new_tokens": new})
    kept = CONTEXT - new
    assert body["details"]["prompt_tokens"] == kept
    assert body["details"]["truncated_prompt_tokens"] == len(ids) - kept
    assert body["Result"] == generate_greedy(reference, ids[-kept:], new)


def test_handle_long_generation_null_refuses_a_prompt_too_long_saying_what_fits(tiny_server, reference):
    text, ids = long_prompt(reference)
    for value in ({}, {"handle_long_generation": None}):
        response = post(tiny_server.url, {"prompt": text, **value,
                                          "generate_kwargs": {"do_sample": False, "max_new_tokens": 4}})
        assert 400 <= response.status_code < 500, response.text
        detail = response.json()["detail"]
        assert str(len(ids)) in detail and str(CONTEXT - 4) in detail, detail


@pytest.mark.parametrize("value", ["window", "HOLE", 1, True])
def test_handle_long_generation_other_values_are_refused(tiny_server, value):
    response = post(tiny_server.url, {"prompt": PROMPT, "handle_long_generation": value})
    assert_client_error(response, 400, "handle_long_generation")


def test_clean_up_tokenization_spaces_is_passed_to_decoding(fresh_servers, reference):
    server = fresh_servers.cleanup
    server.wait_ready()
    prompt = "A not"  # greedy continues with " ... point ..." : a space before punctuation
    generate_kwargs = {"do_sample": False, "max_new_tokens": 12}
    raw = chat(server.url, prompt=prompt, generate_kwargs=generate_kwargs, return_full_text=False)["Result"]
    cleaned = chat(server.url, prompt=prompt, generate_kwargs=generate_kwargs, return_full_text=False,
                   clean_up_tokenization_spaces=True)["Result"]
    assert " ..." in raw
    assert cleaned == reference[0].clean_up_tokenization(raw) != raw
    assert chat(server.url, prompt=prompt, generate_kwargs=generate_kwargs, return_full_text=False,
                clean_up_tokenization_spaces=False)["Result"] == raw  # false is the default


def test_clean_up_tokenization_spaces_is_validated(tiny_server):
    assert chat(tiny_server.url, clean_up_tokenization_spaces=True)["Result"].startswith(PROMPT)
    assert_client_error(post(tiny_server.url, {"prompt": PROMPT, "clean_up_tokenization_spaces": "yes"}), 400,
                        "clean_up_tokenization_spaces")


# -- seed ---------------------------------------------------------------------------------------------------------
SAMPLED = {"do_sample": True, "max_new_tokens": 8, "top_k": 0, "temperature": 1.5}


def test_seed_makes_sampling_reproducible(tiny_server):
    def sample(seed: int) -> list[str]:
        return chat(tiny_server.url, seed=seed, return_full_text=False,
                    generate_kwargs={**SAMPLED, "num_return_sequences": 2})["Result"]

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_seed_makes_beam_sampling_reproducible(tiny_server):
    generate_kwargs = {**SAMPLED, "num_beams": 2}

    def sample(seed: int) -> str:
        return chat(tiny_server.url, seed=seed, return_full_text=False, generate_kwargs=generate_kwargs)["Result"]

    assert sample(7) == sample(7) == sample(7)


@pytest.mark.parametrize("seed", [-1, 2**63, "7", 1.5])
def test_seed_out_of_range_is_refused(tiny_server, seed):
    assert_client_error(post(tiny_server.url, {"prompt": PROMPT, "seed": seed}), 400, "seed")


# -- client mistakes are 4xx, never 500 ----------------------------------------------------------------------------
def test_unknown_generate_kwargs_key_is_refused_by_name(any_server):
    response = post(any_server.url, {"prompt": PROMPT, "generate_kwargs": {"max_tokens": 5}})
    body = assert_client_error(response, 400, "generate_kwargs.max_tokens")
    assert "max_tokens" in body["detail"]


@pytest.mark.parametrize("option", ["custom_generate", "trust_remote_code", "assistant_model", "streamer",
                                    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn"])
def test_code_loading_generate_options_are_refused(tiny_server, option):
    response = post(tiny_server.url, {"prompt": PROMPT,
                                      "generate_kwargs": {option: "transformers-community/group-beam-search"}})
    assert option in assert_client_error(response, 400, f"generate_kwargs.{option}")["detail"]


@pytest.mark.parametrize("option, value", [("early_stopping", "sometimes"), ("eos_token_id", "11"),
                                           ("forced_eos_token_id", [1.5])])
def test_a_union_typed_option_is_refused_naming_the_option(tiny_server, option, value):
    # These options take one of several types (bool or "never"; an id or a list of ids): the refusal must still
    # name the option itself, not pydantic's name for one member of the union.
    response = post(tiny_server.url, {"prompt": PROMPT, "generate_kwargs": {option: value}})
    assert_client_error(response, 400, f"generate_kwargs.{option}")


def test_unknown_top_level_field_is_refused(tiny_server):
    assert_client_error(post(tiny_server.url, {"prompt": PROMPT, "max_tokens": 5}), 400, "max_tokens")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b'{"prompt": NaN}'])
def test_a_body_that_is_not_a_json_object_is_400(tiny_server, raw):
    response = httpx.post(f"{tiny_server.url}/chat", content=raw, headers={"content-type": "application/json"},
                          timeout=30)
    assert_client_error(response, 400)
