"""The decode step's speculation: which running sequences draft this step and what, the choice of their tokens at
every verified position, and their bursts of accepted tokens given to the sequences (``docs/speculative-decoding.md``).

A speculating step is not one step ahead: the sequences' last tokens must be on the host to draft from, and a
sequence's next input depends on how many of its drafts were taken, so the step reads back the tokens the step
before chose before planning, and reads its own back before the next. It speculates only while the batch is small
(``disable_by_batch_size``), where a step waits on reading the weights rather than on the host, and only while some
sequence's drafts are being taken (``DraftLength``): otherwise steps run one step ahead as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ... import metrics
from ..model.kv_cache import KVCache
from ..sampling.choice import ChoicePlan, SamplingTable, choose_tokens
from ..sampling.sampler import TokenLogprob, stopped_on_strings
from ..options import SpeculativeConfig
from ..sampling.speculation import DraftLength, accepted_drafts, position_table, propose_ngram
from .running import RunningSequence
from .tickets import TokenEvent, emit_all
from ..transfer import to_device

Proposer = Callable[[RunningSequence, int], list[int]]  # a sequence and k: at most k drafts
# sequences and each one's k: at most that many drafts each (a draft model drafts for all of them at once)
BatchProposer = Callable[[list[RunningSequence], list[int]], list[list[int]]]


@dataclass
class Burst:
    """What one verified sequence may take this step: the token chosen after its last token and after each draft
    it kept, in order, with their log-probabilities (None where not asked)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


