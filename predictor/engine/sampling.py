"""Choosing each sequence's next token, with every sequence's own options, inside a shared batch.

Sequences in one batch may ask for different things (greedy or sampled, their own temperature, top-k, seed, banned
words...). The logits processors are transformers' own, so each option means exactly what it means in
``generate``; they are applied to each sequence's own unpadded token ids, so a sequence gets the same tokens alone
or in a batch. Options that do not depend on the token ids (the sampling warpers) run once per group of sequences
that share them, which in practice is the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .options import GenerationOptions

WarpKey = tuple[float, int, float, float]  # temperature, top_k, top_p, typical_p


@dataclass
class SequenceSampler:
    """How one sequence picks its tokens; built once when the sequence starts."""

    prompt_len: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]
    processors: LogitsProcessorList  # those that read the sequence's token ids
    warp_key: WarpKey | None  # None: greedy
    generator: torch.Generator | None  # set when the request gave a seed
    logprobs: bool


def make_sampler(options: GenerationOptions, prompt_ids: list[int], sequence_index: int,
                 device: torch.device) -> SequenceSampler:
    """The sampler for sequence ``sequence_index`` of a request (several with num_return_sequences)."""
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
    if options.encoder_no_repeat_ngram_size > 0:
        # On a decoder-only model the "encoder input" is the prompt: its n-grams may not be repeated.
        processors.append(EncoderNoRepeatNGramLogitsProcessor(options.encoder_no_repeat_ngram_size,
                                                              torch.tensor([prompt_ids], device=device)))
    if options.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor([list(w) for w in options.bad_words_ids],
                                                    list(options.eos_token_ids) or None))
    if options.forced_bos_token_id is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(options.forced_bos_token_id))
    if options.forced_eos_token_id:
        processors.append(ForcedEOSTokenLogitsProcessor(len(prompt_ids) + options.max_new_tokens,
                                                        list(options.forced_eos_token_id), device=device))
    if options.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    generator = None
    if options.seed is not None and options.do_sample:
        generator = torch.Generator(device=device).manual_seed(sequence_seed(options.seed, sequence_index))
    warp_key = (options.temperature, options.top_k, options.top_p, options.typical_p) if options.do_sample else None
    return SequenceSampler(prompt_len=len(prompt_ids), min_new_tokens=options.min_new_tokens,
                           eos_token_ids=options.eos_token_ids, processors=processors, warp_key=warp_key,
                           generator=generator, logprobs=options.logprobs)


def sequence_seed(seed: int, sequence_index: int) -> int:
    """The seed of sequence ``sequence_index`` of a request: distinct per sequence, and unlike ``seed + index``
    not the seed another request's first sequence would use."""
    return (seed * 1_000_003 + sequence_index * 7_919) % 2**63


def choose_next_tokens(logits: torch.Tensor, samplers: list[SequenceSampler], sequences: list[list[int]],
                       rng: torch.Generator | None = None) -> tuple[list[int], list[float | None]]:
    """Pick one token per row of ``logits`` [batch, vocab]; ``sequences`` holds each row's ids so far.

    Sequences without a seed of their own draw from ``rng`` (the batcher's), never from torch's global generator,
    which a seeded beam search on another thread may be using."""
    scores = logits.float()  # [batch, vocab]
    _apply_id_processors(scores, samplers, sequences)
    _suppress_early_eos(scores, samplers, sequences)
    groups = _group_by_warp(samplers)
    if len(groups) == 1:  # the usual case: every sequence shares its warpers, no indexing needed
        (warp_key, rows), = groups.items()
        if warp_key is not None:
            scores = _warp(scores, warp_key)
        tokens = _pick(scores, warp_key, [samplers[i].generator or rng for i in rows])
    else:
        tokens = torch.empty(len(samplers), dtype=torch.long, device=scores.device)
        for warp_key, rows in groups.items():
            index = torch.tensor(rows, device=scores.device)
            if warp_key is not None:
                scores[index] = _warp(scores[index], warp_key)
            tokens[index] = _pick(scores[index], warp_key, [samplers[i].generator or rng for i in rows])
    chosen = tokens.tolist()
    return chosen, _logprobs(scores, tokens, samplers)


def _apply_id_processors(scores: torch.Tensor, samplers: list[SequenceSampler], sequences: list[list[int]]) -> None:
    for row, sampler in enumerate(samplers):
        if sampler.processors:
            ids = torch.tensor([sequences[row]], device=scores.device)  # [1, seq]
            scores[row : row + 1] = sampler.processors(ids, scores[row : row + 1])


def _suppress_early_eos(scores: torch.Tensor, samplers: list[SequenceSampler], sequences: list[list[int]]) -> None:
    """min_new_tokens / min_length: eos may not be chosen before that many tokens were generated."""
    rows, columns = [], []
    for row, sampler in enumerate(samplers):
        if len(sequences[row]) - sampler.prompt_len < sampler.min_new_tokens:
            rows += [row] * len(sampler.eos_token_ids)
            columns += sampler.eos_token_ids
    if rows:  # one indexed write for the whole batch
        scores[torch.tensor(rows, device=scores.device), torch.tensor(columns, device=scores.device)] = -torch.inf


def _group_by_warp(samplers: list[SequenceSampler]) -> dict[WarpKey | None, list[int]]:
    groups: dict[WarpKey | None, list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault(sampler.warp_key, []).append(row)
    return groups


def _warp(scores: torch.Tensor, key: WarpKey) -> torch.Tensor:
    """transformers' sampling warpers, in generate's order."""
    temperature, top_k, top_p, typical_p = key
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if typical_p < 1.0:
        scores = TypicalLogitsWarper(typical_p)(None, scores)
    return scores


def _pick(scores: torch.Tensor, warp_key: WarpKey | None, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Greedy rows take the best token; sampled rows draw from their (already warped) distribution."""
    if warp_key is None:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    broken = ~torch.isfinite(probs).all(dim=-1)  # every token banned, or logits that overflowed
    if broken.any():
        # Such a row has no distribution to sample from; its best finite score is the only sensible choice, and a
        # bad row must not fail the other requests sharing the batch.
        best = torch.nan_to_num(scores[broken], nan=-torch.inf).argmax(dim=-1)
        probs[broken] = torch.nn.functional.one_hot(best, probs.shape[-1]).to(probs.dtype)
    return _sample(probs, generators)


def _sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row; rows with a seed use their own generator so batching cannot change their draws."""
    if all(g is generators[0] for g in generators):
        return torch.multinomial(probs, num_samples=1, generator=generators[0]).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], num_samples=1, generator=g) for i, g in enumerate(generators)])


def _logprobs(scores: torch.Tensor, tokens: torch.Tensor, samplers: list[SequenceSampler]) -> list[float | None]:
    wanted = [row for row, sampler in enumerate(samplers) if sampler.logprobs]
    values: list[float | None] = [None] * len(samplers)
    if wanted:
        index = torch.tensor(wanted, device=scores.device)
        picked = scores[index].log_softmax(dim=-1).gather(1, tokens[index].unsqueeze(1)).squeeze(1)
        for row, value in zip(wanted, picked.tolist()):
            values[row] = value
    return values
