"""The sampler's own pieces, without a model: OpenAI's penalties, log-probabilities with their top alternatives,
and the grammar mask."""

from __future__ import annotations

import json

import jsonschema
import torch
from transformers import AutoTokenizer

from predictor.engine.sampling.grammar import GrammarMask, json_schema_grammar
from predictor.engine.options import GenerationOptions
from predictor.engine.sampling.choice import ChoicePlan, SamplingTable, choose_tokens
from predictor.engine.sampling.sampler import LOWEST_LOGPROB, OpenAIPenalties, make_sampler


def choose_next_tokens(logits, samplers, sequences, rng=None):
    """Choose with a table made for these rows alone (rows 0..n-1): the tokens and log-probabilities, as lists."""
    table = SamplingTable(torch.device("cpu"), logits.shape[-1])
    for row, (sampler, ids) in enumerate(zip(samplers, sequences)):
        table.set_row(row, sampler, ids)
    plan = ChoicePlan.of(samplers, list(range(len(samplers))), torch.device("cpu"))
    tokens, logprobs = choose_tokens(logits, plan, table, sequences, rng or torch.Generator().manual_seed(0))
    return tokens.tolist(), logprobs or [None] * len(samplers)


def test_penalties_count_generated_tokens_only():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[1, 1, 2, 3, 3, 3, 4]])  # prompt [1, 1, 2]; generated 3, 3, 3, 4
    out = OpenAIPenalties(prompt_len=3, presence_penalty=0.5, frequency_penalty=0.25)(ids, scores)
    assert out.tolist() == [[0, 0, 0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0]]


def test_logprobs_come_with_ordered_top_alternatives(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    options = GenerationOptions(max_new_tokens=4, logprobs=True, top_logprobs=3, suppress_tokens=(0,))
    sampler = make_sampler(options, [5, 6], 0, torch.device("cpu"), tokenizer)
    plain = make_sampler(GenerationOptions(max_new_tokens=4), [5, 6], 0, torch.device("cpu"), tokenizer)
    logits = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.0], [9.0, 1.0, 3.0, 2.0, 0.0]])
    tokens, logprobs = choose_next_tokens(logits, [sampler, plain], [[5, 6], [5, 6]])
    assert tokens == [2, 0] and logprobs[1] is None
    chosen = logprobs[0]
    assert [token for token, _ in chosen.top] == [2, 3, 1] and chosen.top[0][1] == chosen.logprob
    expected = logits[0, 1:].log_softmax(-1)[1].item()
    assert abs(chosen.logprob - expected) < 1e-6
    full = make_sampler(GenerationOptions(max_new_tokens=4, logprobs=True, top_logprobs=5, suppress_tokens=(0,)),
                        [5], 0, torch.device("cpu"), tokenizer)
    _, (banned,) = choose_next_tokens(logits[:1], [full], [[5]])
    assert banned.top[-1] == (0, LOWEST_LOGPROB)  # -inf is not JSON


def test_the_grammar_mask_makes_noise_follow_the_schema(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    mask = GrammarMask(json_schema_grammar(schema), tokenizer, prompt_len=1)
    generator = torch.Generator().manual_seed(0)
    ids = [7]
    for _ in range(40):
        scores = mask(torch.tensor([ids]), torch.randn(1, 1024, generator=generator))
        ids.append(int(torch.multinomial(scores.softmax(-1), 1, generator=generator)))
        if ids[-1] == tokenizer.eos_token_id:
            break
    jsonschema.validate(json.loads(tokenizer.decode(ids[1:], skip_special_tokens=True)), schema)
