"""The running batch of the decode worker: admitted requests, each sequence in its own cache row, and one step
of work on them all (``step``), with a failure at any stage ending the request it belongs to alone.

A step computes prompt chunks beside the running sequences' next tokens, chooses each sequence's token, and retires
what finished. When the shared forward pass raises, the prompts being computed are presumed at fault and fail;
when the decode rows alone still fail, each request's rows run on their own and only those that fail again end.
Token choice is redone request by request in the same way. Keys and values are committed only by a pass that
succeeded (``Engine.step``), so a pass can be rerun. A request that cannot be admitted (its adapter, sampler, prefix
lookup or rows: ``admission``) fails before it takes any row or adapter slot; one whose answer cannot be made fails
at retirement, its rows and slot freed.
"""

from __future__ import annotations

import logging
import time

import torch

from ... import metrics
from ...errors import GenerationFailed, PredictorError
from .. import faults
from .admission import admission_error, place_adapter, start_request
from .health import EngineHealth
from ..lora.bank import BASE
from ..model.runner import DeviceTokens, Engine
from .running import PendingTokens, RunningRequest, RunningSequence
from .speculating import Speculator, positions, verify_rows
from ..sampling.choice import ChoicePlan, SamplingTable, choose_tokens
from ..sampling.sampler import TokenLogprob, stopped_on_strings
from .tickets import Ticket, TokenEvent, emit_all
from ..transfer import to_device

logger = logging.getLogger(__name__)


