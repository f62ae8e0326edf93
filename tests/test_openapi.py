"""The OpenAPI document names exactly the fields each route's parser accepts, lists the error responses, and
schemathesis finds no server error and no response off the document when it fuzzes the bodies against a server on
the tiny Falcon."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from predictor.api.chat.schema import parse_chat_request
from predictor.api.openai.responses import ResponsesRequest
from predictor.api.openai.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_openai_request,
)
from predictor.errors import PredictorError, UnknownParameter

# Each documented body's route, its parser, and a body the parser reads with every required field present.
PARSERS = {
    "/v1/completions": (lambda body: parse_openai_request(body, CompletionRequest), {"model": "m", "prompt": "a"}),
    "/v1/chat/completions": (lambda body: parse_openai_request(body, ChatCompletionRequest),
                             {"model": "m", "messages": [{"role": "user", "content": "a"}]}),
    "/v1/responses": (lambda body: parse_openai_request(body, ResponsesRequest), {"model": "m", "input": "a"}),
    "/tokenize": (lambda body: parse_openai_request(body, TokenizeRequest), {"prompt": "a"}),
    "/detokenize": (lambda body: parse_openai_request(body, DetokenizeRequest), {"tokens": [1]}),
    "/chat": (parse_chat_request, {"prompt": "a"}),
}


@pytest.fixture(scope="module")
def document(tiny_server) -> dict:
    return httpx.get(f"{tiny_server.url}/openapi.json", timeout=30).json()


def accepts_field(parse, base: dict, name: str, value: object = "\x01-not-a-value") -> bool:
    """Whether ``parse`` knows the top-level field ``name`` (a wrong value for it is a 400 of another kind)."""
    try:
        parse({**base, name: value})
    except UnknownParameter as exc:
        return exc.param != name and not (exc.param or "").startswith(f"{name}.")
    except PredictorError:
        return True
    return True


@pytest.mark.parametrize("path", sorted(PARSERS))
def test_each_documented_body_names_exactly_the_fields_its_parser_accepts(document, path) -> None:
    parse, base = PARSERS[path]
    operation = document["paths"][path]["post"]
    properties = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    documented = set(properties)
    assert set(base) <= documented
    undocumented = [name for name, schema in properties.items()
                    if not accepts_field(parse, base, name, *schema.get("enum", ())[:1])]
    assert not undocumented, f"documented but refused by the parser: {undocumented}"
    for name in ("max_tokenz", "x", "prompt_template"):  # names no client sends: a 400 naming them
        assert name in documented or not accepts_field(parse, base, name), name
    assert {"400", "404", "503"} <= set(operation["responses"]), operation["responses"].keys()


def test_a_field_the_parser_accepts_is_documented(document) -> None:
    """The reverse: a field the models accept without being in the document would show here (every model field,
    by its wire name, is in the schema)."""
    for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
                        ("/v1/responses", ResponsesRequest)):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        wire_names = {field.alias or name for name, field in model.model_fields.items()}
        assert wire_names <= set(schema["properties"]), wire_names - set(schema["properties"])
    referenced = {"ChatMessage", "Tool", "ResponseFormat", "InputMessage", "GenerateKwargs"}
    assert referenced <= set(document["components"]["schemas"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(start_server, tiny_dir,
                                                                              tmp_path) -> None:
    if shutil.which("schemathesis") is None:
        pytest.skip("schemathesis is not installed")
    # A few new tokens per request: the fuzzer's bodies ask for whatever they like, and each is answered quickly.
    server = start_server(tiny_dir, "--max_new_tokens", "8")
    run = subprocess.run(
        ["schemathesis", "run", f"{server.url}/openapi.json", "--checks",
         "not_a_server_error,status_code_conformance,response_schema_conformance", "--max-examples", "10",
         "--include-path-regex", "^/(v1/(completions|chat/completions|responses)|tokenize|detokenize|chat)$",
         "--request-timeout", "60", "--generation-deterministic", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)  # its cache of examples stays out of the tree
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert server.stop() == 0
