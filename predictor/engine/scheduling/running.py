"""The batcher's records of admitted requests: each sequence in its cache row, and what a request decides about
itself (its next prompt chunk, its prompt's log-probabilities, when a sequence is finished, its outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..sampling.sampler import SequenceSampler, TokenLogprob, prompt_token_logprobs
from ..sampling.speculation import DraftLength
from .tickets import SequenceOutput, Ticket
from ..transfer import to_device


@dataclass
class RunningSequence:
    """One sequence of a request, in its own row of the KV cache."""

    ticket: Ticket
    index: int
    row: int
    tokens: list[int]  # prompt + generated
    sampler: SequenceSampler
    prompt_len: int
    computed: int = 0  # prompt tokens whose keys and values are in the row
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    draft_length: DraftLength | None = None  # how far it drafts, with speculation (set on its first step)

    def __post_init__(self) -> None:
        self.length_limit = self.prompt_len + self.ticket.job.options.max_new_tokens  # len(tokens) at most

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len

    def finish_reason_after(self, token: int, stopped: bool, now: float | None = None) -> str | None:
        """Why the sequence ends with ``token`` just chosen (``stopped``: completing one of its stop strings), or
        None while it goes on; ``now`` is the step's ``time.monotonic()``, read once for all its sequences."""
        ticket = self.ticket
        options = ticket.job.options
        if token in options.eos_token_ids or stopped:
            return "stop"
        if len(self.tokens) >= self.length_limit:
            return "length"
        if ticket.cancelled:
            return ticket.cancel_reason
        if ticket.out_of_time(now):
            return "time_limit"
        return None

    def output(self) -> SequenceOutput:
        return SequenceOutput(tuple(self.generated), self.finish_reason or "length",
                              tuple(self.logprobs) if self.sampler.logprobs else None)


@dataclass
class RunningRequest:
    """An admitted request: its sequences, the first of which (the leader) computes the prompt for all of them."""

    ticket: Ticket
    sequences: list[RunningSequence]
    adapter_slot: int = -1  # the slot of its LoRA adapter in the engine's bank (-1: the base model)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.., when asked

    @property
    def leader(self) -> RunningSequence:
        return self.sequences[0]

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences)

    def next_chunk(self, budget: int) -> tuple[int, int] | None:
        """How many prompt tokens to compute next within ``budget``, and how many of their logits are wanted:
        every token's for prompt log-probabilities, else the last one's when the chunk completes the prompt. None
        when the prompt is computed (or the request has ended)."""
        leader = self.leader
        if not leader.prefilling or leader.finish_reason is not None:
            return None
        take = min(budget, leader.prompt_len - leader.computed)
        done = leader.computed + take == leader.prompt_len
        return take, take if self.ticket.job.options.prompt_logprobs is not None else int(done)

    def note_prompt_logprobs(self, take: int, logits: torch.Tensor) -> None:
        """A chunk's share of the prompt's log-probabilities, when asked: row ``i`` of ``logits`` predicts the
        prompt token after the chunk's ``i``-th; the last row of the last chunk predicts the first generated token.
        Handed to the ticket once the prompt is complete, before its first token."""
        top = self.ticket.job.options.prompt_logprobs
        if top is None:
            return
        leader = self.leader
        following = leader.tokens[leader.computed + 1:min(leader.computed + take, leader.prompt_len - 1) + 1]
        if following:
            self.prompt_logprobs += prompt_token_logprobs(logits[:len(following)], following, top)
        if leader.computed + take == leader.prompt_len:
            self.ticket.prompt_logprobs = (None, *self.prompt_logprobs)

    def outputs(self) -> list[SequenceOutput]:
        return [seq.output() for seq in sorted(self.sequences, key=lambda s: s.index)]


@dataclass
class PendingTokens:
    """Tokens a step chose, still on the device: the next step feeds them to its forward pass before reading them
    back (one step ahead)."""

    sequences: list[RunningSequence]
    tokens: torch.Tensor  # [len(sequences)], on the device
    logprobs: Sequence[TokenLogprob | None]
    position: dict[int, int]  # id(sequence) -> its index in ``sequences``

    @classmethod
    def of(cls, sequences: list[RunningSequence], tokens: torch.Tensor, logprobs: Sequence[TokenLogprob | None]
           ) -> PendingTokens:
        return cls(sequences, tokens, logprobs, {id(seq): i for i, seq in enumerate(sequences)})

    def holds(self, sequences: list[RunningSequence]) -> bool:
        return all(id(seq) in self.position for seq in sequences)

    def of_sequences(self, sequences: list[RunningSequence]) -> torch.Tensor:
        """The tokens of ``sequences`` [n], on the device."""
        if len(sequences) == len(self.sequences) and all(a is b for a, b in zip(sequences, self.sequences)):
            return self.tokens  # the same sequences in the same order: the common step
        index = to_device([self.position[id(seq)] for seq in sequences], self.tokens.device, torch.long)
        return self.tokens[index]
