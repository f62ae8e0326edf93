"""Starting a request in the running batch: its adapter's slot in the bank, its sequences' samplers and cache rows
(the leader's from the longest prefix cached with the same adapter), and the answer of one that cannot start. A
request that cannot start fails alone, before it holds any row or slot."""

from __future__ import annotations

import logging
import time

from ... import metrics
from ...errors import GenerationFailed, ModelNotFound, PredictorError
from .. import faults
from ..lora.bank import BASE
from ..model.runner import Engine
from ..sampling.choice import SamplingTable
from ..sampling.sampler import make_sampler
from .running import RunningRequest, RunningSequence
from .tickets import Ticket

logger = logging.getLogger(__name__)


def place_adapter(engine: Engine, ticket: Ticket) -> int | None:
    """The bank slot of the ticket's adapter (``BASE`` without one), None while every slot is in use;
    ModelNotFound when its adapter was unloaded after the request was accepted."""
    name = ticket.job.adapter
    if name is None:
        return BASE
    faults.inject("adapter", ticket.job.prompt_ids)
    bank = engine.lora
    try:
        if bank is None:
            raise KeyError(name)
        return bank.place(name)
    except KeyError:
        raise ModelNotFound(f"the adapter {name!r} was unloaded before this request started") from None


def start_request(engine: Engine, sampling: SamplingTable, ticket: Ticket, running: int, slot: int = BASE,
                  prefix_caching: bool = True) -> RunningRequest:
    """Give a request's sequences their samplers and rows (beside ``running`` sequences), with its adapter's
    ``slot``, and their options to ``sampling``; the leader's row starts from the longest prefix cached with the
    same adapter. If any of it fails, the rows it took are given back."""
    ticket.started_at = time.monotonic()
    options, cache, prompt = ticket.job.options, engine.cache, list(ticket.job.prompt_ids)
    samplers = [make_sampler(options, prompt, index, engine.device, engine.tokenizer)
                for index in range(options.num_return_sequences)]
    # Keys and values computed with an adapter are that adapter's alone.
    salt = engine.lora.key(slot) if slot != BASE else None
    hit = None
    # A prompt's log-probabilities come from computing it: a request that asks for them reuses no prefix.
    if prefix_caching and options.prompt_logprobs is None:
        faults.inject("prefix", prompt)
        hit = cache.find_prefix(prompt, salt)
        metrics.PREFIX_CACHE_QUERIES.inc(len(prompt))
        metrics.PREFIX_CACHE_HITS.inc(hit.tokens if hit else 0)
        ticket.cached_tokens = hit.tokens if hit else 0
    sequences: list[RunningSequence] = []
    try:
        for index, sampler in enumerate(samplers):
            row = cache.allocate(running + index, hit if index == 0 else None, salt)
            engine.use_adapter(row, slot)
            sampling.set_row(row, sampler, prompt)
            sequences.append(RunningSequence(ticket, index, row, list(prompt), sampler, len(prompt),
                                             computed=cache.length(row)))
            faults.inject("rows", prompt)
    except BaseException:
        for seq in sequences:
            cache.release(seq.row, keep=prefix_caching)
        raise
    if ticket.job.adapter is not None:
        metrics.LORA_REQUESTS.labels(ticket.job.adapter).inc()
    return RunningRequest(ticket, sequences, slot)


def admission_error(exc: Exception) -> PredictorError:
    """The answer of a request that could not start: a 4xx naming its option when one was at fault, else a 500."""
    if isinstance(exc, PredictorError):
        return exc
    logger.error("Starting a request failed", exc_info=exc)
    return GenerationFailed(f"the request could not be started: {type(exc).__name__}", stage="admission")
