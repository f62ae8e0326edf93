"""Token choice for the whole running batch in one call on the device, each row with its own options.

Every cache row's options (temperature, top-k, top-p, min-p, typical-p, penalties, min_new_tokens and its eos ids)
live in device tensors (``SamplingTable``), written when sequences take rows (once a step for all of them); a step
gathers them by the rows it runs. Each warper is the batched form of transformers' own, with the same arithmetic,
applied only where a row asks for it, so each option keeps its exact ``generate`` meaning; greedy rows take the best
token of the processed scores. Sampled rows draw by the exponential race, ``argmax(probs / noise)`` with
``noise ~ Exp(1)`` (as gpt-fast and vLLM do): one kernel for every row and no read-back, unlike ``multinomial`` per
generator. A row with a seed draws its noise from its own generator, always one vocabulary's worth per step, so its
tokens do not depend on its batch; the other rows share the batch's generator.

What the host needs to know about a step's rows (which options anyone uses, who has a seed, who wants
log-probabilities) is a ``ChoicePlan``, made when the rows change, not every step. The rare options that read a
sequence's ids (n-gram bans, bad words, sequence bias, grammars, ...) keep transformers' processors, run for the
rows that use them only; a row with one of those keeps its penalties in the same list, in ``generate``'s order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transfer import to_device
from .sampler import SequenceSampler, TokenLogprob, token_logprobs, warp

# Columns of ``SamplingTable.values`` (float32, as transformers' warpers compare and divide in the scores' dtype)
TEMPERATURE, TOP_P_DROP, MIN_P, TYPICAL_P, REPETITION, PRESENCE, FREQUENCY, GREEDY = range(8)
# Columns of ``SamplingTable.counters``
TOP_K, MIN_NEW, GENERATED = range(3)


class SamplingTable:
    """Each cache row's sampling options and penalty state, on the device."""

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device, self.vocab_size = device, vocab_size
        self.values = torch.zeros(0, 8, device=device)  # [rows, 8]
        self.counters = torch.zeros(0, 3, dtype=torch.long, device=device)  # [rows, 3]
        self.eos = torch.zeros(0, 1, dtype=torch.long, device=device)  # [rows, eos ids]: banned before min_new
        self.seen: torch.Tensor | None = None  # [rows, vocab] bool: prompt and generated ids (repetition penalty)
        self.counts: torch.Tensor | None = None  # [rows, vocab]: times each token was generated (OpenAI penalties)
        self._staged: dict[int, tuple[list[float], list[int], list[int]]] = {}  # row -> options not yet written

    def set_row(self, row: int, sampler: SequenceSampler, prompt_ids: list[int]) -> None:
        """Give ``row`` to a sequence starting with ``prompt_ids``: its penalty state is reset now, its options are
        written with the other new rows' at the next ``commit``."""
        self._grow(row + 1, len(sampler.eos_token_ids))
        r = sampler.row_options
        self._staged[row] = ([r.temperature, r.top_p_drop, r.min_p, r.typical_p, r.repetition_penalty,
                              r.presence_penalty, r.frequency_penalty, float(sampler.warp_key is None)],
                             [r.top_k, sampler.min_new_tokens if sampler.eos_token_ids else 0, 0],
                             list(sampler.eos_token_ids))
        if r.penalized:
            if self.seen is None:
                rows = self.values.shape[0]
                self.seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
                self.counts = torch.zeros(rows, self.vocab_size, device=self.device)
            self.seen[row] = False
            self.seen[row, to_device(prompt_ids, self.device, torch.long)] = True
            self.counts[row] = 0

    def commit(self) -> None:
        """Write the options of the rows given since the last commit: three copies for all of them (a burst of
        admissions writes once, not three times a row). Everything that reads the table commits first."""
        if not self._staged:
            return
        staged, self._staged = self._staged, {}
        width = self.eos.shape[1]  # a row's padding repeats its first id: banning it twice is harmless
        rows = to_device(list(staged), self.device, torch.long)
        self.values[rows] = to_device([values for values, _, _ in staged.values()], self.device, torch.float32)
        self.counters[rows] = to_device([counters for _, counters, _ in staged.values()], self.device, torch.long)
        self.eos[rows] = to_device([(ids + ids[:1] * width)[:width] if ids else [0] * width
                                    for _, _, ids in staged.values()], self.device, torch.long)

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """``tokens`` [n] were chosen for cache ``rows`` [n] (a row may appear more than once: a speculating
        step gives a row several tokens): count them, on the device."""
        self.commit()
        self.counters[:, GENERATED].index_add_(0, rows, torch.ones_like(rows))
        if self.seen is not None:
            self.seen[rows, tokens] = True
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)

    def _grow(self, rows: int, eos_ids: int) -> None:
        """Room for ``rows`` rows and ``eos_ids`` eos ids a row (the KV cache may be reserved anew, larger)."""
        if eos_ids > self.eos.shape[1]:  # padded as ``commit`` pads
            self.eos = torch.cat([self.eos, self.eos[:, :1].expand(-1, eos_ids - self.eos.shape[1])], dim=1)
        more = rows - self.values.shape[0]
        if more <= 0:
            return
        self.values = torch.cat([self.values, self.values.new_zeros(more, 8)])
        self.counters = torch.cat([self.counters, self.counters.new_zeros(more, 3)])
        self.eos = torch.cat([self.eos, self.eos.new_zeros(more, self.eos.shape[1])])
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(more, self.vocab_size)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(more, self.vocab_size)])


