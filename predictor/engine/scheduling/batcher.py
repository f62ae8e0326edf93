"""Continuous batching: concurrent requests share forward passes, joining and leaving between steps.

One worker thread owns the running sequences (``decoding.DecodeBatch``). Each step it admits waiting requests while the KV cache has free rows
(a request that does not fit waits in the queue), feeds every decoding sequence its last token, and prefills prompts
in chunks of at most ``max_prefill_tokens`` per step, so that a long prompt never stalls the running streams for
long; then it picks each sequence's next token and retires the sequences that finished, were cancelled or ran out of
time. A prompt that begins with a prefix the cache still holds copies it instead of computing it, and the sequences
of a ``num_return_sequences`` request share their prompt's prefill. One request's options never change another's
tokens (see ``sampling``). Beam-search requests keep several hypotheses each and run whole through ``generate`` on a
second thread, with a queue of their own, so they can neither stall the running batch nor fill its queue.
Generation never runs on the event loop.

A failure while working on one request ends that request alone, whatever the stage (admission, the forward step,
token choice, retirement: see ``decoding``): its rows are freed and the worker goes on. A worker that dies or hangs stops the engine
(``health.Supervisor``): every request waiting or running is answered with a 503, and the probes fail.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from typing import Callable

import torch

from ...errors import Draining, EngineStopped, Overloaded
from .. import faults
from .decoding import DecodeBatch, fail_tickets
from .health import EngineHealth, Supervisor
from .speculating import Speculator
from ..options import GenerationJob
from ..model.runner import Engine
from ..sampling.sampler import TokenLogprob, token_stop_matching_error
from .tickets import SequenceOutput, Ticket, TokenEvent

logger = logging.getLogger(__name__)

WORKERS = ("decode", "beam-search")  # the worker threads, as the health's heartbeats and the logs name them


class Batcher:
    """Queues requests and runs them in shared batches on worker threads."""

    def __init__(self, engine: Engine, max_batch_size: int = 32, max_queue: int = 128,
                 time_budget_s: float = 300.0, prepare: Callable[[], None] | None = None,
                 max_prefill_tokens: int = 512, max_beam_queue: int | None = None, prefix_caching: bool = True,
                 dead_after_s: float = 120.0, speculator: Speculator | None = None):
        """``prepare`` runs on the decode thread before it serves, and ``start`` waits for it: work such as
        recording CUDA graphs must happen on the thread that replays them. The engine's KV cache must be reserved
        by then: its rows bound the running sequences along with ``max_batch_size``. A worker with work that
        makes no progress for ``dead_after_s`` stops the engine. With a ``speculator``, small batches verify
        drafted tokens in each step (speculative decoding)."""
        self.engine = engine
        self._prepare = prepare
        self._prepared = threading.Event()
        self._prepare_error: BaseException | None = None
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_beam_queue = max_beam_queue if max_beam_queue is not None else max(1, max_queue // 8)
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.time_budget_s = time_budget_s
        self._lock = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._beam_waiting: collections.deque[Ticket] = collections.deque()
        self._closed = False
        self._beam_ticket: Ticket | None = None  # the beam-search request running
        self._in_flight = 0  # submitted and not yet settled
        self.health = EngineHealth()
        rng = torch.Generator(device=engine.device)
        rng.seed()  # unseeded requests sample from this, randomly seeded at start-up
        self._batch = DecodeBatch(engine, self.health, rng, max_prefill_tokens, prefix_caching,
                                  speculator)  # the decode thread's
        self._threads = [threading.Thread(target=self._decode_loop, name="batcher-decode", daemon=True),
                         threading.Thread(target=self._beam_loop, name="batcher-beams", daemon=True)]
        self._supervisor = Supervisor(self.health, dict(zip(WORKERS, self._threads)), self._busy, dead_after_s,
                                      lambda: self._closed and self._in_flight == 0, self.stop_engine)
        if (error := token_stop_matching_error(engine.tokenizer)) is not None:
            logger.warning("transformers' stop-string matcher cannot read this tokenizer's vocabulary (%s): stop "
                           "strings are matched on the decoded text instead, with the same meaning", error)

    # -- public API (event loop) -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers; returns once the decode thread has run ``prepare`` (raising what it raised)."""
        for thread in self._threads:
            thread.start()
        self._prepared.wait()
        if self._prepare_error is not None:
            self.close()
            raise self._prepare_error
        self._supervisor.start()

    def submit(self, job: GenerationJob, *, stream: bool = False) -> Ticket:
        """Queue ``job``; raise ``Overloaded`` when its queue is full, ``Draining`` after ``close()``."""
        ticket = Ticket(job, asyncio.get_running_loop(), stream, self.time_budget_s)
        beams = job.options.uses_beams
        queue, bound = (self._beam_waiting, self.max_beam_queue) if beams else (self._waiting, self.max_queue)
        with self._lock:
            if self.health.stopped is not None:
                raise EngineStopped(f"the engine stopped ({self.health.stopped}); the server will be restarted")
            if self._closed:
                raise Draining("the server is shutting down and takes no new requests")
            if len(queue) >= bound:
                kind = "beam-search requests" if beams else "requests"
                raise Overloaded(f"the server is at capacity ({bound} {kind} waiting): retry shortly",
                                 headers={"Retry-After": "1"})
            queue.append(ticket)
            self._in_flight += 1
            self._lock.notify_all()
        ticket.on_settled(self._settled)
        return ticket

    def close(self) -> None:
        """Take no new requests; those already submitted still run to completion."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the worker threads to end, which they do once ``close()`` was called and
        every request has settled; whether they did."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._beam_waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def running_sequences(self) -> int:
        return self._batch.running_sequences

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def unhealthy_for(self) -> float:
        return self.health.unhealthy_for

    @property
    def stopped(self) -> str | None:
        """Why the engine stopped for good (a worker died or hung), or None while it runs."""
        return self.health.stopped

    def _settled(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _busy(self, worker: str) -> bool:
        """Whether ``worker`` has requests waiting for it or running on it (a silent worker then hangs)."""
        if worker == "decode":
            return bool(self._waiting or self._batch.requests)
        return bool(self._beam_waiting) or self._beam_ticket is not None

    def stop_engine(self, cause: str, stack: str = "") -> None:
        """A worker died or hung, or the engine itself is lost (a tensor-parallel rank): stop for good (the probes
        fail, the pod is restarted) and answer every request waiting or running with a 503. Once, whichever thread
        notices first."""
        with self._lock:
            if not self.health.stop(cause):
                return
            tickets = [*self._waiting, *self._beam_waiting, *(request.ticket for request in self._batch.requests)]
            if self._beam_ticket is not None:
                tickets.append(self._beam_ticket)
            self._waiting.clear()
            self._beam_waiting.clear()
            self._lock.notify_all()
        logger.error("The engine stopped: %s; answering %d request(s) with 503, and the probes fail from now on%s",
                     cause, len(tickets), f"\n{stack}" if stack else "")
        error = EngineStopped(f"the engine stopped ({cause}); the server will be restarted")
        for ticket in tickets:
            ticket.fail(error)

    def _worker_died(self, worker: str, exc: BaseException) -> None:
        self.stop_engine(f"the {worker} worker died of {type(exc).__name__}",
                          "".join(traceback.format_exception(exc)))

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
        try:
            self._decode()
        except BaseException as exc:  # noqa: BLE001 - what no request's isolation caught: the engine stops
            self._worker_died("decode", exc)

    def _decode(self) -> None:
        while self.health.stopped is None:
            self.health.beat("decode")
            admitted = self._admit()
            if admitted is None:
                return
            if not admitted:
                self._self_check()
            if not self._batch.requests:
                continue
            try:
                self._batch.step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not end the worker
                self._batch.fail_all(exc)

    def _admit(self) -> bool | None:
        """Admit waiting requests while their sequences fit (rows of the cache and ``max_batch_size``); blocks
        while there is nothing to do. None: shut down; False while idle: time for the broken engine's
        self-check."""
        with self._lock:
            while not self._batch.requests and not self._waiting:
                if self.health.stopped is not None or (
                        self._closed and not self._beam_waiting and self._in_flight == 0):
                    return None
                if self.health.check_due:
                    return False
                self._lock.wait(timeout=0.5)
                self.health.beat("decode")
            if not self._waiting:  # most steps of a busy batch: nothing to count rows for
                return True
            cache, rows = self.engine.cache, self.running_sequences
            while self._waiting:
                ticket = self._waiting[0]
                need = ticket.job.options.num_return_sequences
                # A request with more sequences than max_batch_size runs alone (the cache has rows for it).
                if rows and (rows + need > self.max_batch_size or need > cache.free_rows):
                    break
                if ticket.cancelled:
                    self._waiting.popleft()
                    ticket.resolve([SequenceOutput((), ticket.cancel_reason)] * need)
                    continue
                # A request that cannot start is answered and takes no row. First come, first served: one whose
                # adapter finds no free slot waits at the head of the queue, so it is never overtaken for good
                # (the slots free up as running requests end).
                taken = self._batch.admit(ticket, rows)
                if taken is None:
                    break
                self._waiting.popleft()
                rows += taken
            return True

    @property
    def waiting_adapters(self) -> list[str]:
        """Adapters that queued requests ask for."""
        with self._lock:
            return list(dict.fromkeys(t.job.adapter for t in self._waiting if t.job.adapter is not None))

    @torch.inference_mode()
    def _self_check(self) -> None:
        """After repeated failures, try a one-token forward pass now and then: success makes the engine healthy
        again (a transient fault), failure keeps readiness at 503 (a lost device)."""
        self.health.checking()
        try:
            self.engine.probe()
        except Exception as exc:  # noqa: BLE001
            logger.error("Self-check failed; the engine stays unhealthy: %s", exc)
            return
        logger.warning("Self-check passed after %d failed steps; serving again", self.health.failures)
        self.health.succeeded()

    # -- the beam-search worker ------------------------------------------------------------------------------
    def _beam_loop(self) -> None:
        try:
            while (ticket := self._next_beam_request()) is not None:
                self._run_beams(ticket)
                self._beam_ticket = None
        except BaseException as exc:  # noqa: BLE001 - what no request's isolation caught: the engine stops
            self._worker_died("beam-search", exc)

    def _next_beam_request(self) -> Ticket | None:
        with self._lock:
            while not self._beam_waiting:
                if self.health.stopped is not None or (self._closed and self._in_flight == 0):
                    return None
                self._lock.wait(timeout=0.5)
                self.health.beat("beam-search")
            self._beam_ticket = self._beam_waiting.popleft()
            return self._beam_ticket

    def _run_beams(self, ticket: Ticket) -> None:
        options = ticket.job.options
        if ticket.cancelled:
            ticket.resolve([SequenceOutput((), ticket.cancel_reason)] * options.num_return_sequences)
            return
        ticket.started_at = time.monotonic()

        def should_stop() -> bool:  # asked by generate at every step: the worker's heartbeat too
            self.health.beat("beam-search")
            return ticket.should_stop() or self.health.stopped is not None

        try:
            faults.inject("beams", ticket.job.prompt_ids)
            out = self.engine.generate_beams(list(ticket.job.prompt_ids), options, should_stop)
            self.health.succeeded()
            interrupted = (ticket.cancel_reason if ticket.cancelled else "time_limit" if ticket.out_of_time()
                           else "length")
            outputs = []
            for i, seq in enumerate(out.sequences):
                reason = "stop" if out.finished[i] else interrupted
                logprobs = tuple(map(TokenLogprob, out.logprobs[i])) if out.logprobs is not None else None
                outputs.append(SequenceOutput(tuple(seq), reason, logprobs))
                for token in seq:
                    ticket.emit(TokenEvent(i, token))
                ticket.emit(TokenEvent(i, None, reason))
            ticket.resolve(outputs)
        except Exception as exc:  # noqa: BLE001 - fail this request, keep the worker
            fail_tickets(self.health, [ticket], exc)
