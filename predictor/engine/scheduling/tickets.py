"""A submitted request as both sides see it: the client awaits a ``Ticket`` on the event loop while the batcher's
worker threads fill it in; the plain records it resolves with (``GenerationResult``, ``SequenceOutput``) and the
events it streams (``TokenEvent``). Every route's request passes through a ticket, so the request-level Prometheus
metrics (time to first token, time per output token, latency, token counts) are recorded here.

A ticket's watchdog runs on the event loop, not on a worker, so that a request is answered even when no worker is
left to answer it: one still waiting when its time budget (``--request_timeout``) is spent gets a 504; one running
is ended by its worker at the budget (finish reason ``time_limit``), and gets a 504 if that has not happened
``WATCHDOG_GRACE_S`` later. A ticket is answered once: whichever of the worker, the watchdog or the engine's
supervisor answers first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ... import metrics
from ...errors import RequestTimeout
from ..options import GenerationJob
from ..sampling.sampler import TokenLogprob

WATCHDOG_GRACE_S = 5.0  # past its budget, how long a running request's worker has to end it before the watchdog
# Why a sequence ended, as every route reports it: its end-of-text token, its token budget, --request_timeout, the
# drain's end; "cancelled" (the client went away) reaches no client. The documentation may name only these.
FINISH_REASONS = ("stop", "length", "time_limit", "shutdown", "cancelled")


@dataclass(frozen=True)
class SequenceOutput:
    token_ids: tuple[int, ...]  # generated ids, eos included when the sequence stopped on it
    finish_reason: str  # "stop" (eos), "length", "time_limit", or the reason it was cancelled with
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    sequences: tuple[SequenceOutput, ...]
    prompt_tokens: int
    queue_seconds: float
    generation_seconds: float
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # when asked: None for the first token


@dataclass(frozen=True)
class TokenEvent:
    """Streaming: ``token_id`` was generated for sequence ``index``; ``finish_reason`` is set on its last one."""

    index: int
    token_id: int | None
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # when the request asked for log-probabilities (not for beam search)


class Ticket:
    """A submitted request: await ``result()``, iterate ``events()`` when streaming, ``cancel()`` to give up."""

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop, stream: bool, time_budget_s: float):
        self.job = job
        self.time_budget_s = time_budget_s
        self.submitted_at = time.monotonic()
        self._started_at: float | None = None
        self.first_token_at: float | None = None
        # Set by the worker before the request's first token event, when the options ask for it.
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache, set when the request starts
        self._running = False  # counted in falcon_running_requests
        self._loop = loop
        self._future: asyncio.Future[GenerationResult] = loop.create_future()
        self._events: asyncio.Queue[TokenEvent | None] | None = asyncio.Queue() if stream else None
        self._cancelled = threading.Event()
        self._cancel_reason = "cancelled"
        self._answered = False  # by resolve or fail, whichever came first
        self._answer_lock = threading.Lock()
        self._watchdog = loop.call_later(time_budget_s, self._expire)
        self._future.add_done_callback(lambda _: self._watchdog.cancel())
        if self._events is not None:  # None after every event: the request is answered (or failed)
            self._future.add_done_callback(lambda _: self._events.put_nowait(None))

    # -- the client's side (event loop) ----------------------------------------------------------------------
    async def result(self) -> GenerationResult:
        return await asyncio.shield(self._future)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events until every sequence finished; raises the request's error if it failed."""
        assert self._events is not None, "submit(stream=True) to receive events"
        finished = 0
        while finished < self.job.options.num_return_sequences:
            event = await self._events.get()  # no suspension while a step's events are queued
            if event is None:  # the request settled before another event came
                self._future.result()  # raises if the request failed
                return
            finished += event.finish_reason is not None
            yield event

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating: every sequence still running ends at the worker's next step, with the text it has and
        ``reason`` as its finish reason ("cancelled": the client went away; "shutdown": the drain ran out)."""
        if not self._cancelled.is_set():
            self._cancel_reason = reason
        self._cancelled.set()

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the request succeeded or failed."""
        self._future.add_done_callback(lambda _: callback())

    def _expire(self) -> None:
        """The budget is spent: a request that never started gets its 504 now; a running one is given
        ``WATCHDOG_GRACE_S`` for its worker to end it."""
        if self.started_at is None:
            self._time_out(f"the request waited {self.time_budget_s:g} s (--request_timeout) for a free slot "
                           "without starting; retry later")
            return
        overdue = self.started_at + self.time_budget_s + WATCHDOG_GRACE_S - time.monotonic()
        self._watchdog = self._loop.call_later(max(0.0, overdue), self._time_out,
                                               f"the request was not answered within its {self.time_budget_s:g} s "
                                               "(--request_timeout)")

    def _time_out(self, message: str) -> None:
        self.cancel("time_limit")  # the worker drops it, if one ever gets to it
        self.fail(RequestTimeout(message))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cancel_reason(self) -> str:
        """The finish reason of the sequences a cancellation ends."""
        return self._cancel_reason

    # -- the worker's side -----------------------------------------------------------------------------------
    @property
    def started_at(self) -> float | None:
        return self._started_at

    @started_at.setter
    def started_at(self, when: float) -> None:
        """The worker took the request into a batch: it counts as running until it is resolved or fails."""
        if self._started_at is None:
            self._running = True
            metrics.RUNNING_REQUESTS.inc()
        self._started_at = when

    def _stop_running(self) -> None:
        if self._running:
            self._running = False
            metrics.RUNNING_REQUESTS.dec()

    @property
    def wants_events(self) -> bool:
        """Whether a token's event matters to this ticket: it streams, or its first token's time is not known yet
        (time to first token); a step makes no event for the others."""
        return self._events is not None or self.first_token_at is None

    def out_of_time(self, now: float | None = None) -> bool:
        started = self._started_at
        return started is not None and (time.monotonic() if now is None else now) - started > self.time_budget_s

    def should_stop(self) -> bool:
        return self.cancelled or self.out_of_time()

    def emit(self, event: TokenEvent) -> None:
        emit_all([(self, event)])

    def _answer(self) -> bool:
        """Whether this is the request's first answer (the only one that counts)."""
        with self._answer_lock:
            first, self._answered = not self._answered, True
        return first

    def resolve(self, sequences: list[SequenceOutput]) -> None:
        if not self._answer():
            return
        now = time.monotonic()
        started = self.started_at or now
        result = GenerationResult(tuple(sequences), len(self.job.prompt_ids), started - self.submitted_at,
                                  now - started, self.prompt_logprobs)
        self._record(result, now)
        self._loop.call_soon_threadsafe(_settle, self._future, result, None)

    def fail(self, error: BaseException) -> None:
        if not self._answer():
            return
        self._stop_running()
        self._loop.call_soon_threadsafe(_settle, self._future, None, error)

    def _record(self, result: GenerationResult, now: float) -> None:
        """Every route's requests feed the same Prometheus metrics, here where each one is answered."""
        metrics.QUEUE_SECONDS.observe(result.queue_seconds)
        metrics.E2E_SECONDS.observe(now - self.submitted_at)
        self._stop_running()
        if self._started_at is None:  # cancelled while it waited: nothing was generated
            return
        metrics.GENERATION_SECONDS.observe(result.generation_seconds)
        generated = sum(len(seq.token_ids) for seq in result.sequences)
        metrics.REQUEST_PROMPT_TOKENS.observe(result.prompt_tokens)
        metrics.REQUEST_GENERATION_TOKENS.observe(generated)
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        metrics.GENERATION_TOKENS.inc(generated)
        if self.first_token_at is None:
            return
        metrics.TIME_TO_FIRST_TOKEN.observe(self.first_token_at - self.submitted_at)
        longest = max(len(seq.token_ids) for seq in result.sequences)
        if longest > 1 and not self.job.options.uses_beams:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((now - self.first_token_at) / (longest - 1))


def emit_all(events: list[tuple[Ticket, TokenEvent]]) -> None:
    """Hand each event to its ticket: one wake-up of each event loop for all of a step's streamed events, not one
    per token (a wake-up writes to a socket, ~10 us of the worker's time each, hundreds a step in a large batch)."""
    now, streamed = time.monotonic(), {}
    for ticket, event in events:
        if ticket.first_token_at is None and event.token_id is not None:
            ticket.first_token_at = now
        if ticket._events is not None:
            streamed.setdefault(ticket._loop, []).append((ticket._events, event))
    for loop, deliveries in streamed.items():
        loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)


def _settle(future: asyncio.Future, result: GenerationResult | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