@dataclass(frozen=True)
class ChoicePlan:
    """What the host knows of a step's rows, made when they change: which batched options anyone uses, and the
    few rows that need something of their own."""

    rows: torch.Tensor  # [n] each logits row's cache row
    samplers: tuple[SequenceSampler, ...]
    sampled: bool  # any row samples
    greedy: bool  # any row is greedy
    temperature: bool
    top_k: int  # the largest top-k asked (0: none)
    top_p: bool
    min_p: bool
    typical_p: bool
    penalties: bool
    min_new: bool  # any row bans its eos ids for its first tokens
    id_rows: tuple[int, ...]  # rows whose own processors read their ids
    rare_warps: tuple[tuple[object, torch.Tensor], ...]  # (warp key, rows) warped by transformers' own warpers
    seeded: tuple[tuple[int, torch.Generator], ...]
    logprob_rows: tuple[int, ...]

    @classmethod
    def of(cls, samplers: list[SequenceSampler], rows: list[int], device: torch.device) -> ChoicePlan:
        options = [s.row_options for s in samplers]
        rare: dict[object, list[int]] = {}
        for i, sampler in enumerate(samplers):
            if sampler.row_options.rare_warp:
                rare.setdefault(sampler.warp_key, []).append(i)
        return cls(rows=to_device(rows, device, torch.long), samplers=tuple(samplers),
                   sampled=any(s.warp_key is not None for s in samplers),
                   greedy=any(s.warp_key is None for s in samplers),
                   temperature=any(o.temperature != 1.0 for o in options),
                   top_k=max((o.top_k for o in options), default=0),
                   top_p=any(o.top_p_drop > 0.0 for o in options), min_p=any(o.min_p > 0.0 for o in options),
                   typical_p=any(o.typical_p < 1.0 for o in options), penalties=any(o.penalized for o in options),
                   min_new=any(s.min_new_tokens > 0 and s.eos_token_ids for s in samplers),
                   id_rows=tuple(i for i, s in enumerate(samplers) if s.processors),
                   rare_warps=tuple((key, to_device(idx, device, torch.long)) for key, idx in rare.items()),
                   seeded=tuple((i, s.generator) for i, s in enumerate(samplers) if s.generator is not None),
                   logprob_rows=tuple(i for i, s in enumerate(samplers) if s.logprobs))


def choose_tokens(logits: torch.Tensor, plan: ChoicePlan, table: SamplingTable, sequences: list[list[int]],
                  rng: torch.Generator) -> tuple[torch.Tensor, list[TokenLogprob | None] | None]:
    """One token per row of ``logits`` [n, vocab], on the device (nothing is read back unless a row wants its
    log-probability); ``sequences`` holds each row's ids so far (read only by the rows in ``plan.id_rows``).
    Returns the tokens [n] and, when any row asked, each row's log-probability (None for the others)."""
    table.commit()
    scores = logits.float()  # [n, vocab]
    if plan.id_rows:  # written in place below: the caller's logits stay as they were, for a retry
        scores = scores.clone()
    for i in plan.id_rows:
        ids = to_device([sequences[i]], scores.device, torch.long)  # [1, seq]
        scores[i:i + 1] = plan.samplers[i].processors(ids, scores[i:i + 1])
    values = table.values[plan.rows] if plan.sampled or plan.penalties else None  # [n, 8]
    counters = table.counters[plan.rows] if plan.top_k or plan.min_new else None  # [n, 3]
    if plan.penalties:
        scores = _penalize(scores, values, table.seen[plan.rows], table.counts[plan.rows])
    if plan.min_new:
        scores = _suppress_early_eos(scores, counters, table.eos[plan.rows])
    if plan.sampled:
        scores = _warp_rows(scores, values, counters, plan)
        tokens = _pick(scores, values[:, GREEDY].bool() if plan.greedy else None, plan, rng)
    else:
        tokens = scores.argmax(dim=-1)
    logprobs = token_logprobs(scores, tokens, list(plan.samplers), plan.logprob_rows) if plan.logprob_rows else None
    return tokens, logprobs


