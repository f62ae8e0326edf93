"""Tool calling on chat completions, through the grammar, driven by the openai SDK and LangChain against a server on
the tiny Falcon: forced and named calls whose arguments match the function's schema, ``auto`` answering in text or
with calls, ``none``, parallel calls, streaming as ``delta.tool_calls``, and results sent back as ``tool`` turns.

The tiny model's weights are random: the grammar alone makes its answers calls of the right shape, so the
parameters here are enums and booleans, which a call completes in a few tokens."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from predictor.api.openai.tools import Tool, calls_schema, closed_objects, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    city: Literal["Paris", "Oslo"]
    sunny: bool


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", max_retries=0, timeout=60)


def ask(client, model, max_tokens=60, **kwargs):
    return client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=max_tokens, **kwargs)


def test_the_calls_schema_and_parsing_without_a_model() -> None:
    tools = [Tool.model_validate(WEATHER), Tool.model_validate(TIME)]
    schema = calls_schema(tools, parallel=False)
    assert calls_schema(tools, parallel=True)["maxItems"] == 8
    assert schema["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == [
        "get_weather", "get_time"]
    calls = parse_tool_calls('[{"name":"get_time","arguments":{"utc":true}}]')
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_time", "arguments": '{"utc":true}'}
    assert parse_tool_calls("[1, 2") is None and parse_tool_calls("Hello [x]") is None


def test_argument_objects_that_say_nothing_of_other_keys_take_only_their_properties() -> None:
    """LiteLLM strips additionalProperties: false from the tools it sends; a weak model given an open object writes
    invented keys until max_tokens, and the call comes back as text."""
    sent = {"type": "object", "properties": {"ok": {"type": "boolean"}, "where": {
        "type": "array", "items": {"type": "object", "properties": {"city": {"type": "string"}}}}}, "required": ["ok"]}
    closed = closed_objects(sent)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["where"]["items"]["additionalProperties"] is False
    arguments = calls_schema([Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": sent}})],
                             parallel=False)["items"]["properties"]["arguments"]
    assert arguments == closed and "additionalProperties" not in sent  # the request's own schema is not changed
    said = [{"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
            {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x-": {}}},
            {"type": "object", "properties": {"a": {}}, "allOf": [{"properties": {"b": {}}}]},
            {"type": "object"}, {"enum": [{"properties": {}}]}, {"not": {"properties": {"a": {}}}}]
    assert [closed_objects(schema) for schema in said] == said
    named = closed_objects({"$defs": {"P": {"properties": {"properties": {"properties": {"x": {}}}}}}})
    assert named["$defs"]["P"]["properties"]["properties"]["additionalProperties"] is False


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_choices_force_a_call_matching_the_schema(client, tiny_server, choice) -> None:
    answer = ask(client, tiny_server.model_name, tools=[WEATHER, TIME], tool_choice=choice,
                 parallel_tool_calls=False)
    choice_ = answer.choices[0]
    assert choice_.finish_reason == "tool_calls" and choice_.message.content is None
    [call] = choice_.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_time" and isinstance(arguments["utc"], bool)
    else:
        assert (call.function.name, list(arguments)) in (("get_weather", ["city"]), ("get_time", ["utc"]))


def test_auto_lets_the_model_answer_in_text_or_call_and_none_never_calls(client, tiny_server) -> None:
    model = tiny_server.model_name
    bracket = str(httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "["}).json()["tokens"][0])
    called = ask(client, model, tools=[WEATHER], logit_bias={bracket: 100})  # the model "chooses" to call
    assert called.choices[0].finish_reason == "tool_calls"
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    text = ask(client, model, tools=[WEATHER], tool_choice="auto", logit_bias={bracket: -100}, max_tokens=8)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    none = ask(client, model, tools=[WEATHER], tool_choice="none", logit_bias={bracket: 100}, max_tokens=4)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content.startswith("[")


def test_parallel_calls_and_streamed_tool_calls_agree_with_the_whole_answer(any_server) -> None:
    client = openai.OpenAI(base_url=f"{any_server.url}/v1", api_key="-", max_retries=0, timeout=60)
    kwargs = dict(model=any_server.model_name, messages=ASK, temperature=0, max_tokens=160, tools=[WEATHER, TIME],
                  tool_choice="required")  # 8 calls at most (MAX_PARALLEL_CALLS), of about 15 tokens each
    whole = client.chat.completions.create(**kwargs)
    calls = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and len(calls) >= 1
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not chunk.choices[0].delta.content for chunk in chunks if chunk.choices)


def test_a_tool_result_sent_back_is_rendered_and_answered(client, tiny_server) -> None:
    first = ask(client, tiny_server.model_name, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    tokenized = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": messages}).json()
    rendered = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert f"Assistant: [{{\"name\":\"get_weather\",\"arguments\":{call.function.arguments}}}]" in rendered
    assert rendered.endswith("Tool: sunny, 21 C\n\nAssistant:")
    answer = client.chat.completions.create(model=tiny_server.model_name, messages=messages, tools=[WEATHER],
                                            tool_choice="none", max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_tool_requests_that_cannot_be_served_are_400s_naming_the_field(tiny_server) -> None:
    def post(**body):
        return httpx.post(f"{tiny_server.url}/v1/chat/completions",
                          json={"model": tiny_server.model_name, "messages": ASK, **body}, timeout=30)

    cases = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
             ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
             ({"functions": [WEATHER["function"]]}, "functions"),
             ({"messages": [{"role": "assistant"}]}, "messages")]
    for body, param in cases:
        response = post(**body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"].startswith(param), (body, response.text)


def test_openai_sdk_parse_with_a_pydantic_tool(client, tiny_server) -> None:
    answer = client.chat.completions.parse(model=tiny_server.model_name, messages=ASK, temperature=0,
                                           max_tokens=60, tools=[openai.pydantic_function_tool(Weather)],
                                           tool_choice="required")
    parsed = answer.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Weather)


def test_langchain_bind_tools_and_every_structured_output_method(tiny_server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", model=tiny_server.model_name,
                                      temperature=0, max_tokens=60, max_retries=0)
    message = llm.bind_tools([Weather], tool_choice="Weather", strict=True,
                             parallel_tool_calls=False).invoke("Weather in Oslo?")
    assert message.tool_calls[0]["name"] == "Weather"
    assert Weather.model_validate(message.tool_calls[0]["args"])
    streamed = None
    bound = llm.bind_tools([Weather], tool_choice="required", strict=True, parallel_tool_calls=False)
    for chunk in bound.stream("Weather in Oslo?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "Weather" and Weather.model_validate(streamed.tool_calls[0]["args"])
    for method in ("function_calling", "json_schema"):
        assert isinstance(llm.with_structured_output(Weather, method=method, strict=True).invoke("Paris?"), Weather)
    # json_mode asks for any JSON object, which a random model does not end by itself: "}" is made likely
    [close] = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "}"}).json()["tokens"]
    closing = langchain_openai.ChatOpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", model=tiny_server.model_name,
                                          temperature=0, max_tokens=60, max_retries=0, logit_bias={close: 50})
    schema = {"title": "Anything", "type": "object"}
    assert closing.with_structured_output(schema, method="json_mode").invoke("Answer in JSON") == {}


def test_responses_api_calls_tools_and_reads_their_outputs(client, tiny_server) -> None:
    model = tiny_server.model_name
    tool = {"type": "function", **WEATHER["function"]}  # the Responses API's flat shape
    called = client.responses.create(model=model, input="Weather in Paris?", tools=[tool], tool_choice="required",
                                     parallel_tool_calls=False, temperature=0, max_output_tokens=60)
    [item] = called.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
    assert json.loads(item.arguments)["city"] in ("Paris", "Oslo")
    events = list(client.responses.create(model=model, input="Weather in Paris?", tools=[tool], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          parallel_tool_calls=False, temperature=0, max_output_tokens=60))
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == item.arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].type == "function_call"
    answer = client.responses.create(model=model, tools=[tool], tool_choice="none", max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"}, item.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
    assert answer.output[0].type == "message" and answer.status in ("completed", "incomplete")
