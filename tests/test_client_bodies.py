"""The request bodies that benchmark and agent clients send on their defaults, exactly as their sources build them,
against a server on the tiny Falcon: each is served, and what each client reads from the answer is there.

The bodies were copied from each client's request-building code:

- guidellm 0.8.1 (``backends/openai/request_handlers.py``): streamed, ``stream_options`` with
  ``continuous_usage_stats``, ``"stop": null``, ``ignore_eos``, ``max_completion_tokens`` (chat) or ``max_tokens``
  (text), chat content as a list of text parts. It reads the text of each chunk and the last ``usage`` it saw.
- ``vllm bench serve`` (``vllm/benchmarks/lib/endpoint_request_func.py``): completions with
  ``repetition_penalty: 1.0`` and ``"logprobs": null``; chat with text parts and ``max_completion_tokens``; both
  ``stream_options.include_usage`` and (``--ignore-eos``) ``ignore_eos``, and an ``x-request-id`` header. It reads
  ``usage`` only from a chunk whose ``choices`` is empty.
- kubernetes-sigs inference-perf (``inference_perf/apis/completion.py``): ``ignore_eos`` always sent (false unless
  configured), ``stream_options`` only when streaming.
- NVIDIA aiperf (``src/aiperf/endpoints/openai_chat.py``, ``openai_completions.py``): chat with
  ``max_completion_tokens`` and ``stream_options.include_usage``; completions with ``prompt`` as a list. It tells
  a chunk's shape by its ``object`` and drops a body without one.
- LiteLLM (its ``hosted_vllm`` provider): plain bodies; run below where it is installed.
- lm-evaluation-harness: its bodies are in tests/test_openai_prompts.py; its ``until`` lists may be longer than
  OpenAI's 4 stop strings (here a list of 6).
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

PROMPT = "Once upon a time there was"


def post(server, route: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=headers, timeout=60)


def events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of a server-sent event stream, up to ``[DONE]`` (which must end it)."""
    assert response.status_code == 200, response.text
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def guidellm_chat(model: str, tokens: int) -> dict:
    return {"model": model, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": tokens, "stop": None, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]}


def guidellm_text(model: str, tokens: int) -> dict:
    return {"model": model, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": tokens, "stop": None, "ignore_eos": True, "prompt": PROMPT}


@pytest.mark.parametrize("body", [guidellm_chat, guidellm_text], ids=["chat", "text"])
def test_guidellm_bodies_get_usage_on_every_chunk_and_every_token_asked(any_server, body) -> None:
    route = "chat/completions" if body is guidellm_chat else "completions"
    chunks = events(post(any_server, route, body(any_server.model_name, 12)))
    with_text = [chunk for chunk in chunks if chunk["choices"]]
    assert all("usage" in chunk for chunk in chunks), "continuous_usage_stats puts the usage on every chunk"
    counts = [chunk["usage"]["completion_tokens"] for chunk in with_text]
    assert counts == sorted(counts) and counts[-1] == 12  # ignore_eos: as many tokens as asked, counted as they come
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(chunk["object"].endswith("chunk") or chunk["object"] == "text_completion" for chunk in chunks)


def test_vllm_bench_serve_bodies_are_served_with_the_usage_chunk_it_reads(tiny_server) -> None:
    model = tiny_server.model_name
    completions = {"model": model, "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 10, "logprobs": None,
                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
            "max_completion_tokens": 10, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    for route, body in (("completions", completions), ("chat/completions", chat)):
        response = post(tiny_server, route, body, headers={"x-request-id": "bench-0-42"})
        assert response.headers["x-request-id"] == "bench-0-42"
        chunks = events(response)
        assert all("usage" not in chunk for chunk in chunks[:-1])  # only the last one, as OpenAI's
        usage = next(chunk["usage"] for chunk in chunks if not chunk["choices"])  # vLLM's reader: choices == []
        assert usage["completion_tokens"] == 10, (route, usage)


def test_inference_perf_bodies_streamed_and_not(tiny_server) -> None:
    model = tiny_server.model_name
    whole = post(tiny_server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "ignore_eos": False,
                                              "stream": False})
    assert whole.status_code == 200, whole.text
    assert whole.json()["object"] == "text_completion" and whole.json()["usage"]["prompt_tokens"] > 0
    streamed = events(post(tiny_server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                        "ignore_eos": True, "stream": True,
                                                        "stream_options": {"include_usage": True}}))
    assert streamed[-1]["usage"]["completion_tokens"] == 8


def test_stop_lists_longer_than_openais_four_and_nulls_inside_objects(tiny_server) -> None:
    model = tiny_server.model_name
    stops = ["\n\n", "</s>", "<|im_end|>", "Question:", "Q:", "\n"]  # an lm-eval task's until list
    response = post(tiny_server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "stop": stops,
                                                 "temperature": 0, "logprobs": None, "seed": None})
    assert response.status_code == 200, response.text
    assert not any(stop in response.json()["choices"][0]["text"] for stop in stops)
    nested = post(tiny_server, "chat/completions", {
        "model": model, "max_tokens": 4, "response_format": None,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": None},
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}], "name": None}]})
    assert events(nested)[-1]["usage"]["completion_tokens"] >= 1
    too_many = post(tiny_server, "completions", {"model": model, "prompt": PROMPT, "stop": ["x"] * 65})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "stop", too_many.text
    unknown = post(tiny_server, "completions", {"model": model, "prompt": PROMPT, "max_tokenz": 3})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "max_tokenz", unknown.text
    assert unknown.json()["object"] == "error"


