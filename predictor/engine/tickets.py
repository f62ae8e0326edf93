"""A submitted request as both sides see it: the client awaits a ``Ticket`` on the event loop while the batcher's
worker threads fill it in; the plain records it resolves with (``GenerationResult``, ``SequenceOutput``) and the
events it streams (``TokenEvent``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .. import metrics
from .options import GenerationJob
from .sampling import TokenLogprob


@dataclass(frozen=True)
class SequenceOutput:
    token_ids: tuple[int, ...]  # generated ids, eos included when the sequence stopped on it
    finish_reason: str  # "stop" (eos), "length", "time_limit" or "cancelled"
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    sequences: tuple[SequenceOutput, ...]
    prompt_tokens: int
    queue_seconds: float
    generation_seconds: float


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
        self.started_at: float | None = None
        self._loop = loop
        self._future: asyncio.Future[GenerationResult] = loop.create_future()
        self._events: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if stream else None
        self._cancelled = threading.Event()

    # -- the client's side (event loop) ----------------------------------------------------------------------
    async def result(self) -> GenerationResult:
        return await asyncio.shield(self._future)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events until every sequence finished; raises the request's error if it failed."""
        assert self._events is not None, "submit(stream=True) to receive events"
        finished = 0
        while finished < self.job.options.num_return_sequences:
            getter = asyncio.ensure_future(self._events.get())
            try:
                await asyncio.wait([getter, self._future], return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the consumer went away: leave no task behind
                getter.cancel()
                raise
            if not getter.done():  # the request settled before another event came
                getter.cancel()
                if self._events.empty():
                    self._future.result()  # raises if the request failed
                    return
                continue
            event = getter.result()
            finished += event.finish_reason is not None
            yield event

    def cancel(self) -> None:
        self._cancelled.set()

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the request succeeded or failed."""
        self._future.add_done_callback(lambda _: callback())

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- the worker's side -----------------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at > self.time_budget_s

    def should_stop(self) -> bool:
        return self.cancelled or self.out_of_time()

    def emit(self, event: TokenEvent) -> None:
        if self._events is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def resolve(self, sequences: list[SequenceOutput]) -> None:
        now = time.monotonic()
        started = self.started_at or now
        result = GenerationResult(tuple(sequences), len(self.job.prompt_ids), started - self.submitted_at,
                                  now - started)
        _record(result)
        self._loop.call_soon_threadsafe(_settle, self._future, result, None)

    def fail(self, error: BaseException) -> None:
        self._loop.call_soon_threadsafe(_settle, self._future, None, error)


def _record(result: GenerationResult) -> None:
    """Every route's requests feed the same Prometheus histograms."""
    metrics.QUEUE_SECONDS.observe(result.queue_seconds)
    metrics.GENERATION_SECONDS.observe(result.generation_seconds)
    metrics.PROMPT_TOKENS.observe(result.prompt_tokens)
    metrics.GENERATED_TOKENS.observe(sum(len(seq.token_ids) for seq in result.sequences))


def _settle(future: asyncio.Future, result: GenerationResult | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
