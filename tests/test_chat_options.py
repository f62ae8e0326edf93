"""Each ``generate_kwargs`` option of POST /chat, one test per option, over real HTTP.

The strongest check that an option "has the meaning it has in transformers" is that the server's output equals
transformers' own ``generate`` with the same options, token for token, on the same tiny checkpoint loaded in this
process: greedy and beam search are deterministic. Where an option can change the tiny model's output, the test also
shows that it does, so it fails if the server ignored the option. Sampling options are checked through their limits
(top_k=1 is greedy...) and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from predictor.engine.sampling.group_beam_search import group_beam_search
from predictor.engine.model.loading import resolve_device_and_dtype

# Plain ASCII prompts: the server decodes prompt + continuation and cuts the prompt's text off, which for these
# equals decoding the continuation alone, as done here.
PROMPT = "The quick brown fox"  # 12 tokens; 7B-style greedy: 769 214 725 325 13 656 727 116 41 441 435 435
ONE_TOKEN_PROMPT = "The"  # 40B-style greedy ends with eos (id 11) as its 5th token
EOS = 11
SEEDS = range(4)


@dataclass(frozen=True)
class Reference:
    """A tiny checkpoint in this process: what transformers' generate makes of a prompt and options."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def generate(self, prompt: str = PROMPT, **options: Any) -> list[list[int]]:
        """Generated ids per returned sequence, cut after the first eos as the server cuts them."""
        ids = torch.tensor([self.encode(prompt)], device=self.model.device)
        options = {"do_sample": False, "pad_token_id": EOS, **options}
        eos = options.get("eos_token_id", EOS)
        eos = set(eos) if isinstance(eos, list) else {eos}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        sequences = out.sequences if options.get("return_dict_in_generate") else out
        result = []
        for row in sequences[:, ids.shape[1]:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            result.append(row[:end])
        return result

    def texts(self, prompt: str = PROMPT, **options: Any) -> list[str]:
        return [self.tokenizer.decode(seq, skip_special_tokens=True) for seq in self.generate(prompt, **options)]


@pytest.fixture(scope="module")
def references(tiny_dirs) -> dict[str, Reference]:
    """Both tiny checkpoints on the device and in the dtype the server picks (the CPU and float32 without a GPU)."""
    device, dtype = resolve_device_and_dtype("auto", "auto")
    return {arch: Reference(AutoTokenizer.from_pretrained(path),
                            AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval())
            for arch, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def ref(references) -> Reference:
    return references["7b"]


def request(server, prompt: str = PROMPT, seed: int | None = None, **generate_kwargs: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt, "return_full_text": False, "generate_kwargs": generate_kwargs}
    if seed is not None:
        body["seed"] = seed
    return httpx.post(f"{server.url}/chat", json=body, timeout=60)


def chat(server, prompt: str = PROMPT, seed: int | None = None, **generate_kwargs: Any) -> dict[str, Any]:
    response = request(server, prompt, seed, **generate_kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def texts(body: dict[str, Any]) -> list[str]:
    result = body["Result"]
    return result if isinstance(result, list) else [result]


def greedy(server, prompt: str = PROMPT, **generate_kwargs: Any) -> list[str]:
    return texts(chat(server, prompt, do_sample=False, **generate_kwargs))


def assert_refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["param"] == param, response.text


# -- lengths ------------------------------------------------------------------------------------------------------
def test_max_length_bounds_prompt_plus_generated_tokens(tiny_server, ref):
    prompt_tokens = len(ref.encode(PROMPT))
    for max_length in (prompt_tokens + 3, prompt_tokens + 9):
        body = chat(tiny_server, do_sample=False, max_length=max_length)
        details = body["details"]
        assert details["prompt_tokens"] == prompt_tokens
        assert details["prompt_tokens"] + details["generated_tokens"][0] == max_length
        assert details["finish_reasons"] == ["length"]
        assert texts(body) == ref.texts(max_length=max_length)
    assert_refused(request(tiny_server, max_length=prompt_tokens), "generate_kwargs.max_length")
    assert_refused(request(tiny_server, max_length=100_000), "generate_kwargs.max_length")  # bounded work


def test_max_new_tokens_counts_generated_tokens_and_wins_over_max_length(tiny_server, ref):
    for new in (1, 5):
        body = chat(tiny_server, do_sample=False, max_new_tokens=new, max_length=100)
        assert body["details"]["generated_tokens"] == [new]
        assert texts(body) == ref.texts(max_new_tokens=new)
    assert_refused(request(tiny_server, max_new_tokens=0), "generate_kwargs.max_new_tokens")
    too_many = request(tiny_server, max_new_tokens=100_000)
    assert 400 <= too_many.status_code < 500 and too_many.json()["param"] == "generate_kwargs.max_new_tokens"


def test_min_length_holds_eos_back(tiny_server_40b, references):
    ref = references["40b"]
    assert ref.generate(ONE_TOKEN_PROMPT, max_new_tokens=10)[0][-1] == EOS  # stops early without min_length
    unbounded = chat(tiny_server_40b, ONE_TOKEN_PROMPT, do_sample=False, max_new_tokens=10)
    assert unbounded["details"]["finish_reasons"] == ["stop"] and unbounded["details"]["generated_tokens"][0] < 8
    min_length = 1 + 8  # the prompt's token and 8 generated
    body = chat(tiny_server_40b, ONE_TOKEN_PROMPT, do_sample=False, max_new_tokens=10, min_length=min_length)
    assert body["details"]["prompt_tokens"] + body["details"]["generated_tokens"][0] >= min_length
    assert texts(body) == ref.texts(ONE_TOKEN_PROMPT, max_new_tokens=10, min_length=min_length)


def test_min_new_tokens_holds_eos_back(tiny_server_40b, references):
    ref = references["40b"]
    body = chat(tiny_server_40b, ONE_TOKEN_PROMPT, do_sample=False, max_new_tokens=10, min_new_tokens=8)
    assert body["details"]["generated_tokens"][0] >= 8
    assert texts(body) == ref.texts(ONE_TOKEN_PROMPT, max_new_tokens=10, min_new_tokens=8)
    assert texts(body) != greedy(tiny_server_40b, ONE_TOKEN_PROMPT, max_new_tokens=10)
    assert_refused(request(tiny_server_40b, max_new_tokens=3, min_new_tokens=4), "generate_kwargs.min_new_tokens")


# -- search and sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["7b", "40b"])
def test_do_sample_false_is_transformers_greedy_search(arch, tiny_server, tiny_server_40b, references):
    server = tiny_server if arch == "7b" else tiny_server_40b
    assert greedy(server, max_new_tokens=12) == references[arch].texts(max_new_tokens=12)


def test_do_sample_true_samples(tiny_server):
    sampled = {texts(chat(tiny_server, seed=seed, do_sample=True, max_new_tokens=8))[0] for seed in SEEDS}
    assert len(sampled) > 1


def test_temperature_near_zero_is_greedy_and_one_is_not(tiny_server):
    expected = greedy(tiny_server, max_new_tokens=8)
    for seed in SEEDS:
        assert texts(chat(tiny_server, seed=seed, do_sample=True, temperature=1e-3, max_new_tokens=8)) == expected
    hot = [texts(chat(tiny_server, seed=seed, do_sample=True, temperature=1.0, max_new_tokens=8)) for seed in SEEDS]
    assert any(text != expected for text in hot)


def test_temperature_zero_with_sampling_is_greedy_not_a_500(tiny_server):
    expected = greedy(tiny_server, max_new_tokens=8)
    for seed in SEEDS:
        assert texts(chat(tiny_server, seed=seed, do_sample=True, temperature=0, max_new_tokens=8)) == expected
    assert texts(chat(tiny_server, temperature=0.0, max_new_tokens=8)) == expected  # do_sample defaults to true


def test_top_k_one_is_greedy(tiny_server):
    expected = greedy(tiny_server, max_new_tokens=8)
    for seed in SEEDS:
        assert texts(chat(tiny_server, seed=seed, do_sample=True, top_k=1, temperature=2.0, max_new_tokens=8)) \
            == expected


def test_top_p_tiny_is_greedy(tiny_server):
    expected = greedy(tiny_server, max_new_tokens=8)
    for seed in SEEDS:
        assert texts(chat(tiny_server, seed=seed, do_sample=True, top_p=1e-6, top_k=0, temperature=2.0,
                          max_new_tokens=8)) == expected
    assert_refused(request(tiny_server, top_p=0), "generate_kwargs.top_p")


def test_typical_p_tiny_keeps_only_the_most_typical_token(tiny_server, ref):
    # One candidate left per step: sampling becomes deterministic, and equals transformers' typical sampling,
    # which is not greedy (the most typical token is not always the most likely one).
    options = {"do_sample": True, "typical_p": 1e-6, "top_k": 10, "max_new_tokens": 8}
    expected = ref.texts(**options)
    assert expected != ref.texts(max_new_tokens=8)
    for seed in SEEDS:
        assert texts(chat(tiny_server, seed=seed, **options)) == expected
    assert_refused(request(tiny_server, typical_p=1.5), "generate_kwargs.typical_p")


def test_num_beams_is_transformers_beam_search(any_server, references):
    ref = references["7b" if any_server.model_name == "tiny-falcon" else "40b"]
    options = {"num_beams": 3, "max_new_tokens": 8, "num_return_sequences": 3}
    expected = ref.texts(**options)
    assert greedy(any_server, **options) == greedy(any_server, **options) == expected


def test_num_beams_differs_from_greedy(tiny_server, ref):
    expected = ref.texts(num_beams=3, max_new_tokens=8)
    assert expected != ref.texts(max_new_tokens=8)
    assert greedy(tiny_server, num_beams=3, max_new_tokens=8) == expected


DIVERSE = {"num_beams": 4, "num_beam_groups": 2, "num_return_sequences": 4, "max_new_tokens": 6}


def test_num_beam_groups_is_diverse_beam_search(tiny_server, ref):
    options = {**DIVERSE, "diversity_penalty": 5.0}
    expected = ref.texts(custom_generate=group_beam_search, **options)
    assert greedy(tiny_server, **options) == greedy(tiny_server, **options) == expected
    assert expected != ref.texts(**{**options, "num_beam_groups": 1, "diversity_penalty": 0.0})
    assert_refused(request(tiny_server, do_sample=False, num_beams=4, num_beam_groups=3),
                   "generate_kwargs.num_beam_groups")


def test_diversity_penalty_makes_beam_groups_differ(tiny_server):
    # Without a penalty both groups run the same beam search and return the same hypotheses twice.
    alike = greedy(tiny_server, **DIVERSE, diversity_penalty=0.0)
    assert len(set(alike)) == 2
    diverse = greedy(tiny_server, **DIVERSE, diversity_penalty=5.0)
    assert len(set(diverse)) == 4


# An eos that beam hypotheses reach at different lengths makes length_penalty and early_stopping observable.
BEAMS_WITH_EOS = {"num_beams": 4, "max_new_tokens": 10, "eos_token_id": 325}


def test_length_penalty_is_transformers_length_penalty(tiny_server, ref):
    results = {}
    for length_penalty in (-2.0, 0.0, 2.0):
        options = {**BEAMS_WITH_EOS, "length_penalty": length_penalty}
        results[length_penalty] = greedy(tiny_server, **options)
        assert results[length_penalty] == greedy(tiny_server, **options) == ref.texts(**options)
    assert len({tuple(result) for result in results.values()}) == 3


def test_early_stopping_is_transformers_early_stopping(tiny_server, ref):
    results = {}
    for early_stopping in (False, True, "never"):
        options = {**BEAMS_WITH_EOS, "length_penalty": 2.0, "early_stopping": early_stopping}
        results[early_stopping] = greedy(tiny_server, **options)
        assert results[early_stopping] == ref.texts(**options)
    assert results[True] != results[False]


def test_num_return_sequences_returns_a_list_never_glued(tiny_server):
    body = chat(tiny_server, seed=3, do_sample=True, max_new_tokens=6, num_return_sequences=3)
    assert isinstance(body["Result"], list) and len(body["Result"]) == 3
    assert len(set(body["Result"])) > 1
    assert len(body["details"]["generated_tokens"]) == len(body["details"]["finish_reasons"]) == 3
    full = httpx.post(f"{tiny_server.url}/chat", timeout=60, json={
        "prompt": PROMPT, "seed": 3, "generate_kwargs": {"max_new_tokens": 6, "num_return_sequences": 3}}).json()
    assert full["Result"] == [PROMPT + text for text in body["Result"]]
    assert isinstance(chat(tiny_server, max_new_tokens=2)["Result"], str)  # one sequence: a plain string


# -- logits processors --------------------------------------------------------------------------------------------
def test_repetition_penalty_is_transformers_repetition_penalty(tiny_server, ref):
    expected = ref.texts(max_new_tokens=12, repetition_penalty=1.5)
    assert expected != ref.texts(max_new_tokens=12)
    assert greedy(tiny_server, max_new_tokens=12, repetition_penalty=1.5) == expected
    assert_refused(request(tiny_server, repetition_penalty=0), "generate_kwargs.repetition_penalty")


def test_no_repeat_ngram_size_removes_repeats(tiny_server, ref):
    plain = ref.generate(max_new_tokens=12)[0]
    assert len(set(plain)) < len(plain)  # greedy repeats a token (435 435)
    ids = ref.generate(max_new_tokens=12, no_repeat_ngram_size=1)[0]
    assert len(set(ids)) == len(ids)
    assert greedy(tiny_server, max_new_tokens=12, no_repeat_ngram_size=1) == ref.texts(
        max_new_tokens=12, no_repeat_ngram_size=1)


def test_encoder_no_repeat_ngram_size_bans_the_prompts_ngrams(tiny_server, ref):
    prompt_ids = set(ref.encode(PROMPT))
    assert prompt_ids & set(ref.generate(max_new_tokens=12)[0])  # greedy repeats a prompt token ("ro")
    ids = ref.generate(max_new_tokens=12, encoder_no_repeat_ngram_size=1)[0]
    assert not prompt_ids & set(ids)
    assert greedy(tiny_server, max_new_tokens=12, encoder_no_repeat_ngram_size=1) == ref.texts(
        max_new_tokens=12, encoder_no_repeat_ngram_size=1)


@pytest.mark.parametrize("bad_words_ids", [[[725], [13]], [[214, 725]]], ids=["tokens", "sequence"])
def test_bad_words_ids_are_banned(tiny_server, ref, bad_words_ids):
    assert 725 in ref.generate(max_new_tokens=8)[0]
    ids = ref.generate(max_new_tokens=8, bad_words_ids=bad_words_ids)[0]
    assert 725 not in ids
    assert greedy(tiny_server, max_new_tokens=8, bad_words_ids=bad_words_ids) == ref.texts(
        max_new_tokens=8, bad_words_ids=bad_words_ids)


def test_bad_words_ids_are_validated(tiny_server):
    assert_refused(request(tiny_server, bad_words_ids=[[]]), "generate_kwargs.bad_words_ids")
    assert_refused(request(tiny_server, bad_words_ids=[[5000]]), "generate_kwargs.bad_words_ids")


def test_forced_bos_token_id_forces_the_first_token(tiny_server, ref):
    # transformers forces it when the sequence so far is one token long: a one-token prompt on a decoder-only model.
    assert ref.generate(ONE_TOKEN_PROMPT, max_new_tokens=5)[0][0] != 500
    expected = ref.texts(ONE_TOKEN_PROMPT, max_new_tokens=5, forced_bos_token_id=500)
    assert ref.generate(ONE_TOKEN_PROMPT, max_new_tokens=5, forced_bos_token_id=500)[0][0] == 500
    assert greedy(tiny_server, ONE_TOKEN_PROMPT, max_new_tokens=5, forced_bos_token_id=500) == expected
    # With a longer prompt there is nothing to force: accepted, and the same as transformers.
    assert greedy(tiny_server, max_new_tokens=5, forced_bos_token_id=500) == ref.texts(max_new_tokens=5)
    assert_refused(request(tiny_server, forced_bos_token_id=4096), "generate_kwargs.forced_bos_token_id")


@pytest.mark.parametrize("forced", [EOS, [EOS]])
def test_forced_eos_token_id_ends_at_max_length(tiny_server, ref, forced):
    body = chat(tiny_server, do_sample=False, max_new_tokens=8, forced_eos_token_id=forced)
    assert body["details"] == {"prompt_tokens": 12, "generated_tokens": [8], "finish_reasons": ["stop"]}
    assert ref.generate(max_new_tokens=8, forced_eos_token_id=forced)[0][-1] == EOS
    assert texts(body) == ref.texts(max_new_tokens=8, forced_eos_token_id=forced)


def test_remove_invalid_values_is_accepted(tiny_server, ref):
    # The tiny model's logits are finite, so there is nothing to remove: the output stays transformers' output.
    assert greedy(tiny_server, max_new_tokens=8, remove_invalid_values=True) == ref.texts(
        max_new_tokens=8, remove_invalid_values=True)
    assert_refused(request(tiny_server, remove_invalid_values="yes"), "generate_kwargs.remove_invalid_values")


def test_pad_token_id_is_accepted_and_validated(tiny_server, ref):
    # A single sequence is never padded, so the pad id cannot change the text; it must still be a real token id.
    assert greedy(tiny_server, max_new_tokens=8, pad_token_id=0) == ref.texts(max_new_tokens=8, pad_token_id=0)
    assert greedy(tiny_server, max_new_tokens=8, num_beams=2, pad_token_id=0) == ref.texts(
        max_new_tokens=8, num_beams=2, pad_token_id=0)
    assert_refused(request(tiny_server, pad_token_id=1024), "generate_kwargs.pad_token_id")


@pytest.mark.parametrize("eos_token_id", [725, [725, EOS]])
def test_eos_token_id_stops_generation_there(tiny_server, ref, eos_token_id):
    body = chat(tiny_server, do_sample=False, max_new_tokens=8, eos_token_id=eos_token_id)
    assert body["details"]["generated_tokens"] == [3]  # greedy: 769 214 725
    assert body["details"]["finish_reasons"] == ["stop"]
    assert texts(body) == ref.texts(max_new_tokens=8, eos_token_id=eos_token_id)
    assert_refused(request(tiny_server, eos_token_id=-1), "generate_kwargs.eos_token_id")


# -- scores -------------------------------------------------------------------------------------------------------
def test_output_scores_with_return_dict_in_generate_gives_logprobs(tiny_server, ref):
    both = {"output_scores": True, "return_dict_in_generate": True}
    body = chat(tiny_server, do_sample=False, max_new_tokens=5, **both)
    (logprobs,) = body["details"]["logprobs"]
    ids = torch.tensor([ref.encode(PROMPT)], device=ref.model.device)
    out = ref.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                             pad_token_id=EOS, **both)
    expected = ref.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-4 if ref.model.dtype == torch.float32 else 5e-2)

    for options in ({"seed": 1, "do_sample": True}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}):
        body = chat(tiny_server, max_new_tokens=5, **options, **both)
        details = body["details"]
        assert [len(row) for row in details["logprobs"]] == details["generated_tokens"]
        assert all(value <= 0 for row in details["logprobs"] for value in row)

    for one in ({"output_scores": True}, {"return_dict_in_generate": True}):
        assert "logprobs" not in chat(tiny_server, do_sample=False, max_new_tokens=5, **one)["details"]
