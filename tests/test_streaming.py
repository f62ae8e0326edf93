"""Streaming: incremental detokenization, stop strings, the text deltas of a ticket, and /chat's event stream."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from predictor.api.chat.routes import stream_chat
from predictor.api.streaming import IncrementalDecoder, StopMatcher, stream_text
from predictor.engine.options import GenerationJob, GenerationOptions
from predictor.engine.scheduling.tickets import SequenceOutput, Ticket, TokenEvent
from predictor.errors import GenerationFailed

MULTIBYTE = "Grüße, 日本語 and 🙂 emoji"


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def decoder_for(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def continuation(tokenizer, prompt_ids, ids):
    """What the non-streaming answer decodes (``FalconModel.continuation``)."""
    decode = decoder_for(tokenizer)
    return decode(list(prompt_ids) + list(ids))[len(decode(list(prompt_ids))):]


def pieces(tokenizer, prompt_ids, ids):
    decoder = IncrementalDecoder(decoder_for(tokenizer), prompt_ids)
    return [decoder.push(token) for token in ids] + [decoder.flush()]


# -- incremental detokenization ------------------------------------------------------------------------------------
def test_characters_split_over_byte_tokens_come_out_whole(tokenizer):
    prompt_ids = tokenizer.encode("Say:", add_special_tokens=False)
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert len(ids) > len(MULTIBYTE.split())  # the tiny tokenizer spells the non-ASCII characters byte by byte
    out = pieces(tokenizer, prompt_ids, ids)
    assert "".join(out) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in out)
    assert out[-1] == ""  # nothing was left to flush: every character was passed on once complete


def test_an_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    out = pieces(tokenizer, [], ids[:-1])
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == continuation(tokenizer, [], ids[:-1])


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 1023), max_size=40), prompt=st.sampled_from(["", "Hi", MULTIBYTE]))
def test_pieces_add_up_to_the_non_streaming_text(tokenizer, ids, prompt):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert "".join(pieces(tokenizer, prompt_ids, ids)) == continuation(tokenizer, prompt_ids, ids)


# -- stop strings --------------------------------------------------------------------------------------------------
def push_all(matcher, texts):
    out, stopped = [], False
    for text in texts:
        passed, stopped = matcher.push(text)
        out.append(passed)
        if stopped:
            break
    return "".join(out), stopped


def test_a_stop_string_split_over_pieces_is_found_and_cut():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.push("Sure.\nUs") == ("Sure.", False)  # the tail that could begin the stop is held back
    assert matcher.push("er: more") == ("", True)


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.push("a\nU") == ("a", False)
    assert matcher.push("nder") == ("\nUnder", False)
    assert matcher.push("\n") == ("", False)
    assert matcher.flush() == "\n"


def test_the_earliest_of_several_stops_wins():
    assert StopMatcher(["cd", "b"]).push("abcd") == ("a", True)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc\n", max_size=30), stops=st.lists(st.text(alphabet="abc\n", min_size=1,
                                                                           max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
def test_pushing_pieces_cuts_at_the_first_stop_of_the_whole_text(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    texts = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopMatcher(stops)
    out, stopped = push_all(matcher, texts)
    found = [(text.find(stop) + len(stop), text.find(stop)) for stop in stops if stop in text]
    if found:  # the stop completed first wins, whatever the cuts
        assert (out, stopped) == (text[:min(found)[1]], True)
    else:
        assert (out + matcher.flush(), stopped) == (text, False)


# -- the deltas of a ticket ----------------------------------------------------------------------------------------
def fake_model(tokenizer, response=None):
    decode = decoder_for(tokenizer)
    return SimpleNamespace(engine=SimpleNamespace(decode=lambda ids, clean=False, skip_special=True: decode(ids)),
                           to_response=lambda completion: response)


def job_for(prompt_ids, n=1):
    return GenerationJob(prompt_ids=tuple(prompt_ids), options=GenerationOptions(max_new_tokens=64,
                                                                                  num_return_sequences=n),
                         prompt="")


async def deltas_of(model, job, ticket, stops=()):
    job = dataclasses.replace(job, stop_texts=tuple(stops))
    return [delta async for delta in stream_text(model, job, ticket)]


def test_a_stop_string_ends_the_sequence_and_cancels_the_request(tokenizer):
    ids = tokenizer.encode("Fine, thanks.\nUser: and you?", add_special_tokens=False)
    expected_tokens = next(k for k in range(len(ids) + 1) if "\nUser:" in continuation(tokenizer, [], ids[:k]))

    async def run():
        ticket = Ticket(job_for([]), asyncio.get_running_loop(), stream=True, time_budget_s=60)
        for token in ids:  # the engine has not finished: the stream must not wait for it
            ticket.emit(TokenEvent(0, token))
        deltas = await asyncio.wait_for(deltas_of(fake_model(tokenizer), ticket.job, ticket, ["\nUser:"]), 10)
        return deltas, ticket

    deltas, ticket = asyncio.run(run())
    assert "".join(d.text for d in deltas) == "Fine, thanks."
    assert deltas[-1].finish_reason == "stop" and deltas[-1].tokens == expected_tokens
    assert ticket.cancelled


def test_with_several_sequences_only_the_stopped_one_is_cut(tokenizer):
    first = tokenizer.encode("one STOP two", add_special_tokens=False)
    second = tokenizer.encode("three four", add_special_tokens=False)

    async def run():
        ticket = Ticket(job_for([], n=2), asyncio.get_running_loop(), stream=True, time_budget_s=60)
        for i in range(max(len(first), len(second))):
            for index, ids in enumerate((first, second)):
                if i < len(ids):
                    ticket.emit(TokenEvent(index, ids[i], "length" if i == len(ids) - 1 else None))
        return await asyncio.wait_for(deltas_of(fake_model(tokenizer), ticket.job, ticket, ["STOP"]), 10)

    deltas = asyncio.run(run())
    text = {i: "".join(d.text for d in deltas if d.index == i) for i in (0, 1)}
    reasons = {d.index: d.finish_reason for d in deltas if d.finish_reason}
    assert text == {0: "one ", 1: "three four"} and reasons == {0: "stop", 1: "length"}
    assert sum(1 for d in deltas if d.finish_reason) == 2  # nothing after sequence 0 stopped


async def body_of(response) -> list:
    events = [chunk async for chunk in response.body_iterator]
    assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events)
    return [event[len("data: "):-2] for event in events]


def test_chat_stream_sends_each_token_then_the_whole_response(tokenizer):
    ids = tokenizer.encode("ok!", add_special_tokens=False)
    response = {"Result": "ok!", "details": {"finish_reasons": ["length"]}}

    async def run():
        ticket = Ticket(job_for([]), asyncio.get_running_loop(), stream=True, time_budget_s=60)
        for i, token in enumerate(ids):
            ticket.emit(TokenEvent(0, token, "length" if i == len(ids) - 1 else None))
        ticket.resolve([SequenceOutput(tuple(ids), "length")])
        return await body_of(stream_chat(fake_model(tokenizer, response), ticket.job, ticket))

    events = asyncio.run(run())
    assert events[-1] == "[DONE]" and json.loads(events[-2]) == response
    tokens = [json.loads(event) for event in events[:-2]]
    assert [t["token_id"] for t in tokens] == ids and "".join(t["text"] for t in tokens) == "ok!"
    assert tokens[-1]["finish_reason"] == "length"


def test_an_error_mid_stream_is_an_event_then_done(tokenizer):
    async def run():
        ticket = Ticket(job_for([]), asyncio.get_running_loop(), stream=True, time_budget_s=60)
        ticket.emit(TokenEvent(0, tokenizer.encode("a", add_special_tokens=False)[0]))
        ticket.fail(GenerationFailed("the accelerator ran out of memory for this batch"))
        return await body_of(stream_chat(fake_model(tokenizer), ticket.job, ticket))

    events = asyncio.run(run())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {"error": "the accelerator ran out of memory for this batch",
                                      "error_type": "generation_failed", "request_id": "-"}  # outside a request


# -- POST /chat with "stream": true against a server ------------------------------------------------------------
def sse_payloads(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def chat(server, body, stream):
    with httpx.stream("POST", f"{server.url}/chat", json={**body, "stream": stream}, timeout=60) as response:
        if stream:
            return sse_payloads(response)
        response.read()
        assert response.status_code == 200, response.text
        return response.json()


@pytest.mark.parametrize("generate_kwargs", [
    {"do_sample": False, "max_new_tokens": 24},
    {"do_sample": True, "temperature": 0.9, "num_return_sequences": 2, "max_new_tokens": 16},
    {"do_sample": False, "num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 8},
], ids=["greedy", "seeded-sampling", "beams"])
def test_streamed_text_is_the_non_streaming_text(tiny_server, generate_kwargs):
    body = {"prompt": "Once upon a time", "return_full_text": False, "seed": 7, "generate_kwargs": generate_kwargs}
    whole = chat(tiny_server, body, stream=False)
    events = chat(tiny_server, body, stream=True)
    assert events[-1] == whole  # the last event is the non-streaming response
    results = whole["Result"] if isinstance(whole["Result"], list) else [whole["Result"]]
    for index, result in enumerate(results):
        tokens = [e for e in events[:-1] if e["index"] == index]
        assert "".join(e["text"] for e in tokens) == result
        assert tokens[-1]["finish_reason"] == whole["details"]["finish_reasons"][index]


def test_a_bad_streaming_request_is_a_plain_400(tiny_server):
    response = httpx.post(f"{tiny_server.url}/chat", timeout=30,
                          json={"prompt": "hi", "stream": True, "generate_kwargs": {"top_p": 2}})
    assert response.status_code == 400 and response.json()["param"] == "generate_kwargs.top_p"


def cancelled_count(server, route: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "falcon_requests_total" and sample.labels == {"route": route, "outcome": "cancelled"}:
                return sample.value
    return 0.0


@pytest.mark.parametrize("path, body", [
    ("/chat", {"prompt": "Once", "stream": True, "generate_kwargs": {"max_new_tokens": 1500, "min_new_tokens": 1500}}),
    ("/openai/v1/completions", {"prompt": "Once", "stream": True, "max_tokens": 1500}),
])
def test_a_client_that_goes_away_cancels_its_stream(tiny_server, path, body):
    if path.startswith("/openai"):
        body = {**body, "model": tiny_server.model_name}
    before = cancelled_count(tiny_server, path)
    with httpx.stream("POST", f"{tiny_server.url}{path}", json=body, timeout=30) as response:
        assert next(response.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 20
    while cancelled_count(tiny_server, path) == before:
        assert time.monotonic() < deadline, "the stream was not closed after the client went away"
        time.sleep(0.1)