def test_include_stop_str_in_output_keeps_the_stop_that_ended_the_text(tiny_server) -> None:
    model = tiny_server.model_name
    base = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = post(tiny_server, "completions", base).json()["choices"][0]["text"]
    stop = text.strip()[2:4]  # a piece from the middle of the greedy answer
    assert stop and stop in text
    cut = post(tiny_server, "completions", {**base, "stop": [stop]}).json()["choices"][0]
    kept = post(tiny_server, "completions", {**base, "stop": [stop], "include_stop_str_in_output": True})
    kept_streamed = events(post(tiny_server, "completions", {**base, "stop": [stop], "stream": True,
                                                             "include_stop_str_in_output": True}))
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    assert kept.json()["choices"][0]["text"] == text[:text.index(stop) + len(stop)]
    assert "".join(c["choices"][0]["text"] for c in kept_streamed if c["choices"]) == kept.json()["choices"][0]["text"]


def test_skip_special_tokens_false_writes_special_tokens_into_the_text(tiny_server) -> None:
    model = tiny_server.model_name
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": ">>TITLE<<"}, timeout=30).json()["tokens"]
    assert len(ids) == 1
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "logit_bias": {str(ids[0]): 100}}
    skipped = post(tiny_server, "completions", body).json()["choices"][0]["text"]
    written = post(tiny_server, "completions", {**body, "skip_special_tokens": False}).json()["choices"][0]["text"]
    assert ">>TITLE<<" not in skipped and written == ">>TITLE<<" * 2


def test_model_cards_name_their_root_and_context(tiny_server) -> None:
    cards = httpx.get(f"{tiny_server.url}/v1/models", timeout=30).json()["data"]
    base = next(card for card in cards if card["id"] == tiny_server.model_name)
    assert base["root"] == tiny_server.model_name and base["parent"] is None
    assert base["max_model_len"] == 2048 and base["object"] == "model"


def test_lm_evals_remote_tokenizer_reads_tokenizer_info(tiny_server, tiny_dir) -> None:
    """lm-eval's RemoteTokenizer: GET /tokenizer_info for the special tokens and the chat template it renders
    conversations with, POST /tokenize {"prompt", "add_special_tokens": false} to encode."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    info = httpx.get(f"{tiny_server.url}/tokenizer_info", timeout=30).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert info["eos_token"] == tokenizer.eos_token == "<|endoftext|>" and info["model_max_length"] == 2048
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = ImmutableSandboxedEnvironment().from_string(info["chat_template"]).render(
        messages=messages, add_generation_prompt=True)
    served = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == served  # the server's own conversation
    encoded = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "test", "add_special_tokens": False},
                         timeout=30).json()
    assert encoded["tokens"] == tokenizer("test", add_special_tokens=False)["input_ids"]


def test_cached_tokens_report_the_prefix_cache_in_both_apis(tiny_server) -> None:
    model = tiny_server.model_name
    prefix = f"{uuid.uuid4().hex} " + "The same long system prompt, sent again and again. " * 8
    chat = {"model": model, "max_tokens": 2, "messages": [{"role": "system", "content": prefix},
                                                          {"role": "user", "content": "Hi"}]}
    first = post(tiny_server, "chat/completions", chat).json()["usage"]
    again = post(tiny_server, "chat/completions", chat).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 32 <= cached < again["prompt_tokens"] and cached % 16 == 0  # whole blocks of the prefix index
    streamed = events(post(tiny_server, "chat/completions", {**chat, "stream": True,
                                                             "stream_options": {"include_usage": True}}))
    assert streamed[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    response = post(tiny_server, "responses", {"model": model, "instructions": prefix, "input": "Hi",
                                               "max_output_tokens": 2}).json()
    assert response["usage"]["input_tokens_details"]["cached_tokens"] >= 32


def test_litellm_on_its_defaults(tiny_server, monkeypatch) -> None:
    """LiteLLM's hosted_vllm provider (and its openai one) send plain bodies: answered, streamed, and with tools."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    litellm = pytest.importorskip("litellm")
    kwargs = dict(model=f"hosted_vllm/{tiny_server.model_name}", api_base=f"{tiny_server.url}/v1", api_key="-",
                  messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert litellm.completion(**kwargs).usage.completion_tokens >= 1
    assert "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**kwargs, stream=True)
                   if chunk.choices)
    tool = {"type": "function", "function": {"name": "ok", "parameters": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}
    called = litellm.completion(**{**kwargs, "max_tokens": 40}, tools=[tool], tool_choice="required",
                                parallel_tool_calls=False)
    assert called.choices[0].message.tool_calls[0].function.name == "ok"


def test_aiperf_bodies_and_the_object_it_reads_on_every_chunk(tiny_server) -> None:
    model = tiny_server.model_name
    chat = events(post(tiny_server, "chat/completions", {
        "messages": [{"role": "user", "content": PROMPT}], "model": model, "stream": True,
        "max_completion_tokens": 6, "stream_options": {"include_usage": True}}))
    assert {chunk["object"] for chunk in chat} == {"chat.completion.chunk"}
    assert chat[-1]["usage"]["completion_tokens"] >= 1
    completions = events(post(tiny_server, "completions", {"prompt": [PROMPT], "model": model, "stream": True,
                                                          "max_tokens": 6}))
    assert {chunk["object"] for chunk in completions} == {"text_completion"}
    whole = post(tiny_server, "chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "model": model,
                                                  "stream": False, "max_completion_tokens": 6}).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] is not None
