"""The OpenAI-compatible routes, driven by the real ``openai`` client against a server on the tiny Falcon."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from predictor.api.chat_format import render_chat
from predictor.api.openai.mapping import resolve_max_tokens, to_generation_job
from predictor.api.openai.schema import ChatCompletionRequest, CompletionRequest, parse_openai_request
from predictor.engine.options import Limits, ModelInfo
from predictor.errors import ContextLengthExceeded, InvalidRequest, UnknownParameter

FALCON = ModelInfo(vocab_size=65024, eos_token_id=11)

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/openai/v1", api_key="-", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_server) -> str:
    return tiny_server.model_name


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def greedy_text(client, model, max_tokens, **kwargs) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                     **kwargs).choices[0].text


# -- the mapping, without a model -----------------------------------------------------------------------------------
def completion_request(**fields) -> CompletionRequest:
    return parse_openai_request({"model": "m", "prompt": "p", **fields}, CompletionRequest)


def chat_request(**fields) -> ChatCompletionRequest:
    return parse_openai_request({"model": "m", "messages": MESSAGES, **fields}, ChatCompletionRequest)


def job_of(request, prompt_len=3, stops=(), limits=None):
    return to_generation_job(request, "p", list(range(100, 100 + prompt_len)), stops, FALCON, limits or Limits())


def test_temperature_zero_is_greedy_and_sampling_has_no_top_k():
    greedy = job_of(completion_request(temperature=0, max_tokens=5)).options
    assert (greedy.do_sample, greedy.max_new_tokens) == (False, 5)
    sampled = job_of(completion_request(top_p=0.5, n=3, seed=1))
    options = sampled.options
    assert (options.do_sample, options.temperature, options.top_k, options.top_p, options.num_return_sequences) == (
        True, 1.0, 0, 0.5, 3)
    assert options.seed == 1 and sampled.return_full_text is False


def test_openai_options_map_straight_onto_the_engines():
    options = job_of(completion_request(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": -100, "9": 2.5},
                                        min_tokens=3, stop_token_ids=[5], logprobs=2), stops=["x"]).options
    assert (options.presence_penalty, options.frequency_penalty) == (0.5, -1)
    assert options.sequence_bias == (((7,), -100.0), ((9,), 2.5))
    assert (options.min_new_tokens, options.eos_token_ids, options.logprobs, options.top_logprobs) == (
        3, (11, 5), True, 2)
    assert options.stop_strings == ("x",)
    assert job_of(completion_request(ignore_eos=True, stop_token_ids=[5])).options.eos_token_ids == (5,)
    assert job_of(completion_request(echo=True)).return_full_text
    chat = job_of(chat_request(logprobs=True, top_logprobs=20), stops=["\nUser:"])
    assert (chat.options.top_logprobs, chat.stop_texts) == (20, ("\nUser:",))


def test_unsupported_options_are_refused_by_name_and_neutral_values_accepted():
    completion_request(best_of=1, suffix="", user="u", logprobs=None)
    for field, value in [("best_of", 2), ("suffix", "x"), ("tools", []), ("functions", []),
                         ("use_beam_search", True)]:
        with pytest.raises(UnknownParameter) as caught:
            completion_request(**{field: value})
        assert caught.value.param == field and field in caught.value.message


@pytest.mark.parametrize("request_of, param", [
    (lambda: completion_request(logit_bias={"70000": 1}), "logit_bias"),
    (lambda: completion_request(logit_bias={"5": 101}), "logit_bias"),
    (lambda: completion_request(logit_bias={"five": 1}), "logit_bias"),
    (lambda: completion_request(presence_penalty=2.5), "presence_penalty"),
    (lambda: completion_request(frequency_penalty=-3), "frequency_penalty"),
    (lambda: completion_request(logprobs=6), "logprobs"),
    (lambda: chat_request(top_logprobs=21, logprobs=True), "top_logprobs"),
    (lambda: chat_request(top_logprobs=2), "top_logprobs"),
    (lambda: completion_request(stop_token_ids=[-1]), "stop_token_ids"),
    (lambda: completion_request(min_tokens=17), "min_tokens"),
    (lambda: completion_request(max_tokens=5000), "max_tokens"),
    (lambda: completion_request(n=9, temperature=1), "n"),
])
def test_each_mistake_names_the_openai_parameter(request_of, param):
    with pytest.raises(InvalidRequest) as caught:
        job_of(request_of(), limits=Limits(context_length=8000))
    assert caught.value.param == param
    assert caught.value.message.startswith(param) and "generate_kwargs" not in caught.value.message


def test_max_tokens_default_fills_the_context_up_to_the_server_limit():
    limits = Limits(context_length=100, max_new_tokens=30)
    assert resolve_max_tokens(None, 90, limits) == 10
    assert resolve_max_tokens(None, 10, limits) == 30
    assert resolve_max_tokens(7, 10, limits) == 7
    with pytest.raises(ContextLengthExceeded) as caught:
        resolve_max_tokens(20, 90, limits)
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as caught:
        resolve_max_tokens(None, 100, limits, "messages")
    assert caught.value.param == "messages"


def test_request_fields_are_validated_with_their_openai_names():
    for fields, param in [({"temperature": 2.5}, "temperature"), ({"n": 0}, "n"), ({"prompt": ["a", 1]}, "prompt"),
                          ({"stop": ["a"] * 65}, "stop"), ({"max_tokens": "8"}, "max_tokens"),
                          ({"prompt": 5}, "prompt")]:
        with pytest.raises(InvalidRequest) as caught:
            completion_request(**fields)
        assert caught.value.param == param


# -- against a server -----------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_counts_tokens_and_says_why_it_ended(client, model, tokenizer):
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.object == "text_completion" and completion.model == model
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert 1 <= usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 8)


def test_a_greedy_completion_is_what_chat_generates(client, model, tiny_server):
    chat = httpx.post(f"{tiny_server.url}/chat", timeout=60, json={
        "prompt": PROMPT, "return_full_text": False, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12}})
    assert greedy_text(client, model, 12) == chat.json()["Result"]


def test_a_streamed_completion_is_the_same_text(client, model):
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy_text(client, model, 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16


def test_chat_completion_uses_falcons_conversation_format(client, model, tokenizer):
    completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert completion.object == "chat.completion"
    message = completion.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str) and "\nUser:" not in message.content
    prompt = render_chat(tokenizer, MESSAGES)
    assert completion.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    raw = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=["\nUser:"])
    assert message.content == raw.choices[0].text


def test_a_streamed_chat_completion_is_the_same_text(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=16,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_several_choices_and_a_seed_reproduce(client, model):
    def sample():
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, seed=11,
                                               temperature=1.0, top_p=0.9)
        return [(c.index, c.text) for c in completion.choices], completion.usage

    (first, usage), (again, _) = sample(), sample()
    assert [index for index, _ in first] == [0, 1, 2] and first == again
    assert len({text for _, text in first}) > 1
    assert usage.completion_tokens <= 3 * 8

    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, seed=11, temperature=1.0,
                                         top_p=0.9, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert list(enumerate(texts)) == first


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_cuts_the_text(client, model, stream):
    text = greedy_text(client, model, 24)
    stop = text[6:9]
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never-seen"])
    if stream:
        chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
        cut, finish_reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**kwargs).choices[0]
        cut, finish_reason = choice.text, choice.finish_reason
    assert (cut, finish_reason) == (text[:text.index(stop)], "stop")


def test_a_stop_sequence_counts_only_the_tokens_up_to_it(client, model):
    text = greedy_text(client, model, 24)
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                           stop=text[6:9])
    assert completion.usage.completion_tokens < 24


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 3}, "temperature"),
    ({"n": 2, "temperature": 0}, "n"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 4096}, "max_tokens"),
    ({"prompt": "word " * 3000}, "prompt"),
])
def test_client_mistakes_are_400_in_openai_shape(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": model, "prompt": PROMPT, "max_tokens": 4, **kwargs})
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late rules"}], "messages[1].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([], "messages"),
])
def test_a_chat_mistake_is_a_400_naming_the_message(client, model, messages, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, max_tokens=4, messages=messages)
    assert caught.value.body["param"] == param


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"


def test_a_body_that_is_not_json_gets_the_openai_error_shape(tiny_server):
    response = httpx.post(f"{tiny_server.url}/openai/v1/chat/completions", content=b"{nope", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
