"""Every tokenizer kind transformers loads is served: byte-level BPE (Falcon's), word-level, WordPiece, and Unigram
with byte fallback (SentencePiece's). Stop strings mean the same on each (generation ends after the token that
completes one); where transformers' matcher cannot read the vocabulary (word-level) they are matched on decoded text.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.stopping_criteria import StopStringCriteria

from predictor.engine.model.runner import _backend_decode
from predictor.engine.model.loading import LoadSpec, load_engine
from predictor.engine.options import GenerationOptions
from predictor.engine.sampling.sampler import (TextStopCriteria, make_sampler, stop_string_criteria, stopped_on_strings,
                                             token_stop_matching_error)
from predictor.tiny import TOKENIZER_KINDS, build_tiny_falcon, build_tokenizer

TEXT = "Return the value of the first argument, or the default when it is missing."
STOPS = ("value", "first argument", "default", "missing.", "the")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    loaded = {}
    for kind in TOKENIZER_KINDS:
        build_tokenizer(root / kind, kind)
        loaded[kind] = AutoTokenizer.from_pretrained(root / kind)
    return loaded


def first_stop(criteria, ids: list[int]) -> int | None:
    """How many tokens of ``ids`` are generated when ``criteria`` ends generation (None: never)."""
    for end in range(1, len(ids) + 1):
        if criteria(torch.tensor([ids[:end]]), None)[0]:
            return end
    return None


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("stop", STOPS)
def test_generation_ends_after_the_token_that_completes_a_stop_string(tokenizers, kind: str, stop: str) -> None:
    tokenizer = tokenizers[kind]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    end = first_stop(stop_string_criteria(tokenizer, (stop,)), ids)
    if stop not in tokenizer.decode(ids):  # a word-level decoder writes "missing ." (or <unk>): never generated
        assert end is None
        return
    assert end is not None, (kind, stop)
    assert stop in tokenizer.decode(ids[:end]) and stop not in tokenizer.decode(ids[:end - 1])


def test_a_word_level_vocabulary_is_matched_on_text_the_others_by_transformers(tokenizers) -> None:
    with pytest.raises(ValueError):  # what broke the batch thread: transformers cannot read this vocabulary
        StopStringCriteria(tokenizers["wordlevel"], ["value"])
    assert token_stop_matching_error(tokenizers["wordlevel"]) is not None
    assert isinstance(stop_string_criteria(tokenizers["wordlevel"], ("value",)), TextStopCriteria)
    for kind in ("bpe", "wordpiece", "unigram"):
        assert token_stop_matching_error(tokenizers[kind]) is None
        assert isinstance(stop_string_criteria(tokenizers[kind], ("value",)), StopStringCriteria)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_text_matching_agrees_with_transformers(tokenizers, kind: str) -> None:
    """Where both can run, the text matcher stops at the same token as transformers' own."""
    tokenizer = tokenizers[kind]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for stop in STOPS:
        assert (first_stop(TextStopCriteria(tokenizer, (stop,)), ids)
                == first_stop(StopStringCriteria(tokenizer, [stop]), ids)), stop


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_a_step_matches_only_the_rows_whose_last_token_can_end_a_stop_string_and_answers_as_the_matcher(
        tokenizers, kind: str, monkeypatch) -> None:
    """Every prefix of a text and rows ending in random tokens: the step's check gives each row the matcher's own
    answer, while transformers' matcher sees only the rows whose last token can end one of the strings."""
    tokenizer = tokenizers[kind]
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    noise = torch.randint(len(tokenizer), (200, 6), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [ids[:end] for end in range(2, len(ids) + 1)] + [ids[:5] + tail for tail in noise]
    for stop in STOPS:
        sampler = make_sampler(GenerationOptions(max_new_tokens=8, stop_strings=(stop,)), ids[:1], 0,
                               torch.device("cpu"), tokenizer)
        matcher = sampler.stop_strings
        expected = [bool(matcher(torch.tensor([row[-matcher.maximum_token_len:]]), None)[0]) for row in rows]
        matched: list[int] = []
        match = type(matcher).__call__
        monkeypatch.setattr(type(matcher), "__call__", lambda self, input_ids, scores, **kwargs: (
            matched.append(len(input_ids)), match(self, input_ids, scores, **kwargs))[1])
        assert stopped_on_strings([sampler] * len(rows), rows) == expected, stop
        monkeypatch.undo()
        assert any(expected) == (stop in tokenizer.decode(ids)), stop
        if isinstance(matcher, StopStringCriteria):  # a text matcher reads every row
            assert sum(matched) <= len(rows) // 2, (stop, sum(matched))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_engines_direct_decode_is_transformers_decode(tokenizers, kind: str) -> None:
    """Every kind built here is a fast tokenizer: the engine decodes with its Rust call directly, to the same text
    as ``tokenizer.decode``, special tokens kept or skipped."""
    tokenizer = tokenizers[kind]
    direct = _backend_decode(tokenizer)
    assert direct is not None, type(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    specials = [i for i in (tokenizer.eos_token_id, tokenizer.unk_token_id) if i is not None]
    for piece in (ids, ids[3:9], specials + ids[:5] + specials, ids[-1:]):
        for skip in (True, False):
            assert direct(piece, skip_special_tokens=skip) == tokenizer.decode(
                piece, skip_special_tokens=skip, clean_up_tokenization_spaces=False), (piece, skip)


def test_the_engine_decodes_through_the_direct_call(tmp_path) -> None:
    """A checkpoint's fast tokenizer gives the engine the direct call, and the engine's text is transformers'."""
    engine = load_engine(LoadSpec(str(build_tiny_falcon(tmp_path / "7b", "7b", tokenizer="unigram"))))
    assert engine._decode_ids is not None
    ids = engine.encode(TEXT)
    assert engine.decode(ids) == engine.tokenizer.decode(ids, skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=False)


# -- over HTTP, on a checkpoint with a word-level tokenizer --------------------------------------------------------

@pytest.fixture(scope="module")
def word_level(start_server, tmp_path_factory):
    model_dir = build_tiny_falcon(tmp_path_factory.mktemp("word-level") / "7b", "7b", tokenizer="wordlevel")
    return start_server(model_dir, model_name="tiny-falcon-words")


def openai(server, route: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": server.model_name, **body}, timeout=60)


def chat(server, payload: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", json=payload, timeout=60)


def assert_plain_request_served(server) -> None:
    response = chat(server, {"prompt": "Return the value", "generate_kwargs": {"max_new_tokens": 4}})
    assert response.status_code == 200, response.text


def test_word_level_chat_completion_is_answered(word_level) -> None:
    """The request that stopped the engine: a chat completion, whose format stops at the next "User:" turn."""
    response = openai(word_level, "chat/completions", messages=[{"role": "user", "content": "Return the value"}],
                      max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    log = word_level.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-3000:]
    assert log.count("matched on the decoded text") == 1  # said once, at start-up
    assert_plain_request_served(word_level)


def test_word_level_stop_strings_end_generation_after_the_completing_token(word_level) -> None:
    greedy = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12}
    free = chat(word_level, {"prompt": "Return the value", "return_full_text": False, "generate_kwargs": greedy})
    words = free.json()["Result"].split()
    stop = words[3]
    # the first generated word whose text contains the stop: generation ends with it
    at = next(i for i, word in enumerate(words) if stop in word)
    stopped = chat(word_level, {"prompt": "Return the value", "return_full_text": False,
                                "generate_kwargs": {**greedy, "min_new_tokens": 0, "stop_strings": [stop]}})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["details"]["finish_reasons"] == ["stop"]
    assert stopped.json()["Result"].split() == words[:at + 1]
    response = openai(word_level, "completions", prompt="Return the value", max_tokens=12, temperature=0,
                      stop=[stop])
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert_plain_request_served(word_level)


def test_word_level_streams_penalties_and_beams_are_answered(word_level) -> None:
    with httpx.stream("POST", f"{word_level.url}/chat", timeout=60, json={
            "prompt": "Return the value", "stream": True,
            "generate_kwargs": {"max_new_tokens": 8, "stop_strings": ["the"], "repetition_penalty": 1.3}}) as stream:
        events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "Result" in json.loads(events[-2]), events
    penalised = openai(word_level, "completions", prompt="Return the value", max_tokens=8, presence_penalty=1.5,
                       frequency_penalty=0.5, stream=True)
    assert penalised.status_code == 200 and penalised.text.rstrip().endswith("data: [DONE]"), penalised.text
    assert '"error"' not in penalised.text
    beams = chat(word_level, {"prompt": "Return the value", "generate_kwargs": {
        "num_beams": 2, "do_sample": False, "max_new_tokens": 8, "stop_strings": ["the"]}})
    assert beams.status_code == 200, beams.text
    assert_plain_request_served(word_level)


def test_word_level_structured_output_is_refused_naming_it(word_level) -> None:
    """llguidance needs each token's bytes, which a word-level vocabulary (spaces put between words by its
    decoder) does not have: a clear 4xx, and the server goes on."""
    response = openai(word_level, "chat/completions", messages=[{"role": "user", "content": "JSON please"}],
                      max_tokens=8, response_format={"type": "json_object"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_option" and error["param"] == "grammar", error
    assert "structured output" in error["message"]
    assert_plain_request_served(word_level)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizer_kinds_serve_stop_strings_and_structured_output(start_server, tmp_path_factory,
                                                                        kind: str) -> None:
    model_dir = build_tiny_falcon(tmp_path_factory.mktemp(kind) / "7b", "7b", tokenizer=kind)
    server = start_server(model_dir, model_name=f"tiny-falcon-{kind}")
    stopped = openai(server, "chat/completions", messages=[{"role": "user", "content": "Return the value"}],
                     max_tokens=8, stop=["the"])
    assert stopped.status_code == 200, stopped.text
    structured = openai(server, "chat/completions", messages=[{"role": "user", "content": "JSON please"}],
                        max_tokens=40, temperature=0, response_format={"type": "json_object"})
    if kind == "unigram":  # byte fallback: llguidance reads it, and the answer parses
        assert structured.status_code == 200, structured.text
        assert isinstance(json.loads(structured.json()["choices"][0]["message"]["content"]), dict)
    else:
        assert structured.status_code == 400 and structured.json()["error"]["param"] == "grammar", structured.text
    assert_plain_request_served(server)
    assert server.stop() == 0