class DecodeBatch:
    """The requests admitted to the decode worker, in admission order, and the verbs that move them on."""

    def __init__(self, engine: Engine, health: EngineHealth, rng: torch.Generator, max_prefill_tokens: int,
                 prefix_caching: bool, speculator: Speculator | None = None) -> None:
        self.engine = engine
        self.speculator = speculator  # drafts and their verification, with speculative decoding
        self.health = health
        self.rng = rng  # unseeded requests sample from this
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.requests: list[RunningRequest] = []
        self.sampling = SamplingTable(engine.device, engine.info.vocab_size)  # each cache row's options
        self._admitted = 0  # requests started so far: a row's options change only when one starts
        self._plan: tuple[object, ChoicePlan] | None = None  # the last step's choice plan, and whom it was for
        self._pending: PendingTokens | None = None  # tokens chosen by the last step, on the device, not read yet
        self._waited = 0.0  # this step's time reading tokens back (waiting for the device)
        self._outbox: list[tuple[Ticket, TokenEvent]] = []  # the last tokens' events, not yet handed to clients
        self.hold_events = engine.device.type != "cpu"  # an accelerator's: see ``_settle``

    @property
    def running_sequences(self) -> int:
        return sum(len(request.sequences) for request in self.requests)

    def admit(self, ticket: Ticket, running: int) -> int | None:
        """Start ``ticket``'s request in the batch, beside ``running`` sequences (the caller counts them as it admits:
        ``running_sequences`` walks every request); the rows it took (0 if it could not start: then it has
        its answer, a 4xx naming its option or a 500), or None while every adapter slot is in use (it waits)."""
        try:
            slot = place_adapter(self.engine, ticket)
            if slot is None:
                return None
            try:
                self.requests.append(start_request(self.engine, self.sampling, ticket, running, slot,
                                                   self.prefix_caching))
                self._admitted += 1
            except BaseException:
                self._release_slot(slot)
                raise
        except Exception as exc:  # noqa: BLE001 - this request cannot start: it fails alone
            ticket.fail(admission_error(exc))
            return 0
        return len(self.requests[-1].sequences)

    @torch.inference_mode()
    def step(self) -> None:
        started, self._waited = time.perf_counter(), 0.0
        self._step()
        metrics.STEP_DEVICE_WAIT_SECONDS.observe(self._waited)
        metrics.STEP_HOST_SECONDS.observe(time.perf_counter() - started - self._waited)

    def _step(self) -> None:
        """Launch this step's forward pass and token choice, then read back the tokens chosen by the step before
        (the device computes this step meanwhile) and give them to their sequences: one step ahead."""
        self._drop_unstarted()
        pending, self._pending = self._pending, None
        decoding = self._decoding(pending)
        drafts: dict[int, list[int]] = {}
        lengths = self.speculator.lengths(decoding) if self.speculator is not None else {}
        if pending is not None and (lengths or not pending.holds(decoding)):  # tokens wanted on the host now
            self._settle(pending, [])
            pending = None
            decoding = self._decoding(None)
        if lengths:
            drafts = self.speculator.drafts(decoding, lengths)
            decoding.sort(key=lambda seq: id(seq) in drafts)  # those without drafts are plain decode rows, first
        prefilling = self._plan_prefill()
        fed: list[RunningSequence] = []  # fed their token still on the device
        forwarded = self._forward(decoding, prefilling, pending, drafts) if decoding or prefilling else None
        if forwarded is not None:
            logits, decoding, prefilling = forwarded
            fed = decoding if pending is not None else []
            verified = positions(decoding, drafts) if drafts else 0  # logits rows of the verified sequences
            finishing, row = [], verified or len(decoding)
            for request, take, wanted in prefilling:
                request.note_prompt_logprobs(take, logits[row:row + wanted])
                request.leader.computed += take
                row += wanted
                if not request.leader.prefilling:
                    finishing.append((request, row - 1))  # its first token comes from its last row of logits
            if drafts:  # the decoding sequences take their tokens now, the others' are chosen below
                self._verify(decoding, logits[:verified], drafts)
                decoding, logits = [], logits[verified:]
                finishing = [(request, at - verified) for request, at in finishing]
            choosers, logits = self._choosers(decoding, finishing, logits)
            if choosers:
                plan = self._plan_for(choosers)
                if pending is not None and plan.id_rows:  # their processors read the tokens on the device
                    self._settle(pending, fed)
                    pending = None
                self._pending = self._choose(choosers, logits, plan)
        if pending is not None:
            self._settle(pending, fed)
        self._retire()
        if self._pending is None:  # no read-back next step: the events go now
            self._send_events()
        if forwarded is not None or not (decoding or prefilling):  # every request in the pass failed: no sign
            self.health.succeeded()

    def _decoding(self, pending: PendingTokens | None) -> list[RunningSequence]:
        """The sequences to feed this step: every running one past its prompt, but one whose token on the device
        is its last by length (the step after it would be wasted)."""
        ahead = pending.position if pending is not None else {}
        return [seq for request in self.requests if not request.leader.prefilling for seq in request.sequences
                if seq.finish_reason is None and len(seq.tokens) + (id(seq) in ahead) < seq.length_limit]

    def _settle(self, pending: PendingTokens, fed: list[RunningSequence]) -> None:
        """Read back the tokens chosen by the step before and give them to their sequences: the cache learns those
        ``fed`` this step, each sequence checks whether it ends (eos, stop strings, length, cancellation) and its
        client gets its event. A sequence that ended already (on the token before, or its request failed) drops
        its token: no text past its end is ever sent.

        On an accelerator (``hold_events``) the events wait in the outbox until the next read-back (or an answer, or
        the batch's last step): handed to the event loop while this thread waits for the device, the clients'
        Python does not take turns on the GIL with the launch of the next step. On the CPU they go at once: there
        the next step's forward is this thread's own computing, whose operators leave the GIL to the event loop,
        and holding the events would delay each token by a forward."""
        self._send_events()
        tokens = self._read_back(pending.tokens)
        fed_now = {id(seq) for seq in fed}
        taking = []
        for seq, token, logprob in zip(pending.sequences, tokens, pending.logprobs):
            if seq.finish_reason is not None or seq.row < 0:
                continue
            if id(seq) in fed_now:
                self.engine.cache.extend(seq.row, (token,))
            seq.tokens.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            taking.append((seq, token, logprob))
        stopped = stopped_on_strings([seq.sampler for seq, _, _ in taking], [seq.tokens for seq, _, _ in taking])
        events, now = [], time.monotonic()
        for (seq, token, logprob), stop in zip(taking, stopped):
            seq.finish_reason = seq.finish_reason_after(token, stop, now)
            if seq.ticket.wants_events:
                events.append((seq.ticket, TokenEvent(seq.index, token, seq.finish_reason, logprob)))
        self._outbox += events
        if not self.hold_events:
            self._send_events()

    def _send_events(self) -> None:
        """Hand the outbox's events to their clients (one wake-up of the event loop)."""
        if self._outbox:
            events, self._outbox = self._outbox, []
            emit_all(events)

    def _forward(self, decoding: list[RunningSequence], prefilling: list[tuple[RunningRequest, int, int]],
                 pending: PendingTokens | None, drafts: dict[int, list[int]]
                 ) -> tuple[torch.Tensor, list[RunningSequence], list[tuple[RunningRequest, int, int]]] | None:
        """One forward pass for the decoding sequences and the planned prompt chunks: (logits, and the sequences
        and chunks they are for), None if every request in it failed. If the pass raises, the prompts are presumed
        at fault and fail; if the decode rows alone fail too, each request's rows run on their own, and only the
        requests whose rows fail again end. Keys and values are committed only by a pass that succeeded, so a
        pass can be rerun. The decoding sequences' tokens are ``pending``'s, on the device, when it is given; with
        ``drafts`` every decoding sequence is verified (its drafts by ``id``, if it has any)."""
        try:
            return self._run_step(decoding, prefilling, pending, drafts), decoding, prefilling
        except Exception as exc:  # noqa: BLE001 - fail the prompts, keep the others
            error = exc
        if prefilling:
            self._fail_requests([request for request, _, _ in prefilling], error)
            if not decoding:
                return None
            try:
                return self._run_step(decoding, [], pending, drafts), decoding, []
            except Exception as exc:  # noqa: BLE001
                error = exc
        requests = self._requests_of(decoding)
        if len(requests) == 1:
            self._fail_requests(requests, error)
            return None
        kept, parts = [], []
        for request in requests:
            rows = [seq for seq in decoding if seq.ticket is request.ticket]
            try:
                parts.append(self._run_step(rows, [], pending, drafts))
                kept += rows
            except Exception as exc:  # noqa: BLE001
                self._fail_requests([request], exc)
        return (torch.cat(parts), kept, []) if parts else None

    def _run_step(self, decoding: list[RunningSequence], prefilling: list[tuple[RunningRequest, int, int]],
                  pending: PendingTokens | None, drafts: dict[int, list[int]]) -> torch.Tensor:
        faults.inject_each("decode", (seq.ticket.job.prompt_ids for seq in decoding))
        faults.inject_each("prefill", (request.ticket.job.prompt_ids for request, _, _ in prefilling))
        chunks = [(r.leader.row, r.leader.tokens[r.leader.computed:r.leader.computed + take], wanted)
                  for r, take, wanted in prefilling]
        if drafts:
            plain = [(seq.row, seq.tokens[-1]) for seq in decoding if id(seq) not in drafts]
            return self.engine.step(plain, chunks, verify=verify_rows(decoding, drafts))
        if pending is None or not decoding:
            return self.engine.step([(seq.row, seq.tokens[-1]) for seq in decoding], chunks)
        return self.engine.step(DeviceTokens([seq.row for seq in decoding], pending.of_sequences(decoding)), chunks)

    def _requests_of(self, sequences: list[RunningSequence]) -> list[RunningRequest]:
        tickets = {id(seq.ticket) for seq in sequences}
        return [request for request in self.requests if id(request.ticket) in tickets]

    def _choosers(self, decoding: list[RunningSequence], finishing: list[tuple[RunningRequest, int]],
                  logits: torch.Tensor) -> tuple[list[RunningSequence], torch.Tensor]:
        """Who picks a token from which row of ``logits``: the decoding sequences, and every sequence of each
        request whose prompt is now complete, from its leader's row, after copying its prompt."""
        choosers, rows = list(decoding), list(range(len(decoding)))
        for request, row in finishing:
            for seq in request.sequences[1:]:
                self.engine.cache.copy_prefix(request.leader.row, seq.row, seq.prompt_len)
                seq.computed = seq.prompt_len
            choosers += request.sequences
            rows += [row] * len(request.sequences)
        if choosers and rows != list(range(logits.shape[0])):
            logits = logits[to_device(rows, logits.device, torch.long)]
        return choosers, logits

    def _plan_prefill(self) -> list[tuple[RunningRequest, int, int]]:
        """This step's prompt chunks, oldest request first, within ``max_prefill_tokens``: (request, tokens, logits
        wanted)."""
        budget, planned = self.max_prefill_tokens, []
        for request in self.requests:
            if budget <= 0:
                break
            if (chunk := request.next_chunk(budget)) is not None:
                planned.append((request, *chunk))
                budget -= chunk[0]
        return planned

    def _drop_unstarted(self) -> None:
        """Requests cancelled or out of time before their prompt was computed end now, with no tokens."""
        for request in self.requests:
            if request.leader.prefilling and request.ticket.should_stop():
                reason = request.ticket.cancel_reason if request.ticket.cancelled else "time_limit"
                for seq in request.sequences:
                    seq.finish_reason = reason

    def _choose(self, sequences: list[RunningSequence], logits: torch.Tensor, plan: ChoicePlan
                ) -> PendingTokens | None:
        """Launch the choice of ``sequences``' next tokens; they are read back by the next step."""
        try:
            faults.inject_each("sampling", (seq.ticket.job.prompt_ids for seq in sequences))
            tokens, logprobs = self._choose_tokens(sequences, logits, plan)
        except Exception:  # noqa: BLE001 - find whose choice fails: each request's rows on their own
            sequences, tokens, logprobs = self._choose_each(sequences, logits)
        return PendingTokens.of(sequences, tokens, logprobs) if sequences else None

    def _plan_for(self, sequences: list[RunningSequence]) -> ChoicePlan:
        """The choice plan of these rows: the last step's while the same sequences run in the same order."""
        key = (self._admitted, [seq.row for seq in sequences])
        if self._plan is None or self._plan[0] != key:
            self._plan = key, ChoicePlan.of([seq.sampler for seq in sequences], key[1], self.engine.device)
        return self._plan[1]

    def _choose_tokens(self, sequences: list[RunningSequence], logits: torch.Tensor, plan: ChoicePlan
                       ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """The rows' tokens, chosen on the device, and their counts moved on there; nothing is read back but the
        log-probabilities of the rows that ask."""
        ids = [seq.tokens for seq in sequences] if plan.id_rows else []
        tokens, logprobs = choose_tokens(logits, plan, self.sampling, ids, self.rng)
        self.sampling.advance(plan.rows, tokens)
        return tokens, logprobs or [None] * len(sequences)

    def _verify(self, decoding: list[RunningSequence], logits: torch.Tensor, drafts: dict[int, list[int]]) -> None:
        """The verified sequences choose and take their tokens now (``speculating``). If choice fails, it is
        redone request by request, and only the requests it fails for again end."""
        self._send_events()  # the tokens settled before come first: the speculator sends its own at once
        try:
            faults.inject_each("sampling", (seq.ticket.job.prompt_ids for seq in decoding))
            bursts = self.speculator.choose(decoding, logits, drafts, self.sampling, self.rng, self._read_back)
        except Exception:  # noqa: BLE001 - find whose choice fails: each request's rows on their own
            starts = [positions(decoding[:i], drafts) for i in range(len(decoding) + 1)]
            kept, bursts = [], []
            for request in self._requests_of(decoding):
                mine = [i for i, seq in enumerate(decoding) if seq.ticket is request.ticket]
                rows = [r for i in mine for r in range(starts[i], starts[i + 1])]
                try:
                    faults.inject_each("sampling", (decoding[i].ticket.job.prompt_ids for i in mine))
                    bursts += self.speculator.choose([decoding[i] for i in mine], logits[rows], drafts,
                                                     self.sampling, self.rng, self._read_back)
                    kept += [decoding[i] for i in mine]
                except Exception as exc:  # noqa: BLE001
                    self._fail_requests([request], exc, stage="sampling")
            decoding = kept
        self.speculator.settle(decoding, bursts, drafts, self.engine.cache, self.sampling)

    def _read_back(self, tokens: torch.Tensor) -> list[int]:
        """The chosen tokens on the host: where the step waits for the device (timed)."""
        started = time.perf_counter()
        chosen = tokens.tolist()
        self._waited += time.perf_counter() - started
        return chosen

    def _choose_each(self, sequences: list[RunningSequence], logits: torch.Tensor
                     ) -> tuple[list[RunningSequence], torch.Tensor, list[TokenLogprob | None]]:
        """Token choice request by request, after it failed for the batch: the requests it fails for again end,
        the others get their tokens."""
        kept, tokens, logprobs = [], [], []
        for request in self._requests_of(sequences):
            rows = [i for i, seq in enumerate(sequences) if seq.ticket is request.ticket]
            mine = [sequences[i] for i in rows]
            try:
                faults.inject_each("sampling", (seq.ticket.job.prompt_ids for seq in mine))
                plan = ChoicePlan.of([s.sampler for s in mine], [s.row for s in mine], self.engine.device)
                chosen, scored = self._choose_tokens(mine, logits[to_device(rows, logits.device, torch.long)], plan)
            except Exception as exc:  # noqa: BLE001
                self._fail_requests([request], exc, stage="sampling")
                continue
            kept += mine
            tokens.append(chosen)
            logprobs += scored
        return kept, torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long), logprobs

    def _retire(self) -> None:
        """Free the rows of finished sequences; answer a request once all of its sequences are done. A request
        whose answer cannot be made fails alone."""
        remaining = []
        for request in self.requests:
            if all(seq.finish_reason is None for seq in request.sequences):  # most requests, most steps
                remaining.append(request)
                continue
            self._send_events()  # a request's events come before its answer
            try:
                self._release_finished(request)
                if not request.finished:
                    remaining.append(request)
                    continue
                self._release_adapter(request)
                faults.inject("retirement", request.ticket.job.prompt_ids)
                request.ticket.resolve(request.outputs())
            except Exception as exc:  # noqa: BLE001
                for seq in request.sequences:
                    seq.finish_reason = seq.finish_reason or "failed"
                self._release_finished(request)
                self._release_adapter(request)
                fail_tickets(self.health, [request.ticket], exc, stage="retirement")
        self.requests = remaining

    def _release_finished(self, request: RunningRequest) -> None:
        for seq in request.sequences:
            if seq.finish_reason is not None and seq.row >= 0:
                self.engine.cache.release(seq.row, keep=self.prefix_caching)
                seq.row = -1

    def fail_all(self, exc: Exception) -> None:
        """Fail every running request, forget what the broken step may have half-written, and keep serving."""
        tickets = [request.ticket for request in self.requests]
        for request in self.requests:
            self._release_adapter(request)
        self.requests = []
        self._pending, self._outbox = None, []
        self.engine.cache.clear()
        fail_tickets(self.health, tickets, exc)

    def _fail_requests(self, requests: list[RunningRequest], exc: Exception, stage: str = "generation") -> None:
        """Fail ``requests`` and free their rows; the others go on."""
        self._send_events()  # every event before the answers
        for request in requests:
            self._release_adapter(request)
            for seq in request.sequences:
                if seq.row >= 0:
                    self.engine.cache.release(seq.row, keep=self.prefix_caching)
                    seq.row = -1
        self.requests = [request for request in self.requests if request not in requests]
        fail_tickets(self.health, [request.ticket for request in requests], exc, stage)

    def _release_adapter(self, request: RunningRequest) -> None:
        """Give back the request's adapter slot, once."""
        self._release_slot(request.adapter_slot)
        request.adapter_slot = BASE

    def _release_slot(self, slot: int) -> None:
        if slot != BASE:
            self.engine.lora.release(slot)


def fail_tickets(health: EngineHealth, tickets: list[Ticket], exc: Exception, stage: str = "generation") -> None:
    """Answer ``tickets`` with the failure ``exc`` at ``stage`` (a 500 naming the stage; the cause is logged, not
    sent); a failed forward pass or token choice counts towards the engine's health."""
    if stage in ("generation", "sampling"):  # where a device fault shows (a CUDA error surfaces at a sync)
        health.failed()
    logger.error("%s failed for %d request(s): %s", stage.capitalize(), len(tickets), exc, exc_info=exc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for ticket in tickets:
        ticket.fail(_as_generation_failure(exc, stage))


def _as_generation_failure(exc: BaseException, stage: str = "generation") -> PredictorError:
    if isinstance(exc, PredictorError):  # already says what the client should know
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return GenerationFailed("the accelerator ran out of memory for this batch; retry, or ask for fewer or "
                                "shorter sequences", stage=stage)
    return GenerationFailed(f"{stage} failed: {type(exc).__name__}", stage=stage)
