"""Tests for predictor.engine.sampling.group_beam_search (diverse beam search as a transformers-5 `custom_generate` callable).

A tiny random Falcon (both decoder architectures) is enough: the tests check search mechanics, not text quality.
"""

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from predictor.engine.sampling.group_beam_search import group_beam_search

VOCAB = 300
MAX_NEW = 8


@pytest.fixture(scope="module", params=["multi_query", "new_decoder_architecture"])
def model(request):
    if request.param == "new_decoder_architecture":
        arch = {"new_decoder_architecture": True, "num_kv_heads": 2}
    else:
        arch = {"new_decoder_architecture": False}
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                          multi_query=True, bias=False, parallel_attn=True, **arch)
    torch.manual_seed(0)
    model = FalconForCausalLM(config).to(torch.float32).eval()
    # The model is tiny: intra-op threads only add overhead (and oversubscribe busy CI boxes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model
    torch.set_num_threads(threads)


def _prompts(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lengths]


def _left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:], mask[row, width - p.shape[1]:] = p[0], 1
    return ids, mask


def _diverse(model, ids, mask=None, **kwargs):
    kwargs = {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "max_new_tokens": MAX_NEW,
              "pad_token_id": model.config.eos_token_id, **kwargs}
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, custom_generate=group_beam_search, **kwargs)


