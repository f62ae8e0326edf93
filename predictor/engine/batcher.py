"""Continuous batching: concurrent requests share forward passes, joining and leaving between steps.

One worker thread owns the running sequences. Each step it admits waiting requests while the KV cache has free rows
(a request that does not fit waits in the queue), feeds every decoding sequence its last token, and prefills prompts
in chunks of at most ``max_prefill_tokens`` per step, so that a long prompt never stalls the running streams for
long; then it picks each sequence's next token and retires the sequences that finished, were cancelled or ran out of
time. A prompt that begins with a prefix the cache still holds copies it instead of computing it, and the sequences
of a ``num_return_sequences`` request share their prompt's prefill. One request's options never change another's
tokens (see ``sampling``). Beam-search requests keep several hypotheses each and run whole through ``generate`` on a
second thread, with a queue of their own, so they can neither stall the running batch nor fill its queue.
Generation never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Callable

import torch

from .. import metrics
from ..errors import Draining, GenerationFailed, ModelNotFound, Overloaded
from .health import EngineHealth
from .lora_bank import BASE
from .options import GenerationJob
from .runner import Engine
from .running import RunningRequest, RunningSequence
from .sampling import TokenLogprob, choose_next_tokens, make_sampler
from .tickets import SequenceOutput, Ticket, TokenEvent

logger = logging.getLogger(__name__)
_UNSERVED = object()  # a queued request's adapter is no longer served


class Batcher:
    """Queues requests and runs them in shared batches on worker threads."""

    def __init__(self, engine: Engine, max_batch_size: int = 32, max_queue: int = 128,
                 time_budget_s: float = 300.0, prepare: Callable[[], None] | None = None,
                 max_prefill_tokens: int = 512, max_beam_queue: int | None = None, prefix_caching: bool = True):
        """``prepare`` runs on the decode thread before it serves, and ``start`` waits for it: work such as
        recording CUDA graphs must happen on the thread that replays them. The engine's KV cache must be reserved
        by then: its rows bound the running sequences along with ``max_batch_size``."""
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
        self._requests: list[RunningRequest] = []  # admitted, in admission order
        self._in_flight = 0  # submitted and not yet settled
        self.health = EngineHealth()
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
        """Queue ``job``; raise ``Overloaded`` when its queue is full, ``Draining`` after ``close()``."""
        ticket = Ticket(job, asyncio.get_running_loop(), stream, self.time_budget_s)
        beams = job.options.uses_beams
        queue, bound = (self._beam_waiting, self.max_beam_queue) if beams else (self._waiting, self.max_queue)
        with self._lock:
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
        return sum(len(request.sequences) for request in self._requests)

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def unhealthy_for(self) -> float:
        return self.health.unhealthy_for

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
            admitted = self._admit()
            if admitted is None:
                return
            if not admitted:
                self._self_check()
            if not self._requests:
                continue
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not end the worker
                self._fail_step(exc)

    def _admit(self) -> bool | None:
        """Admit waiting requests while their sequences fit (rows of the cache and ``max_batch_size``); blocks
        while there is nothing to do. None: shut down; False while idle: time for the broken engine's
        self-check."""
        with self._lock:
            while not self._requests and not self._waiting:
                if self._closed and not self._beam_waiting and self._in_flight == 0:
                    return None
                if self.health.check_due:
                    return False
                self._lock.wait(timeout=0.5)
            cache = self.engine.cache
            rows = self.running_sequences
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
                # First come, first served: a request whose adapter finds no free slot waits at the head of the
                # queue, so it is never overtaken for good (the slots free up as running requests end).
                slot = self._place_adapter(ticket)
                if slot is None:
                    break
                self._waiting.popleft()
                if slot is _UNSERVED:
                    continue
                self._requests.append(self._start(ticket, rows, slot))
                rows += need
            return True

    def _place_adapter(self, ticket: Ticket) -> int | object | None:
        """The bank slot of the ticket's adapter (BASE without one); None while every slot is in use;
        ``_UNSERVED`` (the ticket failed) when its adapter was unloaded after the request was accepted."""
        name = ticket.job.adapter
        if name is None:
            return BASE
        try:
            return self.engine.lora.place(name)
        except (KeyError, AttributeError):
            ticket.fail(ModelNotFound(f"the adapter {name!r} was unloaded before this request started"))
            return _UNSERVED

    @property
    def waiting_adapters(self) -> list[str]:
        """Adapters that queued requests ask for."""
        with self._lock:
            return list(dict.fromkeys(t.job.adapter for t in self._waiting if t.job.adapter is not None))

    def _start(self, ticket: Ticket, running: int, slot: int = BASE) -> RunningRequest:
        """Give a request's sequences their rows, with its adapter's ``slot``; the leader's starts from the longest
        prefix cached with the same adapter."""
        ticket.started_at = time.monotonic()
        cache, prompt = self.engine.cache, list(ticket.job.prompt_ids)
        salt = None
        if ticket.job.adapter is not None:
            salt = self.engine.lora.key(ticket.job.adapter)
            metrics.LORA_REQUESTS.labels(ticket.job.adapter).inc()
        hit = None
        # A prompt's log-probabilities come from computing it: a request that asks for them reuses no prefix.
        if self.prefix_caching and ticket.job.options.prompt_logprobs is None:
            hit = cache.find_prefix(prompt, salt)
            metrics.PREFIX_CACHE_QUERIES.inc(len(prompt))
            metrics.PREFIX_CACHE_HITS.inc(hit.tokens if hit else 0)
        sequences = []
        for index in range(ticket.job.options.num_return_sequences):
            sampler = make_sampler(ticket.job.options, prompt, index, self.engine.device, self.engine.tokenizer)
            row = cache.allocate(running + index, hit if index == 0 else None, salt)
            self.engine.use_adapter(row, slot)
            sequences.append(RunningSequence(ticket, index, row, list(prompt), sampler, len(prompt),
                                             computed=cache.length(row)))
        return RunningRequest(ticket, sequences, slot)

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop_unstarted()
        decoding = [seq for request in self._requests if not request.leader.prefilling for seq in request.sequences
                    if seq.finish_reason is None]
        prefilling = self._plan_prefill()
        decode = [(seq.row, seq.tokens[-1]) for seq in decoding]
        chunks = [(r.leader.row, r.leader.tokens[r.leader.computed:r.leader.computed + take], wanted)
                  for r, take, wanted in prefilling]
        if decode or chunks:
            try:
                logits = self.engine.step(decode, chunks)
            except Exception as exc:  # noqa: BLE001 - the prompts may be at fault: fail them, keep the others
                if not chunks:
                    raise
                self._fail_requests([request for request, _, _ in prefilling], exc)
                if not decode:
                    return
                prefilling, chunks = [], []
                logits = self.engine.step(decode)
            finishing, row = [], len(decode)
            for request, take, wanted in prefilling:
                request.note_prompt_logprobs(take, logits[row:row + wanted])
                request.leader.computed += take
                row += wanted
                if not request.leader.prefilling:
                    finishing.append((request, row - 1))  # its first token comes from its last row of logits
            self._choose_first_and_next(decoding, finishing, logits)
        self._retire()
        self.health.succeeded()

    def _choose_first_and_next(self, decoding: list[RunningSequence], finishing: list[tuple[RunningRequest, int]],
                               logits: torch.Tensor) -> None:
        """Pick the decoding sequences' next tokens, and the first tokens of the requests whose prompts are now
        complete: every sequence of such a request picks from its leader's row of logits, after copying its
        prompt."""
        choosers, rows = list(decoding), list(range(len(decoding)))
        for request, row in finishing:
            for seq in request.sequences[1:]:
                self.engine.cache.copy_prefix(request.leader.row, seq.row, seq.prompt_len)
                seq.computed = seq.prompt_len
            choosers += request.sequences
            rows += [row] * len(request.sequences)
        if choosers:
            if rows != list(range(logits.shape[0])):
                logits = logits[torch.tensor(rows, device=logits.device)]
            self._choose(choosers, logits)

    def _plan_prefill(self) -> list[tuple[RunningRequest, int, int]]:
        """This step's prompt chunks, oldest request first, within ``max_prefill_tokens``: (request, tokens, logits
        wanted)."""
        budget, planned = self.max_prefill_tokens, []
        for request in self._requests:
            if budget <= 0:
                break
            if (chunk := request.next_chunk(budget)) is not None:
                planned.append((request, *chunk))
                budget -= chunk[0]
        return planned

    def _drop_unstarted(self) -> None:
        """Requests cancelled or out of time before their prompt was computed end now, with no tokens."""
        for request in self._requests:
            if request.leader.prefilling and request.ticket.should_stop():
                reason = request.ticket.cancel_reason if request.ticket.cancelled else "time_limit"
                for seq in request.sequences:
                    seq.finish_reason = reason

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

    def _choose(self, sequences: list[RunningSequence], logits: torch.Tensor) -> None:
        tokens, logprobs = choose_next_tokens(logits, [s.sampler for s in sequences], [s.tokens for s in sequences],
                                              self._rng)
        for seq, token, logprob in zip(sequences, tokens, logprobs):
            seq.tokens.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            seq.finish_reason = seq.finish_reason_after(token)
            seq.ticket.emit(TokenEvent(seq.index, token, seq.finish_reason, logprob))

    def _retire(self) -> None:
        """Free the rows of finished sequences; answer a request once all of its sequences are done."""
        cache = self.engine.cache
        remaining = []
        for request in self._requests:
            for seq in request.sequences:
                if seq.finish_reason is not None and seq.row >= 0:
                    cache.release(seq.row)
                    seq.row = -1
            if request.finished:
                self._release_adapter(request)
                request.ticket.resolve(request.outputs())
            else:
                remaining.append(request)
        self._requests = remaining

    def _fail_step(self, exc: Exception) -> None:
        """Fail every running request, forget what the broken step may have half-written, and keep serving."""
        tickets = [request.ticket for request in self._requests]
        for request in self._requests:
            self._release_adapter(request)
        self._requests = []
        self.engine.cache.clear()
        self._fail_tickets(tickets, exc)

    def _fail_requests(self, requests: list[RunningRequest], exc: Exception) -> None:
        """Fail ``requests`` (whose prompts a failed step was computing); the others go on."""
        for request in requests:
            self._release_adapter(request)
            for seq in request.sequences:
                self.engine.cache.release(seq.row)
        self._requests = [request for request in self._requests if request not in requests]
        self._fail_tickets([request.ticket for request in requests], exc)

    def _fail_tickets(self, tickets: list[Ticket], exc: Exception) -> None:
        self.health.failed()
        logger.error("Generation failed for %d request(s): %s", len(tickets), exc, exc_info=exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for ticket in tickets:
            ticket.fail(_as_generation_failure(exc))

    def _release_adapter(self, request: RunningRequest) -> None:
        if request.adapter_slot != BASE:
            self.engine.lora.release(request.adapter_slot)
            request.adapter_slot = BASE

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
            ticket.resolve([SequenceOutput((), ticket.cancel_reason)] * options.num_return_sequences)
            return
        ticket.started_at = time.monotonic()
        try:
            out = self.engine.generate_beams(list(ticket.job.prompt_ids), options, ticket.should_stop)
            self.health.succeeded()
        except Exception as exc:  # noqa: BLE001 - fail this request, keep the worker
            self._fail_tickets([ticket], exc)
            return
        interrupted = ticket.cancel_reason if ticket.cancelled else "time_limit" if ticket.out_of_time() else "length"
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
