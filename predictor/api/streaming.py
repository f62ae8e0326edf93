"""Streaming: a request's token events become text as it is generated, sent as server-sent events.

``stream_text`` turns a ticket's ``TokenEvent``s into ``TextDelta``s per sequence, with two text-side jobs the engine
does not do:

- incremental detokenization (``IncrementalDecoder``): a character whose UTF-8 bytes are split over several byte-level
  tokens is held back until it is whole, so the pieces add up to exactly the text the non-streaming answer decodes;
- stop strings (``StopMatcher``): the text is cut before the first stop string, and once every sequence has ended
  the ticket is cancelled so the batcher stops spending steps on it.

Beam search has its sequences only at the end, so their events come together. An error after the stream has begun
is sent as an event (``{"error": ..., "error_type": ...}``) followed by ``[DONE]``; a client that disconnects cancels
the request (Starlette cancels the stream, and ``stream_text``'s ``finally`` cancels the ticket).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .. import metrics
from ..engine import faults
from ..engine.options import GenerationJob
from ..engine.model.runner import PROMPT_CONTEXT_TOKENS
from ..engine.sampling.sampler import TokenLogprob
from ..engine.scheduling.tickets import Ticket, TokenEvent
from ..errors import GenerationFailed, PredictorError
from .model import FalconModel, detokenized

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events
DONE_EVENT = "data: [DONE]\n\n"

T = TypeVar("T")


class IncrementalDecoder:
    """Turns one sequence's token ids into text piece by piece; the pieces add up to decoding them all at once.

    Each step decodes a short window (TGI's and vLLM's prefix/read offsets) rather than the whole sequence, and
    holds the text back while it ends in U+FFFD: the bytes of a character not yet complete.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the window decoded for context
        self._read = len(self._ids)  # ids up to here have been turned into text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is left at the end of the sequence, an incomplete character (as U+FFFD) included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        seen = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if not final and text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen):]


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces, holding back a tail that could begin one."""

    def __init__(self, stops: Sequence[str], kept: Sequence[str] = ()) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.kept = frozenset(kept)  # stops passed on with the text before them (vLLM's include_stop_str_in_output)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that can be passed on, and whether a stop string ended the output (the stop is not passed
        unless it is one of ``kept``)."""
        text = self._held + text
        # The stop that is complete first ends the output, as it would have had the text come a character at a
        # time: "a" in "\na" stops before a longer stop "\naa" that began earlier could be completed.
        found = [(at + len(stop), at, stop) for stop in self.stops if (at := text.find(stop)) >= 0]
        if found:
            self._held = ""
            end, at, stop = min(found)
            return text[:end if stop in self.kept else at], True
        keep = max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
                   default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class TextDelta:
    """New text of sequence ``index``; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    token_id: int | None  # the token this delta came with (None for the end-of-sequence marker of beam search)
    finish_reason: str | None = None  # the engine's ("stop", "length", ...), or "stop" for a stop string
    tokens: int = 0  # tokens of this sequence so far; at a stop string, those up to the one that completed it
    logprob: TokenLogprob | None = None  # the token's, when the request asked for log-probabilities


@dataclass
class _SequenceText:
    decoder: IncrementalDecoder
    stops: StopMatcher
    tokens: int = 0
    finish_reason: str | None = None

    def advance(self, event: TokenEvent) -> str:
        text = ""
        if event.token_id is not None:
            self.tokens += 1
            text = self.decoder.push(event.token_id)
        if event.finish_reason is not None:
            text += self.decoder.flush()
        text, stopped = self.stops.push(text)
        if stopped:
            self.finish_reason = "stop"
        elif event.finish_reason is not None:
            text += self.stops.flush()
            self.finish_reason = event.finish_reason
        return text


async def stream_text(model: FalconModel, job: GenerationJob, ticket: Ticket) -> AsyncIterator[TextDelta]:
    """Text deltas of a ticket submitted with ``stream=True``, each sequence cut at its first stop text
    (``job.stop_texts``).

    The ticket is cancelled when this ends, whether every sequence finished, the caller stopped iterating (a
    client went away) or an error was raised, so no generation outlives the response.
    """
    def decode(ids: list[int]) -> str:
        return detokenized(job, lambda: model.engine.decode(ids, job.clean_up_tokenization_spaces,
                                                            job.skip_special_tokens))

    sequences = [_SequenceText(IncrementalDecoder(decode, job.prompt_ids),
                               StopMatcher(job.stop_texts, job.kept_stop_texts))
                 for _ in range(job.options.num_return_sequences)]
    try:
        async with aclosing(ticket.events()) as events:
            async for event in events:
                _check_streaming(job)
                sequence = sequences[event.index]
                if sequence.finish_reason is not None:
                    continue  # cut at a stop string while the engine went on
                text = sequence.advance(event)
                yield TextDelta(event.index, text, event.token_id, sequence.finish_reason, sequence.tokens,
                                event.logprob)
                if all(s.finish_reason is not None for s in sequences):
                    break
    finally:
        ticket.cancel()  # a no-op once every sequence has finished in the engine


def _check_streaming(job: GenerationJob) -> None:
    """The stream's own stage (the fault-injection hook's ``streaming``): a failure there ends this stream alone."""
    try:
        faults.inject("streaming", job.prompt_ids)
    except Exception as exc:  # noqa: BLE001
        logger.error("Streaming a request's answer failed", exc_info=exc)
        raise GenerationFailed(f"streaming the answer failed ({type(exc).__name__})", stage="streaming") from exc


def sse_response(payloads: AsyncIterator[Any], route: str, error_event: Callable[[PredictorError], Any], *,
                 typed: bool = False) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per payload, then ``data: [DONE]``. An error raised while streaming
    becomes the event ``error_event(error)`` before ``[DONE]``: the status line has been sent already. ``typed``
    events (OpenAI's Responses API) carry an ``event:`` line with the payload's ``type``, and no ``[DONE]``."""
    return StreamingResponse(_sse(payloads, route, error_event, typed), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _sse(payloads: AsyncIterator[Any], route: str, error_event: Callable[[PredictorError], Any],
               typed: bool) -> AsyncIterator[str]:
    event = typed_sse_event if typed else sse_event
    outcome = "cancelled"  # unless it ends otherwise: the client went away
    try:
        async with aclosing(payloads):
            async for payload in payloads:
                yield event(payload)
        outcome = "success"
    except PredictorError as exc:
        outcome = exc.outcome
        yield event(error_event(exc))
    except Exception:  # noqa: BLE001 - a bug in shaping one answer must still end its stream properly
        logger.exception("Streaming an answer on %s failed", route)
        failure = GenerationFailed("internal error while streaming the answer", stage="streaming")
        outcome = failure.outcome
        yield event(error_event(failure))
    finally:
        metrics.REQUESTS.labels(route, outcome).inc()
    if not typed:
        yield DONE_EVENT


def sse_event(data: Any) -> str:
    return f"data: {orjson.dumps(data).decode()}\n\n"


def typed_sse_event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\n{sse_event(data)}"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work`` unless the client closes the connection first, which cancels it: (finished, its result)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        finished = task.done()
        if not finished:
            task.cancel()
    return (True, task.result()) if finished else (False, None)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that is left to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