class Speculator:
    """Drafts for the running sequences, and the verification of those drafts in the decode step."""

    def __init__(self, config: SpeculativeConfig, propose: Proposer | None = None,
                 propose_all: BatchProposer | None = None) -> None:
        """Drafts come from ``propose_all`` when given (a draft model), else ``propose`` (default: n-gram)."""
        self.config = config
        self.propose = propose or self._ngram
        self.propose_all = propose_all or (lambda seqs, ks: [self.propose(seq, k) for seq, k in zip(seqs, ks)])

    def _ngram(self, seq: RunningSequence, k: int) -> list[int]:
        return propose_ngram(seq.tokens, k, self.config.prompt_lookup_min, self.config.prompt_lookup_max)

    def lengths(self, decoding: list[RunningSequence]) -> dict[int, int]:
        """How many drafts each sequence wants this step (by ``id``; none above ``disable_by_batch_size`` running
        sequences); empty when no sequence drafts."""
        if len(decoding) > self.config.disable_by_batch_size:
            metrics.SPEC_DECODE_DRAFT_LENGTH.set(0)
            return {}
        wanted = {}
        for seq in decoding:
            if seq.ticket.job.options.grammar is not None:  # a grammar's state cannot take drafts back
                continue
            if seq.draft_length is None:
                seq.draft_length = DraftLength(self.config.num_speculative_tokens)
            if k := seq.draft_length.this_step():
                wanted[id(seq)] = k
        metrics.SPEC_DECODE_DRAFT_LENGTH.set(sum(wanted.values()) / len(decoding) if decoding else 0)
        return wanted

    def drafts(self, decoding: list[RunningSequence], lengths: dict[int, int]) -> dict[int, list[int]]:
        """Each wanting sequence's drafts (by ``id``), never more than its tokens left but one (the token after the
        last kept draft is its own); a sequence that finds none records a miss."""
        wanting, ks = [], []
        for seq in decoding:
            left = seq.ticket.job.options.max_new_tokens - len(seq.generated) - 1
            if (k := min(lengths.get(id(seq), 0), left)) > 0:
                wanting.append(seq)
                ks.append(k)
        found = {}
        for seq, drafted in zip(wanting, self.propose_all(wanting, ks) if wanting else []):
            if drafted:
                found[id(seq)] = drafted
            else:
                seq.draft_length.record(0, 0)
        return found

    def choose(self, sequences: list[RunningSequence], logits: torch.Tensor, drafts: dict[int, list[int]],
               table: SamplingTable, rng: torch.Generator, read_back: Callable[[torch.Tensor], list[int]]
               ) -> list[Burst]:
        """The tokens each sequence takes: ``logits`` [positions, vocab] holds, sequence by sequence, the logits
        after its last token and after each of its drafts. Each position's token is chosen as the one-token step
        would choose it; a sequence keeps its drafts while each equals the token chosen before it, and its seeded
        generator ends as if it had drawn once per token taken."""
        drafted = [drafts.get(id(seq), []) for seq in sequences]
        samplers = [seq.sampler for seq, d in zip(sequences, drafted) for _ in range(len(d) + 1)]
        ids = [seq.tokens + d[:j] for seq, d in zip(sequences, drafted) for j in range(len(d) + 1)]
        plan = ChoicePlan.of(samplers, list(range(len(samplers))), table.device)
        seeded = [(seq, d, seq.sampler.generator.get_state()) for seq, d in zip(sequences, drafted)
                  if seq.sampler.generator is not None and d]
        view = position_table(table, [seq.row for seq in sequences], drafted)
        tokens, logprobs = choose_tokens(logits, plan, view, ids if plan.id_rows else [], rng)
        chosen, logprobs = read_back(tokens), logprobs or [None] * len(samplers)
        bursts, start = [], 0
        for d in drafted:
            taken = accepted_drafts(chosen[start:start + len(d) + 1], d) + 1
            bursts.append(Burst(chosen[start:start + taken], list(logprobs[start:start + taken])))
            start += len(d) + 1
        taken = {id(seq): len(burst.tokens) for seq, burst in zip(sequences, bursts)}
        for seq, d, state in seeded:
            if taken[id(seq)] <= len(d):  # it drew for positions it does not take
                rewind(seq.sampler.generator, state, taken[id(seq)], table.vocab_size, logits.device)
        return bursts

    def settle(self, sequences: list[RunningSequence], bursts: list[Burst], drafts: dict[int, list[int]],
               cache: KVCache, table: SamplingTable) -> None:
        """Give each sequence its burst token by token: each one is checked (eos, stop strings, length,
        cancellation) and sent before the next, and a sequence that ends drops the rest. The cache learns the
        tokens fed this step that were kept (a drafting sequence's last token and the drafts taken), the sampling
        table counts the tokens taken, and each sequence's draft length learns how its drafts fared."""
        events, rows, taken_tokens = [], [], []
        live = [(seq, burst) for seq, burst in zip(sequences, bursts) if seq.finish_reason is None and seq.row >= 0]
        taken = {id(seq): 0 for seq, _ in live}
        for j in range(max((len(b.tokens) for _, b in live), default=0)):
            going = [(seq, burst) for seq, burst in live if seq.finish_reason is None and j < len(burst.tokens)]
            for seq, burst in going:
                seq.tokens.append(burst.tokens[j])
                if burst.logprobs[j] is not None:
                    seq.logprobs.append(burst.logprobs[j])
                taken[id(seq)] += 1
            stopped = stopped_on_strings([seq.sampler for seq, _ in going], [seq.tokens for seq, _ in going])
            for (seq, burst), stop in zip(going, stopped):
                seq.finish_reason = seq.finish_reason_after(burst.tokens[j], stop)
                events.append((seq.ticket, TokenEvent(seq.index, burst.tokens[j], seq.finish_reason,
                                                      burst.logprobs[j])))
        for seq, burst in live:
            count = taken[id(seq)]
            if id(seq) in drafts:  # a plain decode row's last token is committed by its step
                cache.extend(seq.row, seq.tokens[-count - 1:-1])  # the last token fed and the drafts kept
            rows += [seq.row] * count
            taken_tokens += seq.tokens[-count:]
        if rows:
            table.advance(to_device(rows, table.device, torch.long), to_device(taken_tokens, table.device, torch.long))
        self._learn(sequences, bursts, drafts)
        emit_all(events)

    def _learn(self, sequences: list[RunningSequence], bursts: list[Burst], drafts: dict[int, list[int]]) -> None:
        """Each drafting sequence's draft length, and the metrics, from how many of its drafts were taken."""
        for seq, burst in zip(sequences, bursts):
            if not (drafted := drafts.get(id(seq))):
                continue
            accepted = len(burst.tokens) - 1
            seq.draft_length.record(len(drafted), accepted)
            metrics.SPEC_DECODE_DRAFTS.inc()
            metrics.SPEC_DECODE_DRAFT_TOKENS.inc(len(drafted))
            metrics.SPEC_DECODE_ACCEPTED_TOKENS.inc(accepted)
            for position in range(accepted):
                metrics.SPEC_DECODE_ACCEPTED_PER_POSITION.labels(str(position)).inc()


def rewind(generator: torch.Generator, state: torch.Tensor, draws: int, vocab_size: int, device: torch.device
           ) -> None:
    """Put ``generator`` where ``draws`` one-token steps from ``state`` leave it: one vocabulary's worth of
    uniforms per step (``choice._pick``)."""
    generator.set_state(state)
    for _ in range(draws):
        torch.rand(vocab_size, generator=generator, device=device)


def verify_rows(sequences: Sequence[RunningSequence], drafts: dict[int, list[int]]) -> list[tuple[int, list[int]]]:
    """``Engine.step``'s ``verify``: each drafting sequence's row, fed its last token and its drafts (the others
    are plain decode rows, whose one position is decode attention's, the cheaper)."""
    return [(seq.row, [seq.tokens[-1], *drafts[id(seq)]]) for seq in sequences if id(seq) in drafts]


def positions(sequences: Sequence[RunningSequence], drafts: dict[int, list[int]]) -> int:
    """Logits rows a verifying step gives these sequences: one after the last token and one after each draft."""
    return sum(1 + len(drafts.get(id(seq), ())) for seq in sequences)
