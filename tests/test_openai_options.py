"""The OpenAI routes' generation options, log-probabilities, paths and tokenizer routes, each driven by the real
``openai`` client (or plain HTTP for vLLM's tokenizer routes) against a server on the tiny Falcon, and checked
against the tiny checkpoint loaded in this process where the option has an exact meaning."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor.api.chat_format import render_chat

PROMPT = "The quick brown fox"  # 7B-style greedy: 769 214 725 325 13 656 727 116 41 441 435 435
ONE_TOKEN_PROMPT = "The"  # 40B-style greedy ends with eos (id 11) as its 5th token
EOS = 11
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client_40b(tiny_server_40b) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server_40b.url}/v1", api_key="-", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def complete(client, model, prompt=PROMPT, max_tokens=12, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def ids_of(client, model, prompt=PROMPT, max_tokens=12, **kwargs) -> list[int]:
    """The generated token ids, from the logprobs (vLLM's return_tokens_as_token_ids names each "token_id:<id>")."""
    extra = {"return_tokens_as_token_ids": True, **kwargs.pop("extra_body", {})}
    choice = complete(client, model, prompt, max_tokens, logprobs=0, extra_body=extra, **kwargs).choices[0]
    return [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]


@torch.inference_mode()
def penalised_greedy(reference, prompt_ids, steps, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding with OpenAI's penalties written out independently of the server's code."""
    ids, new = list(prompt_ids), []
    for _ in range(steps):
        logits = reference(torch.tensor([ids])).logits[0, -1].clone()
        for token in set(new):
            logits[token] -= frequency * new.count(token) + presence
        for token, value in (bias or {}).items():
            logits[token] += value
        token = int(logits.argmax())
        ids.append(token)
        new.append(token)
        if token == EOS:
            break
    return new


# -- penalties and biases --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": -1.0, "frequency_penalty": 0.5}])
def test_penalties_are_openais_over_generated_tokens(client, tiny_server, tokenizer, reference, penalty):
    model = tiny_server.model_name
    penalised = ids_of(client, model, **penalty)
    expected = penalised_greedy(reference, encode(tokenizer, PROMPT), 12, penalty.get("presence_penalty", 0.0),
                                penalty.get("frequency_penalty", 0.0))
    assert penalised == expected
    if penalty.get("presence_penalty", 0) > 0:
        assert penalised != ids_of(client, model)  # the unpenalised text repeats a token


def test_logit_bias_forces_and_bans_tokens(client, tiny_server, tokenizer, reference):
    model = tiny_server.model_name
    first = ids_of(client, model, max_tokens=3)[0]
    banned = ids_of(client, model, max_tokens=3, logit_bias={str(first): -100})
    assert banned[0] != first
    assert banned == penalised_greedy(reference, encode(tokenizer, PROMPT), 3, bias={first: -100})
    assert ids_of(client, model, max_tokens=4, logit_bias={"42": 100}) == [42] * 4


def test_min_tokens_holds_eos_back_and_ignore_eos_goes_past_it(client_40b, tiny_server_40b):
    model = tiny_server_40b.model_name
    plain = complete(client_40b, model, ONE_TOKEN_PROMPT, max_tokens=10)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 8
    held = complete(client_40b, model, ONE_TOKEN_PROMPT, max_tokens=10, extra_body={"min_tokens": 8})
    assert held.usage.completion_tokens >= 8
    past = complete(client_40b, model, ONE_TOKEN_PROMPT, max_tokens=10, extra_body={"ignore_eos": True})
    assert (past.usage.completion_tokens, past.choices[0].finish_reason) == (10, "length")


def test_stop_token_ids_end_a_choice_there(client, tiny_server, tokenizer):
    model = tiny_server.model_name
    ids = ids_of(client, model)
    assert ids_of(client, model, extra_body={"stop_token_ids": [ids[2]]}) == ids[:3]
    stopped = complete(client, model, extra_body={"stop_token_ids": [ids[2]]})
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 3)


# -- log-probabilities -----------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_chat_top_logprobs_are_ordered_and_agree_with_greedy_choice(client, tiny_server, tokenizer, reference):
    model = tiny_server.model_name
    completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert "".join(entry.token for entry in content).startswith(completion.choices[0].message.content)
    prompt_ids = encode(tokenizer, render_chat(tokenizer, MESSAGES))
    logits = reference(torch.tensor([prompt_ids])).logits[0, -1].log_softmax(-1)
    best = logits.topk(3)
    assert [top.logprob for top in content[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    for entry in content:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(values[0])
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_have_tokens_offsets_and_top_alternatives(client, tiny_server):
    model = tiny_server.model_name
    choice = complete(client, model, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)

    streamed = list(complete(client, model, logprobs=2, stream=True))
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.tokens]
    values = [v for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for v in chunk.choices[0].logprobs.token_logprobs]
    assert tokens == logprobs.tokens and values == pytest.approx(logprobs.token_logprobs)


def test_streamed_chat_logprobs_are_the_whole_answers(client, tiny_server):
    kwargs = dict(model=tiny_server.model_name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_echo_puts_the_prompt_in_front(client, tiny_server):
    model = tiny_server.model_name
    plain = complete(client, model).choices[0].text
    assert complete(client, model, echo=True).choices[0].text == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in complete(client, model, echo=True, stream=True) if c.choices)
    assert streamed == PROMPT + plain


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(client, tiny_server, tokenizer, reference, stream):
    model = tiny_server.model_name
    prompt = PROMPT + " jumps over the lazy dog, and then the fox jumps again"
    ids = encode(tokenizer, prompt)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].log_softmax(-1)  # [tokens, vocab]
    kwargs = dict(model=model, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2,
                  extra_body={"return_tokens_as_token_ids": True})
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs]
        logprobs = {key: [v for c in chunks for v in getattr(c.choices[0].logprobs, key)]
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        logprobs = vars(client.completions.create(**kwargs).choices[0].logprobs)
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    assert tokens[:len(ids)] == ids and len(tokens) == len(ids) + 6
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    scored = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert logprobs["token_logprobs"][1:len(ids)] == pytest.approx(scored, abs=1e-4)
    best = expected[0].topk(2)
    assert {int(k.removeprefix("token_id:")): v for k, v in logprobs["top_logprobs"][1].items()} == pytest.approx(
        dict(zip(best.indices.tolist(), best.values.tolist())), abs=1e-4)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


# -- usage, paths, models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_every_choice_up_to_its_stop(client, tiny_server, tokenizer, stream):
    model = tiny_server.model_name
    text = complete(client, model, max_tokens=24).choices[0].text
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=8, n=3, seed=5, temperature=1.0, logprobs=0,
                  stop=[text[4:7]])
    if not stream:
        completion = client.completions.create(**kwargs)
        counts, usage = [len(c.logprobs.tokens) for c in completion.choices], completion.usage
    else:
        chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        counts = [0, 0, 0]
        for chunk in chunks:
            for choice in chunk.choices:
                counts[choice.index] += len(choice.logprobs.tokens) if choice.logprobs else 0
        usage = chunks[-1].usage
    assert usage.prompt_tokens == len(encode(tokenizer, PROMPT))  # once, whatever n
    assert usage.completion_tokens == sum(counts) and usage.total_tokens == usage.prompt_tokens + sum(counts)


def test_v1_paths_serve_what_openai_v1_serves(client, tiny_server):
    model = tiny_server.model_name
    kserve_path = openai.OpenAI(base_url=f"{tiny_server.url}/openai/v1", api_key="-", max_retries=0)
    for create in (lambda c: c.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
                   .choices[0].text,
                   lambda c: c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
                   .choices[0].message.content):
        assert create(client) == create(kserve_path)


def test_v1_models_is_kserves_and_openais_at_once(client, tiny_server):
    body = httpx.get(f"{tiny_server.url}/v1/models", timeout=10).json()
    assert body["models"] == [tiny_server.model_name]  # KServe's v1 protocol
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [tiny_server.model_name]
    assert [m.id for m in client.models.list().data] == [tiny_server.model_name]
    ready = httpx.get(f"{tiny_server.url}/v1/models/{tiny_server.model_name}", timeout=10).json()
    assert ready["ready"] is True and ready["name"] == tiny_server.model_name  # KServe's readiness route
    v1_client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-")
    card = v1_client.models.retrieve(tiny_server.model_name)  # and OpenAI's model card, in one body
    assert card.id == tiny_server.model_name and card.object == "model"


@pytest.mark.parametrize("kwargs, param", [
    ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"1": 150}}, "logit_bias"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
])
def test_refusals_name_the_parameter_in_openais_shape(client, tiny_server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=tiny_server.model_name, messages=MESSAGES, max_tokens=4, **kwargs)
    assert caught.value.body["param"] == param and caught.value.body["message"].startswith(param)


# -- tokenizer routes ------------------------------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(tiny_server, tokenizer):
    url = tiny_server.url
    body = httpx.post(f"{url}/tokenize", json={"model": tiny_server.model_name, "prompt": PROMPT}, timeout=10).json()
    assert body["tokens"] == tokenizer(PROMPT)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    back = httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]}, timeout=10).json()
    assert back == {"prompt": PROMPT}

    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}, timeout=10).json()
    assert chat["tokens"] == tokenizer(render_chat(tokenizer, MESSAGES))["input_ids"]
    completion = openai.OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
        model=tiny_server.model_name, messages=MESSAGES, max_tokens=2, temperature=0)
    assert completion.usage.prompt_tokens == chat["count"]


@pytest.mark.parametrize("route, body, param", [
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
])
def test_tokenizer_route_mistakes_are_client_errors(tiny_server, route, body, param):
    response = httpx.post(f"{tiny_server.url}{route}", json=body, timeout=10)
    assert 400 <= response.status_code < 500 and response.json()["error"]["param"] == param
