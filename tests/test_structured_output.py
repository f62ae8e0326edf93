"""Structured output: ``response_format`` masks every token that would leave the JSON schema, so even the tiny
random-weight Falcon answers JSON that parses and validates."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "digit": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
          "required": ["ok", "digit"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", max_retries=0, timeout=60)


def json_schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_json_schema_answer_validates_against_it(client, tiny_server, temperature):
    for seed in range(3):
        completion = client.chat.completions.create(
            model=tiny_server.model_name, messages=MESSAGES, max_tokens=40, temperature=temperature, seed=seed,
            response_format=json_schema_format())
        choice = completion.choices[0]
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"


def test_without_the_schema_the_model_writes_no_json(client, tiny_server):
    text = client.chat.completions.create(model=tiny_server.model_name, messages=MESSAGES, max_tokens=20,
                                          temperature=0).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_and_streaming_and_several_choices(client, tiny_server):
    model = tiny_server.model_name
    # The tiny model would fill an object with noise until max_tokens: a bias on "}" lets it close the object.
    brace = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "}"}, timeout=10).json()["tokens"]
    text = client.completions.create(model=model, prompt="JSON:", max_tokens=20, temperature=0,
                                     logit_bias={str(t): 50 for t in brace},
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0].text
    assert isinstance(json.loads(text), dict)

    chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=1.0, n=3,
                                            seed=1, stream=True, response_format=json_schema_format())
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("response_format, fragment", [
    (json_schema_format({"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "response_format"),
])
def test_a_schema_that_cannot_compile_is_a_400_saying_why(client, tiny_server, response_format, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=tiny_server.model_name, messages=MESSAGES, max_tokens=4,
                                       response_format=response_format)
    assert caught.value.body["param"].startswith("response_format") and fragment in caught.value.body["message"]
