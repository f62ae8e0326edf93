"""Every prompt shape of OpenAI's completions API, lm-evaluation-harness's exact request shapes, and the Responses
API, driven by the real ``openai`` client (or plain HTTP for lm-eval's bodies) against a server on the tiny Falcon,
checked against the tiny checkpoint loaded in this process."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(client, model, prompt, max_tokens=6, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


@torch.inference_mode()
def token_logprobs(reference, ids: list[int]) -> list[float]:
    """Each token's log-probability under the model given the tokens before it (the first has none)."""
    logits = reference(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


# -- the four prompt shapes --------------------------------------------------------------------------------------------
def test_every_prompt_shape_gives_each_prompts_own_greedy_text(client, tiny_server, tokenizer):
    model = tiny_server.model_name
    answers = [greedy(client, model, prompt) for prompt in PROMPTS]
    alone = [answer.choices[0].text for answer in answers]
    ids = [encode(tokenizer, prompt) for prompt in PROMPTS]
    assert [c.text for c in greedy(client, model, PROMPTS).choices] == alone
    assert [c.text for c in greedy(client, model, ids).choices] == alone
    assert greedy(client, model, ids[1]).choices[0].text == alone[1]
    answer = greedy(client, model, PROMPTS)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
    assert answer.usage.completion_tokens == sum(a.usage.completion_tokens for a in answers)


def test_choice_index_is_prompt_times_n_plus_sequence_and_streams_say_whose(client, tiny_server):
    model = tiny_server.model_name
    whole = client.completions.create(model=model, prompt=PROMPTS[:2], n=2, max_tokens=5, seed=7)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    seeded_alone = [client.completions.create(model=model, prompt=p, n=2, max_tokens=5, seed=7) for p in PROMPTS[:2]]
    assert [c.text for c in whole.choices] == [c.text for answer in seeded_alone for c in answer.choices]
    texts = {}
    stream = client.completions.create(model=model, prompt=PROMPTS[:2], n=2, max_tokens=5, seed=7, stream=True,
                                       stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == 20


def test_echo_and_logprobs_are_per_prompt(client, tiny_server, tokenizer, reference):
    ids = [encode(tokenizer, prompt) for prompt in PROMPTS[:2]]
    answer = client.completions.create(model=tiny_server.model_name, prompt=ids, max_tokens=1, temperature=0,
                                       echo=True, logprobs=1)
    for prompt, prompt_ids, choice in zip(PROMPTS, ids, answer.choices, strict=False):
        assert choice.text.startswith(prompt)
        logged = choice.logprobs.token_logprobs
        assert logged[0] is None and len(logged) == len(prompt_ids) + 1
        assert logged[1:len(prompt_ids)] == pytest.approx(token_logprobs(reference, prompt_ids), abs=1e-3)


@pytest.mark.parametrize("prompt, param", [([], "prompt"), ([[]], "prompt[0]"), (["a", ""], "prompt[1]"),
                                           ([[1, 5000]], "prompt[0]"), ([5000], "prompt"), ([-1], "prompt")])
def test_an_empty_prompt_or_a_token_outside_the_vocabulary_is_a_400_naming_it(client, tiny_server, prompt, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=tiny_server.model_name, prompt=prompt, max_tokens=2)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_prompts_times_n_is_bounded_by_max_sequences_per_request(client, tiny_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=tiny_server.model_name, prompt=["a"] * 9, n=2, max_tokens=2)
    assert caught.value.body["param"] == "prompt"
    assert "18 sequences" in caught.value.body["message"] and "16" in caught.value.body["message"]


# -- lm-evaluation-harness's request shapes (local-completions), without lm-eval -------------------------------------
def test_lm_eval_loglikelihood_request_scores_each_continuation_as_the_model_does(tiny_server, tokenizer, reference):
    """local-completions' loglikelihood body: token-id prompts (context + continuation), echo, one new token; it
    sums ``token_logprobs[ctxlen:-1]`` of the choice with each prompt's index."""
    contexts = [encode(tokenizer, "Question: What is two plus three?\nAnswer:")] * 2
    continuations = [encode(tokenizer, " five"), encode(tokenizer, " six")]
    prompts = [c + k for c, k in zip(contexts, continuations, strict=True)]
    body = {"model": tiny_server.model_name, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    answer = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60).json()
    for choice, context, prompt in zip(sorted(answer["choices"], key=lambda c: c["index"]), contexts, prompts,
                                       strict=True):
        ours = sum(choice["logprobs"]["token_logprobs"][len(context):-1])
        assert ours == pytest.approx(sum(token_logprobs(reference, prompt)[len(context) - 1:]), abs=1e-3)
        top = choice["logprobs"]["top_logprobs"][len(context):-1]
        assert all(len(alternatives) >= 1 for alternatives in top)


def test_lm_eval_generation_request_is_transformers_greedy_text(tiny_server, tokenizer, reference):
    """local-completions' generate_until body: token-id prompts, stop strings with eos's text, a seed."""
    ids = encode(tokenizer, "Question: What colour is the sky?\nAnswer:")
    body = {"model": tiny_server.model_name, "prompt": [ids], "max_tokens": 12, "temperature": 0,
            "stop": ["\n", "Question:", "<|endoftext|>"], "seed": 1234}
    text = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=11)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    for stop in ("\n", "Question:"):
        expected = expected.split(stop)[0]
    assert text == expected


# -- the Responses API ---------------------------------------------------------------------------------------------------
def test_responses_answer_as_chat_completions_do(client, tiny_server):
    model = tiny_server.model_name
    response = client.responses.create(model=model, input="Tell me a story.", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)
    listed = client.responses.create(model=model, input=[{"role": "user", "content": "Tell me a story."}],
                                     instructions="Be brief.", max_output_tokens=8, temperature=0)
    assert listed.output_text == response.output_text


def test_a_streamed_response_is_openais_event_sequence_and_follows_its_schema(client, tiny_server):
    text = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    with client.responses.stream(model=tiny_server.model_name, input="Hi", max_output_tokens=30, temperature=0,
                                 text=text) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "response.output_text.delta" in kinds
    assert final.status == "completed" and final.output_text in ('{"ok":true}', '{"ok":false}')


def test_responses_parse_follows_a_pydantic_schema(client, tiny_server):
    class Answer(BaseModel):
        ok: bool

    parsed = client.responses.parse(model=tiny_server.model_name, input="x", text_format=Answer,
                                    max_output_tokens=30, temperature=0)
    assert isinstance(parsed.output_parsed, Answer)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"max_output_tokens": 5000}, "max_output_tokens"), ({"input": ""}, "input"),
])
def test_what_the_responses_api_does_not_serve_is_refused_by_name(client, tiny_server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=tiny_server.model_name, **{"input": "x", **kwargs})
    assert caught.value.body["param"] == param
    client.responses.create(model=tiny_server.model_name, input="x", max_output_tokens=1, tools=[], store=False)


def test_stored_responses_are_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_1")
    assert "not stored" in caught.value.body["message"]
