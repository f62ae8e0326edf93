"""Bad input against a real server: every mistake is a 4xx naming the field at fault, and the server serves the next
request as if nothing happened.

Each row of the tables is one thing a client can get wrong; the tests send it to ``POST /chat`` and to KServe's
``POST /v1/models/<name>:predict`` (same validation, same statuses) and then send a normal request.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

NORMAL = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 1}}
MISSING_PROMPT = "Text generation parameter prompt required"  # what the Falcon /chat (Kaito) clients read
VOCAB_SIZE = 1024  # the tiny Falcon's vocabulary
CONTEXT = 2048


@dataclass(frozen=True)
class Case:
    id: str
    body: Any  # a JSON value (encoded here) or raw bytes (sent as they are)
    status: int
    error_type: str
    param: str | None = None  # None: the error concerns the body as a whole


def ask(**generate_kwargs: Any) -> dict[str, Any]:
    """A /chat payload whose only fault is in ``generate_kwargs`` (small max_new_tokens unless given)."""
    return {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 4, **generate_kwargs}}


def invalid(case_id: str, param: str, **generate_kwargs: Any) -> Case:
    return Case(case_id, ask(**generate_kwargs), 400, "invalid_request", f"generate_kwargs.{param}")


BODY_CASES = [
    Case("malformed-json", b'{"prompt": "Hello",', 400, "invalid_request"),
    Case("trailing-garbage", b'{"prompt": "Hello"} and more', 400, "invalid_request"),
    Case("empty-body", b"", 400, "invalid_request"),
    Case("not-json-at-all", b"prompt=Hello", 400, "invalid_request"),
    Case("array-body", [{"prompt": "Hello"}], 400, "invalid_request"),
    Case("string-body", "Hello", 400, "invalid_request"),
    Case("number-body", 42, 400, "invalid_request"),
    Case("null-body", None, 400, "invalid_request"),
    Case("bool-body", True, 400, "invalid_request"),
    Case("invalid-utf8", b'{"prompt": "\xff\xfe\xfd"}', 400, "invalid_request"),
    Case("invalid-utf8-outside-strings", b'\xef\xbb{"prompt": "Hello"}', 400, "invalid_request"),
    Case("lone-surrogate-escape", b'{"prompt": "\\ud800"}', 400, "invalid_request"),
    Case("deeply-nested-arrays", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_request"),
    Case("deeply-nested-in-a-field", b'{"prompt": "Hello", "generate_kwargs": ' + b'{"a": ' * 5000 + b"1"
         + b"}" * 5001, 400, "invalid_request"),
    Case("raw-nul-byte-in-string", b'{"prompt": "He\x00llo"}', 400, "invalid_request"),
    Case("raw-nul-byte-after-document", b'{"prompt": "Hello"}\x00', 400, "invalid_request"),
    Case("escaped-nul-in-prompt", {"prompt": "He\u0000llo"}, 400, "invalid_request", "prompt"),
    Case("escaped-nul-in-prefix", {"prompt": "Hello", "prefix": "\u0000"}, 400, "invalid_request", "prefix"),
    Case("nan-literal", b'{"prompt": "Hello", "generate_kwargs": {"temperature": NaN}}', 400, "invalid_request"),
    Case("infinity-literal", b'{"prompt": "Hello", "generate_kwargs": {"top_p": Infinity}}', 400, "invalid_request"),
    Case("minus-infinity-literal", b'{"prompt": "Hello", "generate_kwargs": {"temperature": -Infinity}}', 400,
         "invalid_request"),
    Case("number-overflowing-double", b'{"prompt": "Hello", "generate_kwargs": {"temperature": 1e400}}', 400,
         "invalid_request"),
]

PROMPT_CASES = [
    Case("missing-prompt", {"generate_kwargs": {"max_new_tokens": 4}}, 400, "missing_prompt", "prompt"),
    Case("empty-object", {}, 400, "missing_prompt", "prompt"),
    Case("empty-prompt", {"prompt": ""}, 400, "missing_prompt", "prompt"),
    Case("null-prompt", {"prompt": None}, 400, "missing_prompt", "prompt"),
    Case("number-prompt", {"prompt": 5}, 400, "invalid_request", "prompt"),
    Case("list-prompt", {"prompt": ["Hello"]}, 400, "invalid_request", "prompt"),
    Case("object-prompt", {"prompt": {"text": "Hello"}}, 400, "invalid_request", "prompt"),
    Case("unknown-top-level-field", {"prompt": "Hello", "temperature": 0.5}, 400, "unknown_parameter",
         "temperature"),
    Case("generate-kwargs-not-object", {"prompt": "Hello", "generate_kwargs": "greedy"}, 400, "invalid_request",
         "generate_kwargs"),
    Case("generate-kwargs-array", {"prompt": "Hello", "generate_kwargs": [1, 2]}, 400, "invalid_request",
         "generate_kwargs"),
    Case("return-full-text-not-bool", {"prompt": "Hello", "return_full_text": "yes"}, 400, "invalid_request",
         "return_full_text"),
    Case("handle-long-generation-unknown", {"prompt": "Hello", "handle_long_generation": "middle"}, 400,
         "invalid_request", "handle_long_generation"),
    Case("negative-seed", {"prompt": "Hello", "seed": -1}, 400, "invalid_request", "seed"),
    Case("huge-seed", {"prompt": "Hello", "seed": 2**64}, 400, "invalid_request", "seed"),
    Case("float-seed", {"prompt": "Hello", "seed": 1.5}, 400, "invalid_request", "seed"),
]

GENERATE_KWARGS_CASES = [
    # types: strict, no coercion of strings, floats or booleans into numbers
    invalid("max-new-tokens-string", "max_new_tokens", max_new_tokens="4"),
    invalid("max-new-tokens-float", "max_new_tokens", max_new_tokens=4.5),
    invalid("max-new-tokens-bool", "max_new_tokens", max_new_tokens=True),
    invalid("do-sample-string", "do_sample", do_sample="yes"),
    invalid("temperature-string", "temperature", temperature="hot"),
    invalid("temperature-bool", "temperature", temperature=True),
    invalid("top-k-float", "top_k", top_k=2.5),
    invalid("num-beams-huge-number", "num_beams", num_beams=10**30),
    # ranges
    invalid("max-new-tokens-zero", "max_new_tokens", max_new_tokens=0),
    invalid("max-new-tokens-negative", "max_new_tokens", max_new_tokens=-5),
    invalid("max-length-zero", "max_length", max_length=0, max_new_tokens=None),
    invalid("top-p-zero", "top_p", top_p=0),
    invalid("top-p-negative", "top_p", top_p=-0.5),
    invalid("top-p-above-one", "top_p", top_p=1.01),
    invalid("top-k-negative", "top_k", top_k=-1),
    invalid("temperature-negative", "temperature", temperature=-0.1),
    invalid("typical-p-zero", "typical_p", typical_p=0),
    invalid("typical-p-above-one", "typical_p", typical_p=1.5),
    invalid("repetition-penalty-zero", "repetition_penalty", repetition_penalty=0),
    invalid("repetition-penalty-negative", "repetition_penalty", repetition_penalty=-1.0),
    invalid("min-length-negative", "min_length", min_length=-1),
    invalid("min-new-tokens-negative", "min_new_tokens", min_new_tokens=-1),
    invalid("num-beams-zero", "num_beams", num_beams=0),
    invalid("num-return-sequences-zero", "num_return_sequences", num_return_sequences=0),
    invalid("no-repeat-ngram-negative", "no_repeat_ngram_size", no_repeat_ngram_size=-1),
    invalid("diversity-penalty-negative", "diversity_penalty", diversity_penalty=-1.0),
    # consistency between fields
    invalid("min-length-above-max-length", "min_length", min_length=50, max_length=10, max_new_tokens=None),
    invalid("min-new-tokens-above-max-new-tokens", "min_new_tokens", min_new_tokens=10, max_new_tokens=4),
    invalid("max-length-below-prompt", "max_length", max_length=1, max_new_tokens=None),
    invalid("beam-groups-not-dividing-beams", "num_beam_groups", num_beams=4, num_beam_groups=3, do_sample=False),
    invalid("beam-groups-with-sampling", "num_beam_groups", num_beams=4, num_beam_groups=2, do_sample=True),
    invalid("more-sequences-than-beams", "num_return_sequences", num_beams=2, num_return_sequences=3),
    invalid("several-greedy-sequences", "num_return_sequences", num_return_sequences=2, do_sample=False),
    # token ids within the vocabulary
    invalid("bad-word-outside-vocab", "bad_words_ids", bad_words_ids=[[VOCAB_SIZE]]),
    invalid("bad-word-negative-id", "bad_words_ids", bad_words_ids=[[-1]]),
    invalid("eos-outside-vocab", "eos_token_id", eos_token_id=VOCAB_SIZE + 7),
    invalid("eos-list-outside-vocab", "eos_token_id", eos_token_id=[11, 99_999]),
    invalid("pad-outside-vocab", "pad_token_id", pad_token_id=-5),
    invalid("forced-bos-outside-vocab", "forced_bos_token_id", forced_bos_token_id=VOCAB_SIZE),
    invalid("forced-eos-outside-vocab", "forced_eos_token_id", forced_eos_token_id=[VOCAB_SIZE * 10]),
    # bad_words_ids must be a list of non-empty lists of ids
    invalid("bad-words-flat-list", "bad_words_ids", bad_words_ids=[5, 6]),
    invalid("bad-words-empty-word", "bad_words_ids", bad_words_ids=[[]]),
    invalid("bad-words-strings", "bad_words_ids", bad_words_ids=[["the"]]),
    invalid("bad-words-not-a-list", "bad_words_ids", bad_words_ids="the"),
    # the server's limits
    invalid("max-new-tokens-over-limit", "max_new_tokens", max_new_tokens=100_000),
    invalid("max-length-over-limit", "max_length", max_length=1_000_000, max_new_tokens=None),
    invalid("num-beams-over-limit", "num_beams", num_beams=9, do_sample=False),
    invalid("num-return-sequences-over-limit", "num_return_sequences", num_return_sequences=9),
    invalid("beams-times-sequences-over-limit", "num_return_sequences", num_beams=8, num_return_sequences=4),
    Case("new-tokens-fill-the-context", ask(max_new_tokens=CONTEXT), 422, "context_length_exceeded",
         "generate_kwargs.max_new_tokens"),
    # unknown options, and those that would load code (see test_security for the full list)
    Case("unknown-generate-option", ask(frequency_penalty=0.5), 400, "unknown_parameter",
         "generate_kwargs.frequency_penalty"),
    Case("code-loading-option", ask(custom_generate="transformers-community/group-beam-search"), 400,
         "unknown_parameter", "generate_kwargs.custom_generate"),
]

CASES = BODY_CASES + PROMPT_CASES + GENERATE_KWARGS_CASES


def encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, dict) and isinstance(body.get("generate_kwargs"), dict):  # ask(x=None) drops x
        body = {**body, "generate_kwargs": {k: v for k, v in body["generate_kwargs"].items() if v is not None}}
    return json.dumps(body).encode()


def post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, content=encode(body), headers={"Content-Type": "application/json"}, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, error_type: str | None, param: str | None = None) -> dict:
    """The response is our JSON error: right status, stable type, the field at fault, and no traceback."""
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"detail", "error", "error_type", "param"}, body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    assert param_matches(body["param"], param), body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body


def param_matches(actual: str | None, expected: str | None) -> bool:
    """The field at fault, down to a list index where the fault is inside a list (``bad_words_ids.0.0``)."""
    if expected is None or actual is None:
        return actual == expected
    return re.fullmatch(re.escape(expected) + r"(\.\d+)*", actual) is not None


def assert_serves(base_url: str) -> None:
    response = post(f"{base_url}/chat", NORMAL)
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] == [1]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_on_chat(tiny_server, case: Case) -> None:
    assert_error(post(f"{tiny_server.url}/chat", case.body), case.status, case.error_type, case.param)
    assert_serves(tiny_server.url)


def test_bad_input_on_predict(tiny_server) -> None:
    """KServe's own route gets the same mistakes: the same 4xx status, never a traceback. (Bodies KServe decodes
    itself come back in KServe's ``{"error": ...}`` shape, so only the status is compared.) One test, one normal
    request at the end: the /chat table already shows each mistake leaves the server serving."""
    url = f"{tiny_server.url}/v1/models/{tiny_server.model_name}:predict"
    wrong = []
    for case in CASES:
        response = post(url, case.body)
        if response.status_code != case.status or "Traceback" in response.text:
            wrong.append(f"{case.id}: expected {case.status}, got {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert post(url, NORMAL).status_code == 200


@pytest.mark.parametrize("path", ["/chat", "/v1/models/tiny-falcon:predict"])
def test_missing_prompt_has_the_kaito_detail(tiny_server, path: str) -> None:
    response = post(tiny_server.url + path, {"generate_kwargs": {"max_new_tokens": 4}})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(MISSING_PROMPT)


def test_prompt_and_new_tokens_must_fit_the_context(tiny_server) -> None:
    prompt = " hello" * (CONTEXT + 50)  # one token per word in the tiny tokenizer's vocabulary, or more
    body = assert_error(post(f"{tiny_server.url}/chat", {"prompt": prompt, "generate_kwargs": {"max_new_tokens": 8}}),
                        422, "context_length_exceeded", "prompt")
    assert str(CONTEXT) in body["detail"]
    # "hole" cuts the prompt from the left instead of refusing it
    response = post(f"{tiny_server.url}/chat", {"prompt": prompt, "handle_long_generation": "hole",
                                               "generate_kwargs": {"max_new_tokens": 2}})
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["prompt_tokens"] + 2 <= CONTEXT and details["truncated_prompt_tokens"] > 0
    assert_serves(tiny_server.url)


@pytest.mark.parametrize("temperature", [0, 0.0])
def test_temperature_zero_means_greedy(tiny_server, temperature: float) -> None:
    """transformers 5 raises on temperature 0 with sampling (KServe's Hugging Face server wedged on it)."""
    response = post(f"{tiny_server.url}/chat", ask(temperature=temperature, do_sample=True, max_new_tokens=6))
    assert response.status_code == 200, response.text
    greedy = post(f"{tiny_server.url}/chat", ask(do_sample=False, max_new_tokens=6))
    assert response.json()["Result"] == greedy.json()["Result"]


# Values of the right type and sign that are extreme enough to overflow float32 inside the logits processors.
# The server may serve them (e.g. a tiny temperature as greedy, as vLLM does) or refuse them naming the field;
# a 5xx means a client's numbers reached the model unchecked (and, in a shared batch, failed other clients' requests).
EXTREME_CASES = [
    ("temperature-tiny", "temperature", ask(temperature=1e-300)),
    ("temperature-subnormal", "temperature", ask(temperature=5e-324)),
    ("temperature-huge", "temperature", ask(temperature=1e308)),
    # above float32's range the temperature becomes inf, and a banned token's -inf / inf is NaN
    ("temperature-above-float32-with-banned-word", "temperature", ask(temperature=1e39, bad_words_ids=[[5]])),
    ("temperature-above-float32-with-min-new-tokens", "temperature", ask(temperature=1e39, min_new_tokens=2)),
    ("repetition-penalty-tiny", "repetition_penalty", ask(repetition_penalty=1e-300)),
    ("repetition-penalty-huge", "repetition_penalty", ask(repetition_penalty=1e308)),
    ("top-p-subnormal", "top_p", ask(top_p=5e-324)),
    ("typical-p-subnormal", "typical_p", ask(typical_p=5e-324)),
    ("beam-length-penalty-huge", "length_penalty", ask(num_beams=2, do_sample=False, length_penalty=1e308)),
    ("beam-length-penalty-very-negative", "length_penalty", ask(num_beams=2, do_sample=False,
                                                                length_penalty=-1e308)),
    ("beam-sampling-temperature-tiny", "temperature", ask(num_beams=2, do_sample=True, temperature=1e-300)),
    ("diversity-penalty-huge", "diversity_penalty", ask(num_beams=4, num_beam_groups=2, do_sample=False,
                                                        diversity_penalty=1e308)),
    ("no-repeat-ngram-huge", "no_repeat_ngram_size", ask(no_repeat_ngram_size=10**9)),
    ("top-k-huge", "top_k", ask(top_k=10**12)),
]


@pytest.mark.parametrize("param,payload", [case[1:] for case in EXTREME_CASES], ids=[c[0] for c in EXTREME_CASES])
def test_extreme_values_are_served_or_refused_never_a_server_error(tiny_server, param: str, payload: dict) -> None:
    response = post(f"{tiny_server.url}/chat", payload)
    assert response.status_code in (200, 400), response.text[:500]
    if response.status_code == 400:
        assert_error(response, 400, "invalid_request", f"generate_kwargs.{param}")
    assert_serves(tiny_server.url)  # also resets the engine's failure count if the case above broke a step


def test_union_typed_fields_name_the_field_not_the_union_branch(tiny_server) -> None:
    for name, value in (("eos_token_id", "x"), ("forced_eos_token_id", "x"), ("early_stopping", "sometimes")):
        assert_error(post(f"{tiny_server.url}/chat", ask(**{name: value})), 400, "invalid_request",
                     f"generate_kwargs.{name}")


def test_body_over_the_limit_is_refused_before_parsing(tiny_server) -> None:
    """2 MiB default limit. The body is not even JSON: a 413 (not a 400) shows it was refused before parsing."""
    too_big = b"{" + b"x" * (2 * 1024 * 1024) + b"}"
    for path in ("/chat", f"/v1/models/{tiny_server.model_name}:predict"):
        assert_error(post(tiny_server.url + path, too_big), 413, "body_too_large")

        def chunks():  # no Content-Length: the server has to count what it reads
            for start in range(0, len(too_big), 64 * 1024):
                yield too_big[start:start + 64 * 1024]

        response = httpx.post(tiny_server.url + path, content=chunks(), timeout=60,
                              headers={"Content-Type": "application/json"})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "body_too_large")
    assert_serves(tiny_server.url)


def test_declared_oversized_body_is_refused_without_reading_it(tiny_server) -> None:
    """A Content-Length over the limit is answered at once: the server does not wait for a gigabyte to arrive."""
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=15) as sock:
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{\"prompt\": ")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)  # times out (failing the test) if the server waits for the body
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_body_under_the_limit_without_content_length_is_served(tiny_server) -> None:
    response = httpx.post(f"{tiny_server.url}/chat", content=iter([encode(NORMAL)]), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
