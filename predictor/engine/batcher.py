"""Continuous batching: concurrent requests share forward passes, joining and leaving between decode steps.

One worker thread owns the running batch. Each step it admits waiting requests (a prefill, merged into the running
KV cache), advances every running sequence by one token, and retires the sequences that finished, were cancelled or
ran out of time. A request never waits for a long batch to end, and one request's options never change another's
tokens (see ``sampling``). Beam-search requests keep several hypotheses each and run whole through ``generate`` on
a second thread, so they do not stall the running batch. Generation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Draining, GenerationFailed, Overloaded
from .options import GenerationJob
from .runner import Engine, KVBatch
from .sampling import SequenceSampler, TokenLogprob, choose_next_tokens, make_sampler
from .static_cache import SlotCache
from .tickets import SequenceOutput, Ticket, TokenEvent

logger = logging.getLogger(__name__)

FAILURES_BEFORE_UNHEALTHY = 3  # consecutive failed steps that mark the engine broken (a lost GPU, say)
SELF_CHECK_INTERVAL_S = 5.0  # how often a broken engine tries a one-token generation to see if it recovered


@dataclass
class _Sequence:
    """One row of the running batch."""

    ticket: Ticket
    index: int
    tokens: list[int]  # prompt + generated
    sampler: SequenceSampler
    prompt_len: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class Batcher:
    """Queues requests and runs them in shared batches on worker threads."""

    def __init__(self, engine: Engine, max_batch_size: int = 32, max_queue: int = 128,
                 time_budget_s: float = 300.0, prepare: Callable[[], None] | None = None):
        """``prepare`` runs on the decode thread before it serves, and ``start`` waits for it: work such as
        recording CUDA graphs must happen on the thread that replays them."""
        self.engine = engine
        self._prepare = prepare
        self._prepared = threading.Event()
        self._prepare_error: BaseException | None = None
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.time_budget_s = time_budget_s
        self._lock = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._beam_waiting: collections.deque[Ticket] = collections.deque()
        self._closed = False
        self._running: list[_Sequence] = []
        self._finished: dict[Ticket, list[_Sequence]] = {}  # done sequences of requests with others still running
        self._kv: KVBatch | SlotCache | None = None
        self._in_flight = 0  # submitted and not yet settled
        self._consecutive_failures = 0
        self._next_self_check = 0.0
        self._unhealthy_since: float | None = None
        self._rng = torch.Generator(device=engine.device)
        self._rng.seed()  # unseeded requests sample from this, randomly seeded at start-up
        self._threads = [threading.Thread(target=self._decode_loop, name="batcher-decode", daemon=True),
                         threading.Thread(target=self._beam_loop, name="batcher-beams", daemon=True)]

    # -- public API (event loop) -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers; returns once the decode thread has run ``prepare`` (raising what it raised)."""
        for thread in self._threads:
            thread.start()
        self._prepared.wait()
        if self._prepare_error is not None:
            self.close()
            raise self._prepare_error

    def submit(self, job: GenerationJob, *, stream: bool = False) -> Ticket:
        """Queue ``job``; raise ``Overloaded`` when the queue is full, ``Draining`` after ``close()``."""
        ticket = Ticket(job, asyncio.get_running_loop(), stream, self.time_budget_s)
        with self._lock:
            if self._closed:
                raise Draining("the server is shutting down and takes no new requests")
            if self.waiting >= self.max_queue:
                raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting): retry shortly",
                                 headers={"Retry-After": "1"})
            (self._beam_waiting if job.options.uses_beams else self._waiting).append(ticket)
            self._in_flight += 1
            self._lock.notify_all()
        ticket.on_settled(self._settled)
        return ticket

    def close(self) -> None:
        """Take no new requests; those already submitted still run to completion."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._beam_waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def running_sequences(self) -> int:
        return len(self._running)

    @property
    def healthy(self) -> bool:
        """False after repeated consecutive failures, until a step or a self-check succeeds again."""
        return self._consecutive_failures < FAILURES_BEFORE_UNHEALTHY

    @property
    def unhealthy_for(self) -> float:
        """Seconds the engine has been unhealthy without recovering (0 while healthy): a lost device shows as a
        figure that only grows."""
        return 0.0 if self._unhealthy_since is None else time.monotonic() - self._unhealthy_since

    def _note_success(self) -> None:
        self._consecutive_failures = 0
        self._unhealthy_since = None

    def _note_failure(self) -> None:
        self._consecutive_failures += 1
        self._next_self_check = time.monotonic() + SELF_CHECK_INTERVAL_S
        if self._consecutive_failures == FAILURES_BEFORE_UNHEALTHY:
            self._unhealthy_since = time.monotonic()

    def _settled(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- the decode worker -----------------------------------------------------------------------------------
    def _decode_loop(self) -> None:
        try:
            if self._prepare is not None:
                self._prepare()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it on the loading thread
            self._prepare_error = exc
            return
        finally:
            self._prepared.set()
        while True:
            joining = self._take_joining()
            if joining is None:
                return
            if not joining and not self._running:
                self._self_check()
                continue
            try:
                self._step(joining)
            except Exception as exc:  # noqa: BLE001 - one failed step must not end the worker
                self._fail_batch(joining, exc)

    def _take_joining(self) -> list[Ticket] | None:
        """Waiting requests that fit in the batch now; blocks while there is nothing to do. None: shut down;
        an empty list while idle: time for the broken engine's self-check."""
        with self._lock:
            while not self._running and not self._waiting:
                if self._closed and not self._beam_waiting and self._in_flight == 0:
                    return None
                if not self.healthy and time.monotonic() >= self._next_self_check:
                    return []
                self._lock.wait(timeout=0.5)
            joining, rows = [], len(self._running)
            while self._waiting:
                ticket = self._waiting[0]
                need = ticket.job.options.num_return_sequences
                if rows + need > self.max_batch_size and rows > 0:
                    break
                self._waiting.popleft()
                if ticket.cancelled:
                    ticket.resolve([SequenceOutput((), "cancelled")] * need)
                    continue
                joining.append(ticket)
                rows += need
            return joining

    @torch.inference_mode()
    def _step(self, joining: list[Ticket]) -> None:
        logits = []
        if self._running:
            logits.append(self.engine.decode_step(self._kv, [seq.tokens[-1] for seq in self._running]))
        if joining:
            try:
                logits.append(self._prefill(joining))
            except Exception as exc:  # noqa: BLE001 - the running batch is untouched: only the newcomers fail
                self._fail_requests(joining, exc)
                if not logits:
                    return
        self._choose(torch.cat(logits) if len(logits) > 1 else logits[0])
        self._retire()
        self._note_success()

    def _prefill(self, joining: list[Ticket]) -> torch.Tensor:
        """Start the joining requests' sequences and merge them into the batch; their next-token logits."""
        new: list[_Sequence] = []
        now = time.monotonic()
        for ticket in joining:
            ticket.started_at = now
            prompt = list(ticket.job.prompt_ids)
            for index in range(ticket.job.options.num_return_sequences):
                sampler = make_sampler(ticket.job.options, prompt, index, self.engine.device, self.engine.tokenizer)
                new.append(_Sequence(ticket, index, list(prompt), sampler, len(prompt)))
        kv, logits = self.engine.prefill([seq.tokens for seq in new])
        self._kv = self.engine.join(self._kv, kv)
        self._running.extend(new)
        return logits

    @torch.inference_mode()
    def _self_check(self) -> None:
        """After repeated failures, try a one-token generation now and then: success makes the engine healthy
        again (a transient fault), failure keeps readiness at 503 (a lost device)."""
        self._next_self_check = time.monotonic() + SELF_CHECK_INTERVAL_S
        try:
            kv, logits = self.engine.prefill([[self.engine.info.eos_token_id or 0]])
            batch = self.engine.join(None, kv)
            self.engine.decode_step(batch, [int(logits.argmax(dim=-1)[0])])
            self.engine.select(batch, [])
        except Exception as exc:  # noqa: BLE001
            logger.error("Self-check failed; the engine stays unhealthy: %s", exc)
            return
        logger.warning("Self-check passed after %d failed steps; serving again", self._consecutive_failures)
        self._note_success()

    def _choose(self, logits: torch.Tensor) -> None:
        running = self._running
        tokens, logprobs = choose_next_tokens(logits, [s.sampler for s in running], [s.tokens for s in running],
                                              self._rng)
        for seq, token, logprob in zip(running, tokens, logprobs):
            seq.tokens.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            seq.finish_reason = self._finish_reason(seq, token)
            seq.ticket.emit(TokenEvent(seq.index, token, seq.finish_reason, logprob))

    @staticmethod
    def _finish_reason(seq: _Sequence, token: int) -> str | None:
        options = seq.ticket.job.options
        if token in options.eos_token_ids or seq.sampler.stopped(seq.tokens):
            return "stop"
        if len(seq.generated) >= options.max_new_tokens:
            return "length"
        if seq.ticket.cancelled:
            return "cancelled"
        if seq.ticket.out_of_time():
            return "time_limit"
        return None

    def _retire(self) -> None:
        """Drop finished sequences from the batch; answer a request once all of its sequences are done."""
        keep = [i for i, seq in enumerate(self._running) if seq.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for seq in self._running:
            if seq.finish_reason is not None:
                self._finished.setdefault(seq.ticket, []).append(seq)
        self._running = [self._running[i] for i in keep]
        self._kv = self.engine.select(self._kv, keep)
        for ticket, sequences in list(self._finished.items()):
            if len(sequences) == ticket.job.options.num_return_sequences:
                del self._finished[ticket]
                self._resolve(ticket, sequences)

    @staticmethod
    def _resolve(ticket: Ticket, sequences: list[_Sequence]) -> None:
        outputs = [SequenceOutput(tuple(seq.generated), seq.finish_reason or "length",
                                  tuple(seq.logprobs) if seq.sampler.logprobs else None)
                   for seq in sorted(sequences, key=lambda s: s.index)]
        ticket.resolve(outputs)

    def _fail_batch(self, joining: list[Ticket], exc: Exception) -> None:
        """Fail every request in the broken step, free what it held, and keep serving."""
        tickets = {seq.ticket for seq in self._running} | set(joining) | set(self._finished)
        self._running, self._kv, self._finished = [], None, {}
        self._fail_requests(list(tickets), exc)

    def _fail_requests(self, tickets: list[Ticket], exc: Exception) -> None:
        self._note_failure()
        logger.error("Generation failed for %d request(s): %s", len(tickets), exc, exc_info=exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for ticket in tickets:
            ticket.fail(_as_generation_failure(exc))

    # -- the beam-search worker ------------------------------------------------------------------------------
    def _beam_loop(self) -> None:
        while True:
            with self._lock:
                while not self._beam_waiting:
                    if self._closed and self._in_flight == 0:
                        return
                    self._lock.wait(timeout=0.5)
                ticket = self._beam_waiting.popleft()
            self._run_beams(ticket)

    def _run_beams(self, ticket: Ticket) -> None:
        options = ticket.job.options
        if ticket.cancelled:
            ticket.resolve([SequenceOutput((), "cancelled")] * options.num_return_sequences)
            return
        ticket.started_at = time.monotonic()
        try:
            out = self.engine.generate_beams(list(ticket.job.prompt_ids), options, ticket.should_stop)
            self._note_success()
        except Exception as exc:  # noqa: BLE001 - fail this request, keep the worker
            self._fail_requests([ticket], exc)
            return
        interrupted = "cancelled" if ticket.cancelled else "time_limit" if ticket.out_of_time() else "length"
        outputs = []
        for i, seq in enumerate(out.sequences):
            reason = "stop" if out.finished[i] else interrupted
            logprobs = tuple(map(TokenLogprob, out.logprobs[i])) if out.logprobs is not None else None
            outputs.append(SequenceOutput(tuple(seq), reason, logprobs))
            for token in seq:
                ticket.emit(TokenEvent(i, token))
            ticket.emit(TokenEvent(i, None, reason))
        ticket.resolve(outputs)


def _as_generation_failure(exc: BaseException) -> GenerationFailed:
    if isinstance(exc, torch.OutOfMemoryError):
        return GenerationFailed("the accelerator ran out of memory for this batch; retry, or ask for fewer or "
                                "shorter sequences")
    return GenerationFailed(f"generation failed: {type(exc).__name__}")
