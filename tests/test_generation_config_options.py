"""The /chat generate_kwargs added from transformers' GenerationConfig (docs/api.md's table), and ``messages``.

As in ``test_chat_options``: greedy options must equal transformers' own ``generate`` on the same tiny checkpoint,
token for token, and must change the output. Sampling warpers are checked through the log-probabilities the server
reports (``output_scores``): at each step they must be those of transformers' warper applied to the reference
model's logits, and differ from the unwarped ones.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import test_chat_options
import torch
from test_chat_options import EOS, PROMPT, assert_refused, chat, greedy, request, texts
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TopHLogitsWarper,
)

references, ref = test_chat_options.references, test_chat_options.ref  # the tiny checkpoints, as fixtures

GREEDY_IDS = [769, 214, 725, 325, 13, 656, 727, 116, 41, 441, 435, 435]  # PROMPT on the 7B-style tiny Falcon


# -- id-dependent processors: equal to transformers' generate ---------------------------------------------------
@pytest.mark.parametrize("options", [
    {"suppress_tokens": GREEDY_IDS[:3]},
    {"begin_suppress_tokens": GREEDY_IDS[:1]},
    {"sequence_bias": [[GREEDY_IDS[:1], -100.0]]},
    {"sequence_bias": [[GREEDY_IDS[:2], -50.0], [[5], 20.0]]},
    {"exponential_decay_length_penalty": [2, 3.0]},
])
def test_processors_are_transformers_own(tiny_server, ref, options):
    assert ref.texts(max_new_tokens=12, **options) != ref.texts(max_new_tokens=12)  # the option has an effect
    assert greedy(tiny_server, max_new_tokens=12, **options) == ref.texts(max_new_tokens=12, **options)


def test_processor_token_ids_are_validated(tiny_server):
    assert_refused(request(tiny_server, suppress_tokens=[5000]), "generate_kwargs.suppress_tokens")
    assert_refused(request(tiny_server, sequence_bias=[[[1], 1e9]]), "generate_kwargs.sequence_bias")
    assert_refused(request(tiny_server, sequence_bias=[[[-1], 1.0]]), "generate_kwargs.sequence_bias")
    assert_refused(request(tiny_server, exponential_decay_length_penalty=[0, 1e6], max_new_tokens=20),
                   "generate_kwargs.exponential_decay_length_penalty")


def test_stop_strings_end_after_the_token_that_completes_one(tiny_server, ref):
    text = ref.texts(max_new_tokens=12)[0]
    stop = text[8:12]
    expected = ref.texts(max_new_tokens=12, stop_strings=stop, tokenizer=ref.tokenizer)
    assert expected != [text]
    body = chat(tiny_server, do_sample=False, max_new_tokens=12, stop_strings=[stop, "never seen"])
    assert texts(body) == expected and body["details"]["finish_reasons"] == ["stop"]
    assert stop in texts(body)[0]
    beams = {"num_beams": 2, "max_new_tokens": 12, "stop_strings": stop}
    assert greedy(tiny_server, **beams) == ref.texts(**beams, tokenizer=ref.tokenizer)


def test_use_cache_is_accepted_and_changes_nothing(tiny_server):
    assert greedy(tiny_server, max_new_tokens=8, use_cache=False) == greedy(tiny_server, max_new_tokens=8)


def test_renormalize_logits_gives_transformers_scores(tiny_server, ref):
    both = {"output_scores": True, "return_dict_in_generate": True, "renormalize_logits": True}
    (logprobs,) = chat(tiny_server, do_sample=False, max_new_tokens=5, **both)["details"]["logprobs"]
    ids = torch.tensor([ref.encode(PROMPT)], device=ref.model.device)
    out = ref.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                             pad_token_id=EOS, **both)
    expected = ref.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=False)[0]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)


# -- sampling warpers: the distribution each token was drawn from ----------------------------------------------
def streamed_tokens(server, **generate_kwargs: Any) -> tuple[list[int], list[float]]:
    body = {"prompt": PROMPT, "seed": 3, "stream": True, "generate_kwargs": {
        "do_sample": True, "top_k": 0, "max_new_tokens": 6, "output_scores": True, "return_dict_in_generate": True,
        **generate_kwargs}}
    events = []
    with httpx.stream("POST", f"{server.url}/chat", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    ids = [event["token_id"] for event in events if "token_id" in event]
    return ids, events[-1]["details"]["logprobs"][0]


@torch.inference_mode()
def reference_logprobs(ref, ids: list[int], warper) -> tuple[list[float], list[float]]:
    """Each chosen token's log-probability under the reference model, with and without ``warper``."""
    prompt = ref.encode(PROMPT)
    warped, plain = [], []
    for i, token in enumerate(ids):
        context = torch.tensor([prompt + ids[:i]], device=ref.model.device)
        logits = ref.model(context).logits[:, -1].float()
        warped.append(warper(context, logits.clone()).log_softmax(-1)[0, token].item())
        plain.append(logits.log_softmax(-1)[0, token].item())
    return warped, plain