def _group_of_each_hypothesis(out: GenerateBeamDecoderOnlyOutput, num_beams: int, group_size: int) -> list[int]:
    # Rows of `scores` are prompt*num_beams + group*group_size + beam, so the first beam index names the group.
    return ((out.beam_indices[:, 0] % num_beams) // group_size).tolist()


def test_transformers_core_rejects_group_beam_search(model):
    # Why this module exists: without a callable `custom_generate`, transformers 5 wants Hub remote code.
    (ids,) = _prompts(5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(ids, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=2)


def test_returns_num_return_sequences_per_prompt(model):
    ids = torch.cat(_prompts(6, 6))
    out = _diverse(model, ids, num_return_sequences=3)
    assert out.dtype == torch.long and out.shape == (6, 6 + MAX_NEW)
    assert torch.equal(out[:, :6], ids.repeat_interleave(3, dim=0))  # prompt kept, grouped per prompt


def test_invalid_group_configuration_is_rejected(model):
    (ids,) = _prompts(5)
    with pytest.raises(ValueError, match="multiple of num_beam_groups"):
        _diverse(model, ids, num_beams=3, num_beam_groups=2)
    with pytest.raises(ValueError, match="sampling"):
        _diverse(model, ids, do_sample=True)


def test_deterministic(model):
    ids = torch.cat(_prompts(5, 5))
    assert torch.equal(_diverse(model, ids, num_return_sequences=4), _diverse(model, ids, num_return_sequences=4))


def test_one_beam_per_group_diversity(model):
    # One beam per group: without penalty both groups run the same greedy search; a huge penalty forbids
    # group 1 the token group 0 picks at every step, so the two hypotheses differ from the first token on.
    (ids,) = _prompts(6)
    same = _diverse(model, ids, num_beams=2, diversity_penalty=0.0, num_return_sequences=2)
    diverse = _diverse(model, ids, num_beams=2, diversity_penalty=1e3, num_return_sequences=2)
    assert torch.equal(same[0], same[1])
    assert diverse[0, 6] != diverse[1, 6]
    assert not torch.equal(diverse, same)


def test_diversity_penalty_separates_groups(model):
    (ids,) = _prompts(6)
    kwargs = {"num_beams": 4, "num_beam_groups": 2, "num_return_sequences": 4,
              "return_dict_in_generate": True, "output_scores": True}
    same = _diverse(model, ids, diversity_penalty=0.0, **kwargs)
    diverse = _diverse(model, ids, diversity_penalty=1e3, **kwargs)

    # No penalty: group 1 repeats group 0's search, every hypothesis comes twice.
    assert _group_of_each_hypothesis(same, 4, 2).count(0) == 2
    assert {tuple(s) for s in same.sequences[0::2].tolist()} == {tuple(s) for s in same.sequences[1::2].tolist()}

    # Huge penalty: the groups' first tokens are disjoint, so their best hypotheses differ.
    groups = _group_of_each_hypothesis(diverse, 4, 2)
    first = {g: {int(diverse.sequences[i, 6]) for i in range(4) if groups[i] == g} for g in (0, 1)}
    assert first[0] and first[1] and not first[0] & first[1]
    best = {g: diverse.sequences[groups.index(g)] for g in (0, 1)}
    assert not torch.equal(best[0], best[1])
    assert not torch.equal(diverse.sequences, same.sequences)


def test_diversity_penalty_applies_on_the_last_step(model):
    # At max_length every candidate finishes; later groups must still be penalised for the tokens earlier
    # groups picked, so with one new token the 2 groups x 2 beams yield 4 distinct tokens.
    ids = torch.cat(_prompts(6, 6, seed=7))
    out = _diverse(model, ids, max_new_tokens=1, diversity_penalty=1e3, num_return_sequences=4)
    for tokens in out[:, -1].view(2, 4).tolist():
        assert len(set(tokens)) == 4


@pytest.mark.parametrize("case", [
    pytest.param({"length_penalty": 1.0, "early_stopping": False}, id="lp1-heuristic"),
    pytest.param({"length_penalty": 0.5, "early_stopping": True, "repetition_penalty": 1.3}, id="lp0.5-early-reppen"),
    pytest.param({"length_penalty": 2.0, "early_stopping": "never"}, id="lp2-never"),
    pytest.param({"length_penalty": -1.0, "early_stopping": False}, id="lp-1-heuristic"),
    # Two beams whose two best first tokens are both EOS: all hypotheses finish at step 1, so HF stops there
    # (early_stopping=True / the heuristic) or keeps searching ("never" with a length bonus).
    pytest.param({"num_beams": 2, "eos": "first", "early_stopping": False}, id="stop-heuristic"),
    pytest.param({"num_beams": 2, "eos": "first", "early_stopping": True}, id="stop-early"),
    pytest.param({"num_beams": 2, "eos": "first", "early_stopping": "never", "length_penalty": 2.0}, id="stop-never"),
    # Many EOS tokens, so the hypotheses slots fill while running beams could still improve: only
    # early_stopping=True stops there (for the whole batch once the only prompt is done).
    pytest.param({"num_beams": 2, "eos": "hypotheses", "early_stopping": True}, id="full-early"),
    pytest.param({"num_beams": 2, "eos": "hypotheses", "early_stopping": True, "rows": [1]}, id="full-early-1-prompt"),
])
def test_single_group_equals_hf_beam_search(model, case):
    case = dict(case)
    rows, eos_choice = case.pop("rows", [0, 1]), case.pop("eos", "step2")
    ids, mask = _left_pad(_prompts(7, 4, seed=5), pad=0)
    ids, mask, width = ids[rows], mask[rows], ids.shape[1]
    # pad != eos (and != 0: HF fills with `pad or eos`) keeps early-finished hypotheses visible.
    kwargs = {"num_beams": 4, "max_new_tokens": MAX_NEW, "pad_token_id": 1, "eos_token_id": None,
              "return_dict_in_generate": True, "output_scores": True, **case}
    kwargs["num_return_sequences"] = min(3, kwargs["num_beams"])
    without_eos = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    if eos_choice == "first":
        kwargs["eos_token_id"] = model(ids, attention_mask=mask).logits[:, -1].topk(2).indices.flatten().tolist()
    elif eos_choice == "hypotheses":  # every token the hypotheses pick at step 1
        kwargs["eos_token_id"] = sorted(set(without_eos.sequences[:, width + 1].tolist()))
    else:  # a token the search picks at step 2, so that some hypotheses finish midway
        kwargs["eos_token_id"] = int(without_eos.sequences[0, width + 2])
    reference = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert not torch.equal(reference.sequences, without_eos.sequences)  # finished hypotheses shaped the result
    if eos_choice == "first" and kwargs["early_stopping"] != "never":
        assert len(reference.scores) == 1  # HF stopped after one step

    ours = model.generate(ids, attention_mask=mask, num_beam_groups=1, diversity_penalty=0.0,
                          custom_generate=group_beam_search, **kwargs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert len(ours.scores) == len(reference.scores)  # same number of search steps (early stopping)
    torch.testing.assert_close(ours.sequences_scores, reference.sequences_scores)
    assert torch.equal(ours.beam_indices, reference.beam_indices.long())


def test_left_padded_batch_matches_single_prompts(model):
    # The short prompt is the long one's tail, so both prompts favour similar tokens: a diversity penalty
    # leaking across prompts of the batch would show.
    (long,) = _prompts(7, seed=2)
    short = long[:, -4:]
    pad = model.config.eos_token_id
    ids, mask = _left_pad([long, short], pad)
    kwargs = {"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 1.5, "num_return_sequences": 6}
    batched = _diverse(model, ids, mask, **kwargs)
    alone_long, alone_short = _diverse(model, long, **kwargs), _diverse(model, short, **kwargs)
    assert torch.equal(batched[:6, :alone_long.shape[1]], alone_long)
    assert torch.equal(batched[6:, 3:3 + alone_short.shape[1]], alone_short)  # drop the 3 pad columns


def test_kv_cache_reordering_matches_recomputation(model):
    ids, mask = _left_pad(_prompts(7, 4, seed=4), pad=model.config.eos_token_id)
    kwargs = {"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 0.5, "num_return_sequences": 6}
    assert torch.equal(_diverse(model, ids, mask, use_cache=True, **kwargs),
                       _diverse(model, ids, mask, use_cache=False, **kwargs))


def test_return_dict_with_scores(model):
    ids, mask = _left_pad(_prompts(6, 5, seed=5), pad=model.config.eos_token_id)
    # A small penalty, so group 1 still shares some tokens with group 0 and pays the penalty for them.
    kwargs = {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.05, "num_return_sequences": 4,
              "length_penalty": 0.7}
    out = _diverse(model, ids, mask, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    assert torch.equal(out.sequences, _diverse(model, ids, mask, **kwargs))
    steps = out.sequences.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == steps and out.scores[0].shape == (2 * 4, VOCAB)
    assert out.beam_indices.shape == (8, steps) and out.sequences_scores.shape == (8,)
    assert out.cache is not None
    assert (out.sequences_scores.view(2, 4).diff(dim=1) <= 0).all()  # best hypothesis first, per prompt

    # Per-token scores (diversity penalty included) add up to each hypothesis' length-normalised score.
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    generated = (out.beam_indices >= 0).sum(dim=1)
    torch.testing.assert_close(transition.sum(dim=1) / generated**0.7, out.sequences_scores)