def _penalize(scores: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty over the prompt and generated ids, then OpenAI's presence and frequency
    penalties over the generated ones; neutral values (1, 0, 0) leave a row's scores as they are."""
    repetition = values[:, REPETITION, None]
    penalized = torch.where(scores < 0, scores * repetition, scores / repetition)
    scores = torch.where(seen, penalized, scores)
    return (scores - values[:, FREQUENCY, None] * counts
            - values[:, PRESENCE, None] * (counts > 0).to(scores.dtype))


def _suppress_early_eos(scores: torch.Tensor, counters: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """min_new_tokens: a row's eos ids [n, e] may not be chosen before it generated that many tokens."""
    early = (counters[:, GENERATED] < counters[:, MIN_NEW]).unsqueeze(1)  # [n, 1]
    return scores.scatter(1, eos, torch.where(early, -torch.inf, scores.gather(1, eos)))


def _warp_rows(scores: torch.Tensor, values: torch.Tensor, counters: torch.Tensor, plan: ChoicePlan
               ) -> torch.Tensor:
    """transformers' warpers in generate's order, each with every row's own value; a row that does not use one
    (greedy rows use none) keeps its scores bit for bit. Rows with top-h, epsilon or eta run transformers' own."""
    processed, width = scores, scores.shape[-1]
    if plan.temperature:
        scores = scores / values[:, TEMPERATURE, None]
    if plan.top_p:  # one sort serves top-k too: top-k's cut keeps the order, so its result is top-p's sort
        ascending, order = scores.sort(dim=-1)
    if plan.top_k:
        k = counters[:, TOP_K].clamp(max=width)  # [n]
        if plan.top_p:
            kth = ascending.gather(1, (width - k).clamp(max=width - 1)[:, None])
        else:
            kth = scores.topk(min(plan.top_k, width), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        cut = (k > 0)[:, None]
        scores = scores.masked_fill((scores < kth) & cut, -torch.inf)
        if plan.top_p:
            ascending = ascending.masked_fill((ascending < kth) & cut, -torch.inf)
    if plan.top_p:
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= values[:, TOP_P_DROP, None]
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    if plan.min_p:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < values[:, MIN_P, None] * probs.amax(dim=-1, keepdim=True), -torch.inf)
    if plan.typical_p:
        scores = _typical(scores, values[:, TYPICAL_P])
    for key, rows in plan.rare_warps:
        scores = scores.index_put((rows,), warp(processed[rows], key))
    return scores


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' ``TypicalLogitsWarper`` with each row's own mass [n]; rows with mass 1 are left alone."""
    normalized = scores.log_softmax(dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted, order = (-normalized - entropy).abs().sort(dim=-1)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=shifted.shape[-1] - 1)
    drop = shifted > shifted.gather(1, last[:, None])
    drop[:, 0] = False
    drop &= (mass < 1.0)[:, None]
    return scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)


def _pick(scores: torch.Tensor, greedy: torch.Tensor | None, plan: ChoicePlan, rng: torch.Generator
          ) -> torch.Tensor:
    """Greedy rows take their best token; sampled rows race exponential noise, with no read-back. A row with no
    distribution (every token banned, or logits that overflowed) takes its best finite score: a bad row must not
    fail the others sharing the batch."""
    probs = scores.softmax(dim=-1)  # [n, vocab]
    # Exp(1) noise as -log(U), U in [0, 1): in (0, inf], so no 0/0; several times cheaper than exponential_ on a CPU
    uniform = torch.rand(probs.shape, generator=rng, device=probs.device)
    for row, generator in plan.seeded:  # its own draws only: the same whatever its batch
        uniform[row] = torch.rand(probs.shape[-1], generator=generator, device=probs.device)
    raced = (probs / uniform.log_().neg_()).argmax(dim=-1)
    broken = probs[:, 0].isnan()  # softmax of a row all -inf, or with +inf or nan in it: nan throughout
    raced = torch.where(broken, scores.nan_to_num(nan=-torch.inf).argmax(dim=-1), raced)
    return raced if greedy is None else torch.where(greedy, scores.argmax(dim=-1), raced)
