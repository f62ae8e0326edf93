"""Token choice for a whole batch in one call, without a model: each row's options, batched, mean exactly what
transformers' own processors and warpers mean for that row alone; a seeded row draws the same whatever its batch."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from predictor.engine.options import GenerationOptions
from predictor.engine.sampling.choice import (MIN_NEW, TEMPERATURE, TOP_K, ChoicePlan, SamplingTable, _penalize,
                                              _suppress_early_eos, _warp_rows, choose_tokens)
from predictor.engine.sampling.sampler import OpenAIPenalties, make_sampler, warp

CPU = torch.device("cpu")
VOCAB = 64
SAMPLED_ROWS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_k=200),  # past the vocabulary: every token stays
    dict(top_p=0.8),
    dict(min_p=0.2),
    dict(typical_p=0.6),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95),
    dict(top_k=10, top_p=0.7),  # top-k read from top-p's sort
    dict(eta_cutoff=0.01, top_k=30),  # a rare warper: transformers' own run for the row
    dict(),
]


def sampler(prompt=(1, 2), **options):
    return make_sampler(GenerationOptions(max_new_tokens=8, **options), list(prompt), 0, CPU, None)


def table_for(samplers, prompts):
    table = SamplingTable(CPU, VOCAB)
    for row, (s, prompt) in enumerate(zip(samplers, prompts)):
        table.set_row(row, s, list(prompt))
    table.commit()  # read below without choose_tokens, which commits
    return table, ChoicePlan.of(samplers, list(range(len(samplers))), CPU)


def test_each_rows_warpers_are_transformers_own_for_that_row():
    samplers = [sampler(do_sample=True, **o) for o in SAMPLED_ROWS] + [sampler()]  # and one greedy row
    table, plan = table_for(samplers, [(1, 2)] * len(samplers))
    scores = torch.randn(len(samplers), VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    batched = _warp_rows(scores, table.values[plan.rows], table.counters[plan.rows], plan)
    for row, s in enumerate(samplers):
        alone = warp(scores[row:row + 1], s.warp_key)[0] if s.warp_key else scores[row]
        assert torch.equal(batched[row], alone), SAMPLED_ROWS[row] if row < len(SAMPLED_ROWS) else "greedy"


def test_penalties_and_min_new_tokens_are_batched_with_transformers_meaning():
    prompts = [(3, 4, 4), (5,), (3, 9)]
    samplers = [sampler(prompts[0], repetition_penalty=1.5, min_new_tokens=2, eos_token_ids=(7, 8)),
                sampler(prompts[1], presence_penalty=0.5, frequency_penalty=0.25, eos_token_ids=(7,)),
                sampler(prompts[2])]
    table, plan = table_for(samplers, prompts)
    generated = [[6, 6], [6, 5, 6], [3]]
    for step in range(3):  # the tokens generated so far, one a step, as the batch counts them
        rows = torch.tensor([i for i in range(3) if step < len(generated[i])])
        table.advance(rows, torch.tensor([generated[i][step] for i in rows.tolist()]))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    expected = logits.clone()
    ids = [list(p) + g for p, g in zip(prompts, generated)]
    expected[0:1] = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([ids[0]]), expected[0:1])
    expected[1:2] = OpenAIPenalties(1, 0.5, 0.25)(torch.tensor([ids[1]]), expected[1:2])
    values, counters = table.values[plan.rows], table.counters[plan.rows]
    scores = _suppress_early_eos(_penalize(logits, values, table.seen, table.counts), counters, table.eos)
    assert torch.equal(scores, expected)  # row 0 generated 2 tokens, its minimum: its eos ids are allowed again
    table.counters[0, MIN_NEW] = 3  # a minimum of 3 new tokens: both of its eos ids are banned, the others' are not
    scores = _suppress_early_eos(logits, table.counters[plan.rows], table.eos[plan.rows])
    assert scores[0, 7] == scores[0, 8] == -torch.inf and torch.isfinite(scores[1:]).all()


def test_a_seeded_row_draws_the_same_in_any_batch():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))

    def draws(crowd: int) -> list[int]:
        samplers = [sampler(do_sample=True, top_k=40)] * crowd + [sampler(do_sample=True, seed=11, top_k=40)]
        table, plan = table_for(samplers, [(1, 2)] * len(samplers))
        rng = torch.Generator().manual_seed(crowd)
        return [choose_tokens(logits.expand(len(samplers), -1), plan, table, [], rng)[0][-1].item()
                for _ in range(20)]

    assert draws(0) == draws(3) == draws(7)
    assert len(set(draws(0))) > 1


def test_the_exponential_race_samples_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    samplers = [sampler(do_sample=True)] * 4000
    table = SamplingTable(CPU, 4)
    for row in range(len(samplers)):
        table.set_row(row, samplers[row], [0])
    plan = ChoicePlan.of(samplers, list(range(len(samplers))), CPU)
    tokens, _ = choose_tokens(probs.log().expand(len(samplers), -1), plan, table, [], torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=4) / len(samplers)
    assert torch.allclose(frequencies, probs, atol=0.03), frequencies


@pytest.mark.parametrize("broken", [float("nan"), -float("inf")])
def test_a_row_with_no_distribution_takes_its_best_finite_score_and_spares_the_others(broken):
    samplers = [sampler(do_sample=True), sampler(do_sample=True, seed=1)]
    table, plan = table_for(samplers, [(1,), (1,)])
    logits = torch.full((2, VOCAB), -5.0)
    logits[0] = broken
    logits[0, 9] = 1.0 if broken != broken else -torch.inf  # nan row: one finite best; all -inf: the first
    logits[1, 4] = 50.0
    tokens, _ = choose_tokens(logits, plan, table, [], torch.Generator().manual_seed(0))
    assert tokens.tolist() == [9 if broken != broken else 0, 4]


def test_new_rows_options_are_written_together_at_the_next_commit_and_the_last_one_given_a_row_wins():
    table = SamplingTable(CPU, VOCAB)
    table.set_row(0, sampler(do_sample=True, temperature=0.5), [1])
    table.set_row(1, sampler(do_sample=True, top_k=7), [1])
    table.set_row(0, sampler(do_sample=True, temperature=0.25), [1])  # row 0 freed and given again before a step
    assert table.values[:, TEMPERATURE].tolist() == [0.0, 0.0]  # nothing written per row
    table.commit()
    assert table.values[:, TEMPERATURE].tolist() == [0.25, 1.0] and table.counters[1, TOP_K] == 7