@pytest.mark.parametrize("option, warper", [
    ({"min_p": 0.002}, MinPLogitsWarper(0.002)),
    ({"top_h": 0.5}, TopHLogitsWarper(0.5)),
    ({"epsilon_cutoff": 0.001}, EpsilonLogitsWarper(0.001)),
    ({"eta_cutoff": 0.01}, EtaLogitsWarper(0.01)),
])
def test_sampling_warpers_are_transformers_own(tiny_server, ref, option, warper):
    ids, logprobs = streamed_tokens(tiny_server, **option)
    warped, plain = reference_logprobs(ref, ids, warper)
    assert logprobs == pytest.approx(warped, abs=1e-4)
    assert logprobs != pytest.approx(plain, abs=1e-4)


def test_min_p_one_is_greedy(tiny_server):
    for seed in range(3):
        assert texts(chat(tiny_server, seed=seed, do_sample=True, top_k=0, min_p=1.0, max_new_tokens=8)) == \
            greedy(tiny_server, max_new_tokens=8)


@pytest.mark.parametrize("option", ["guidance_scale", "output_logits", "max_time", "penalty_alpha", "dola_layers",
                                    "constraints", "force_words_ids", "low_memory", "token_healing",
                                    "encoder_repetition_penalty", "decoder_start_token_id"])
def test_refused_generation_config_options_say_why(tiny_server, option):
    response = request(tiny_server, **{option: 1})
    assert_refused(response, f"generate_kwargs.{option}")
    assert "README" in response.json()["detail"] or "not" in response.json()["detail"]


# -- messages ----------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


def test_messages_answer_with_the_assistants_reply(tiny_server):
    body = httpx.post(f"{tiny_server.url}/chat", timeout=60, json={
        "messages": MESSAGES, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12}}).json()
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(model=tiny_server.model_name, messages=MESSAGES, max_tokens=12,
                                           temperature=0).choices[0].message.content
    assert body["Result"] == reply and "\nUser:" not in body["Result"]

    streamed = []
    with httpx.stream("POST", f"{tiny_server.url}/chat", timeout=60, json={
            "messages": MESSAGES, "stream": True, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12}}) as s:
        streamed = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(event.get("text", "") for event in streamed[:-1]) == reply == streamed[-1]["Result"]


@pytest.mark.parametrize("payload, param, fragment", [
    ({"prompt": "Hi", "messages": MESSAGES}, "messages", "not both"),
    ({"generate_kwargs": {"max_new_tokens": 2}}, "prompt", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": []}, "messages", "at least one"),
])
def test_prompt_or_messages_mistakes_say_so(tiny_server, payload, param, fragment):
    response = httpx.post(f"{tiny_server.url}/chat", json=payload, timeout=30)
    assert_refused(response, param)
    assert fragment in response.json()["detail"]
    if param == "prompt":
        assert response.json()["detail"].startswith("Text generation parameter prompt required")
