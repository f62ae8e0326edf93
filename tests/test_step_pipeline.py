"""The one-step-ahead decode loop neither leaks nor mis-counts, over HTTP on both tiny Falcons: a step is launched
before the previous step's tokens are read back, so a sequence that ended (stop string, eos, its length) is still in
the step already launched; none of that step's token may reach the client or its token counts."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Once upon a time"
# A stop string each greedy tiny model completes mid-generation (with the token given, 1-based), found in their
# 24-token greedy output; ``test_the_stop_strings_are_reached_mid_generation`` keeps these true.
STOPS = {"tiny-falcon": (" ex", 10), "tiny-falcon-40b": (" then", 8)}


def sse_payloads(response: httpx.Response) -> list:
    assert response.status_code == 200, response.read()
    lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def chat(server, stream: bool, **generate_kwargs):
    body = {"prompt": PROMPT, "return_full_text": False, "stream": stream,
            "generate_kwargs": {"do_sample": False, **generate_kwargs}}
    with httpx.stream("POST", f"{server.url}/chat", json=body, timeout=60) as response:
        if stream:
            return sse_payloads(response)
        response.read()
        assert response.status_code == 200, response.text
        return response.json()


def complete(server, stream: bool, **fields):
    body = {"model": server.model_name, "prompt": PROMPT, "temperature": 0, "stream": stream, **fields}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        if stream:
            chunks = sse_payloads(response)
            text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
            reasons = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]]
            return text, [r for r in reasons if r], chunks[-1]["usage"]["completion_tokens"]
        response.read()
        assert response.status_code == 200, response.text
        answer = response.json()
        return answer["choices"][0]["text"], [answer["choices"][0]["finish_reason"]], answer["usage"][
            "completion_tokens"]


def greedy_tokens(server, n: int = 24) -> list[dict]:
    """The streamed token events of the plain greedy answer: each has the token id and the text it completes."""
    events = chat(server, stream=True, max_new_tokens=n, min_new_tokens=n)
    return [e for e in events[:-1] if "token_id" in e]


def test_the_stop_strings_are_reached_mid_generation(any_server):
    stop, at = STOPS[any_server.model_name]
    texts = [e["text"] for e in greedy_tokens(any_server)]
    assert stop not in "".join(texts[:at - 1]) and stop in "".join(texts[:at]) and at < len(texts)


# -- (a) no text past a stop string --------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_ends_with_its_stop_string_and_counts_its_tokens(any_server, stream):
    stop, at = STOPS[any_server.model_name]
    whole = "".join(e["text"] for e in greedy_tokens(any_server))
    expected = whole[:whole.find(stop) + len(stop)]  # transformers' stop_strings: the stop stays in the text
    answer = chat(any_server, stream, max_new_tokens=24, stop_strings=[stop])
    if stream:
        tokens, answer = [e for e in answer[:-1] if "token_id" in e], answer[-1]
        assert "".join(e["text"] for e in tokens) == expected and len(tokens) == at
        assert [e.get("finish_reason") for e in tokens] == [None] * (at - 1) + ["stop"]
    assert answer["Result"] == expected
    assert answer["details"]["generated_tokens"] == [at] and answer["details"]["finish_reasons"] == ["stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_text_stops_before_its_stop_string(any_server, stream):
    stop, at = STOPS[any_server.model_name]
    whole, _, _ = complete(any_server, False, max_tokens=24)
    text, reasons, completion_tokens = complete(any_server, stream, max_tokens=24, stop=[stop])
    assert text == whole[:whole.find(stop)]  # OpenAI's stop: cut before it, nothing after
    assert reasons == ["stop"] and completion_tokens == at  # the token that completed the stop was generated


# -- (b) exactly max_new_tokens ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_max_new_tokens_gives_exactly_that_many(any_server, n, stream):
    greedy = greedy_tokens(any_server)
    answer = chat(any_server, stream, max_new_tokens=n)
    if stream:
        tokens, answer = [e for e in answer[:-1] if "token_id" in e], answer[-1]
        assert [e["token_id"] for e in tokens] == [e["token_id"] for e in greedy[:n]]
        assert tokens[-1]["finish_reason"] == "length"
    assert answer["details"]["generated_tokens"] == [n] and answer["details"]["finish_reasons"] == ["length"]
    text, reasons, completion_tokens = complete(any_server, stream, max_tokens=n)
    assert (reasons, completion_tokens) == (["length"], n)
    assert text == complete(any_server, False, max_tokens=24)[0][:len(text)]


# -- (c) eos ends exactly there --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_eos_the_greedy_answer_reaches_ends_it_there(any_server, stream):
    ids = [e["token_id"] for e in greedy_tokens(any_server)]
    at = next(i for i in range(4, len(ids)) if ids[i] not in ids[:i])  # its first appearance, mid-generation
    answer = chat(any_server, stream, max_new_tokens=24, eos_token_id=ids[at])
    if stream:
        tokens, answer = [e for e in answer[:-1] if "token_id" in e], answer[-1]
        assert [e["token_id"] for e in tokens] == ids[:at + 1] and tokens[-1]["finish_reason"] == "stop"
    assert answer["details"]["generated_tokens"] == [at + 1] and answer["details"]["finish_reasons"] == ["stop"]


# -- (d) a client that goes away frees its row -----------------------------------------------------------------------
def running_sequences(server) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "falcon_running_sequences":
                return sample.value
    raise AssertionError("no falcon_running_sequences gauge in /metrics")


@pytest.mark.parametrize("path, body", [
    ("/chat", {"prompt": PROMPT, "stream": True, "generate_kwargs": {"max_new_tokens": 1500, "min_new_tokens": 1500}}),
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "max_tokens": 1500, "min_tokens": 1500}),
])
def test_a_stream_whose_client_goes_away_leaves_the_running_batch(any_server, path, body):
    if path.startswith("/v1"):
        body = {**body, "model": any_server.model_name}
    with httpx.stream("POST", f"{any_server.url}{path}", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert running_sequences(any_server) == 1  # it is decoding now
    deadline = time.monotonic() + 20
    while running_sequences(any_server) != 0:
        assert time.monotonic() < deadline, "a cancelled stream's row stayed in the running batch"
        time.sleep(0.05)


# -- other tokenizer kinds, in process -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wordlevel", "unigram"])
def test_a_stop_string_ends_the_sequence_at_its_token_on_other_tokenizers(tmp_path_factory, kind):
    """The stop-string check runs one step behind the device on every tokenizer kind (a word-level one is matched on
    the decoded text): the sequence keeps exactly the tokens up to the one that completed the stop, while a neighbour
    without a stop keeps the batch stepping past it."""
    from generation import generated, make_job, reserved_engine, run

    from predictor.tiny import build_tiny_falcon

    engine = reserved_engine(build_tiny_falcon(tmp_path_factory.mktemp(kind), "7b", tokenizer=kind), rows=4)
    prompt, steady = "Once upon a time", dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
    ids = generated(run(engine, [make_job(engine, prompt, **steady)])[0])[0]
    at, stop = next((k, engine.decode([ids[k]]).strip()) for k in range(3, len(ids) - 2)
                    if engine.decode([ids[k]]).strip()
                    and engine.decode([ids[k]]).strip() not in engine.decode(ids[:k])
                    and engine.decode([ids[k]]).strip() in engine.decode(ids[:k + 1]))
    stopped, neighbour = run(engine, [make_job(engine, prompt, do_sample=False, max_new_tokens=20, stop_strings=[stop]),
                                      make_job(engine, "Hello", **steady)])
    assert generated(stopped) == [ids[:at + 1]] and stopped.sequences[0].finish_reason == "stop"
    assert len(generated(neighbour)[0]) == 20


# -- (e) the clients' work overlaps the device's ----------------------------------------------------------------------
@pytest.mark.parametrize("accelerator", [True, False], ids=["accelerator", "cpu"])
def test_a_tokens_event_goes_to_its_client_while_the_host_waits_for_the_device(tiny_dir, monkeypatch, accelerator):
    """On an accelerator, the events of the tokens a step read back are handed to the event loop by the next step,
    once it has launched its work and just before it waits for the device: the clients' Python (detokenizing,
    writing to sockets) runs while the device computes, not between the host's launches. On the CPU, where the next
    forward is the host's own computing, they go as soon as they are made. Every event comes before the answer."""
    import asyncio

    from generation import make_job, reserved_engine

    from predictor.engine.scheduling import decoding
    from predictor.engine.scheduling.batcher import Batcher

    engine = reserved_engine(tiny_dir, rows=4)
    log: list[str] = []
    step, read_back, emit_all = engine.step, decoding.DecodeBatch._read_back, decoding.emit_all
    monkeypatch.setattr(engine, "step", lambda *args, **kwargs: (log.append("launch"), step(*args, **kwargs))[1])
    monkeypatch.setattr(decoding.DecodeBatch, "_read_back",
                        lambda batch, tokens: (log.append("wait"), read_back(batch, tokens))[1])
    monkeypatch.setattr(decoding, "emit_all", lambda events: (log.append("events"), emit_all(events))[1])

    async def stream() -> tuple[list[int], list[int]]:
        batcher = Batcher(engine, max_batch_size=4)
        assert batcher._batch.hold_events is False  # the engine is on the CPU
        batcher._batch.hold_events = accelerator
        batcher.start()
        ticket = batcher.submit(make_job(engine, PROMPT, do_sample=False, max_new_tokens=6, min_new_tokens=6),
                                stream=True)
        tokens = [event.token_id async for event in ticket.events()]
        result = await ticket.result()
        batcher.close()
        return tokens, list(result.sequences[0].token_ids)

    tokens, answered = asyncio.run(stream())
    assert tokens == answered and len(tokens) == 6
    if accelerator:  # the prompt's step; the second token's step reads the first back; four steps each hand over
        # the token read back before, then wait; the last read-back, and the last token's event before the answer
        assert log == ["launch"] + ["launch", "wait"] + ["launch", "events", "wait"] * 4 + ["events", "wait", "events"]
    else:  # each token's event as soon as it is read back
        assert log == ["launch"] + ["launch", "wait", "events"] * 5 + ["wait", "events"]
