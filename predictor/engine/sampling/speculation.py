"""Speculative decoding's pure parts (its configuration is ``options.SpeculativeConfig``): n-gram drafting
(prompt lookup), how many drafts each verified sequence keeps, how far a sequence drafts, and the per-position view
of the sampling table that lets a row's drafts be checked with exactly the choice the one-token step would make.

A sequence's last token and its drafts go through the model together, causally; position ``j``'s logits predict
the token after draft ``j``. The token at each position is chosen as the plain step would choose it (same options,
penalties counting the drafts before it, the same draw of the request's own generator), and a draft is kept while it
equals the token chosen before it: sample-and-match, so the output is the one the plain engine would give, token for
token for greedy and seeded requests, and in distribution for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..transfer import to_device
from .choice import GENERATED, SamplingTable

# A sequence whose drafts keep failing stops drafting for this many steps, twice as many after each further failed
# try, up to ``MOST_PAUSE_STEPS``. A try costs a verifying step (one extra token, and the step's overlap with the
# host); with drafts that always fail, the three shrinking drafts and the tries cost 128-token requests a few per
# cent of their steps and longer ones less (benchmarks/speculative.py, workload (c)).
PAUSE_STEPS = 32
MOST_PAUSE_STEPS = 1024


def propose_ngram(tokens: Sequence[int], k: int, shortest: int, longest: int) -> list[int]:
    """Up to ``k`` drafts for what follows ``tokens``: find the latest earlier occurrence of its last n tokens
    (the longest n from ``longest`` down to ``shortest`` that occurs) and copy what followed it. A match close to
    the end continues with its own drafts, so a loop of period p drafts k tokens, not p."""
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(longest, len(ids) - 1), shortest - 1, -1):
        # windows that end before the last token, so each is followed by a token: [len - n, n]
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            follows = int(hits[-1]) + n
            extended = ids.tolist()
            for j in range(k):
                extended.append(extended[follows + j])
            return extended[len(ids):]
    return []


def accepted_drafts(chosen: Sequence[int], drafts: Sequence[int]) -> int:
    """How many of ``drafts`` are kept: those equal to the token chosen at the position before them.
    ``chosen`` [len(drafts) + 1] holds the token chosen after the last token and after each draft."""
    for j, draft in enumerate(drafts):
        if chosen[j] != draft:
            return j
    return len(drafts)


@dataclass
class DraftLength:
    """How many tokens one sequence drafts: ``most`` while its drafts are taken, halved after each step in which
    it drafted and none was taken (or it found nothing to draft), down to 0. At 0 it waits ``PAUSE_STEPS`` steps,
    then tries one draft; each try whose draft fails doubles the wait (up to ``MOST_PAUSE_STEPS``), one that is
    taken brings it back."""

    most: int
    k: int = -1  # -1: ``most``
    wait: int = 0
    pause: int = PAUSE_STEPS

    def __post_init__(self) -> None:
        if self.k < 0:
            self.k = self.most

    def this_step(self) -> int:
        """The drafts wanted this step (0: none); a step counts down the wait of a sequence at 0."""
        if self.k:
            return self.k
        if self.wait:
            self.wait -= 1
            return 0
        return 1

    def record(self, drafted: int, accepted: int) -> None:
        """A step that asked for drafts made ``drafted`` and kept ``accepted``."""
        if accepted:
            self.k = min(self.most, max(2 * self.k, 1)) if accepted == drafted else max(self.k, 1)
            self.pause = PAUSE_STEPS
            return
        if self.k == 0 and drafted:  # a try whose draft failed (finding none to try costs nothing to verify)
            self.pause = min(2 * self.pause, MOST_PAUSE_STEPS)
        self.k //= 2
        if self.k == 0:
            self.wait = self.pause


def position_table(table: SamplingTable, rows: Sequence[int], drafts: Sequence[Sequence[int]]) -> SamplingTable:
    """A sampling table with one row per verified position: cache row ``rows[i]``'s options at each of its
    ``len(drafts[i]) + 1`` positions, with its generated count and penalty state as they will be once the drafts
    before that position were chosen. Positions are in order, row by row."""
    table.commit()
    device = table.device
    spans = [len(d) + 1 for d in drafts]
    index = to_device([row for row, span in zip(rows, spans) for _ in range(span)], device, torch.long)  # [P]
    view = SamplingTable(device, table.vocab_size)
    view.values, view.eos = table.values[index], table.eos[index]
    view.counters = table.counters[index]  # gathered: a copy
    view.counters[:, GENERATED] += to_device([j for span in spans for j in range(span)], device, torch.long)
    if table.seen is not None:
        view.seen, view.counts = table.seen[index], table.counts[index]
        # (position, draft) for every draft before each position
        pairs = [(start + j, token) for start, d in zip(np.cumsum([0, *spans[:-1]]), drafts)
                 for j in range(1, len(d) + 1) for token in d[:j]]
        if pairs:
            at, tokens = to_device(pairs, device, torch.long).unbind(1)
            view.seen[at, tokens] = True
            view.counts.index_put_((at, tokens), torch.ones(len(pairs), device=device), accumulate=True)
    return view
