"""The Responses API's answer: a ``response`` object with one assistant message, whole or as its event sequence.

A stream is OpenAI's sequence of typed events, each with its ``sequence_number``: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``, a
``response.output_text.delta`` per piece of text, ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` — or ``response.incomplete`` when the answer was cut by
``max_output_tokens`` (``incomplete_details.reason``). An error once the stream has begun is an ``error`` event.

With tools, an answer that is a list of calls is answered as ``function_call`` output items (streamed as each item's
``response.output_item.added``, ``response.function_call_arguments.done`` and ``response.output_item.done``), and a
streamed answer's events come once it is complete.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from ...errors import PredictorError
from ..streaming import TextDelta
from ..tracing import random_hex_id
from .responses import ResponsesRequest
from .tools import parse_tool_calls

# The engine's finish reasons that leave a response incomplete, and OpenAI's reason for it; the server's drain
# ("shutdown") is named as on the other OpenAI routes.
INCOMPLETE = {"length": "max_output_tokens", "time_limit": "max_output_tokens", "cancelled": "max_output_tokens",
              "shutdown": "shutdown"}


class ResponseReply:
    """One response being put together: its ids, the answer's text so far, its token counts and how it ended."""

    def __init__(self, request: ResponsesRequest, model_name: str, input_tokens: int,
                 cached_tokens: Callable[[], int] = lambda: 0) -> None:
        self.request = request
        self.model_name = model_name
        self.input_tokens = input_tokens
        self.cached_tokens = cached_tokens  # the input's tokens the prefix cache held, once the request started
        self.id = f"resp_{random_hex_id()}"
        self.message_id = f"msg_{random_hex_id()}"
        self.created_at = int(time.time())
        self.text = ""
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.tools = bool(request.tool_mode()[0])  # the answer may be a list of calls
        self.calls: list[dict[str, Any]] | None = None  # parsed when the answer ends
        self._sequence = 0

    def add(self, delta: TextDelta) -> None:
        self.text += delta.text
        self.output_tokens = delta.tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            if self.tools:
                self.calls = parse_tool_calls(self.text)

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason in INCOMPLETE else "completed"

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def call_items(self) -> list[dict[str, Any]]:
        return [{"type": "function_call", "id": f"fc_{call['id'][5:]}", "call_id": call["id"],
                 "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}
                for call in self.calls or []]

    def output(self) -> list[dict[str, Any]]:
        return self.call_items() if self.calls else [self.message(done=True)]

    def message(self, done: bool) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "role": "assistant",
                "status": self.status if done else "in_progress", "content": [self.part()] if done else []}

    def response(self, done: bool) -> dict[str, Any]:
        """The response object: in progress (no output yet) or finished, with its usage."""
        request = self.request
        incomplete = INCOMPLETE.get(self.finish_reason or "") if done else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model_name,
            "status": self.status if done else "in_progress", "error": None, "background": False,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "output": self.output() if done else [], "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": None, "reasoning": None, "store": False, "temperature": request.temperature,
            "top_p": request.top_p, "text": {"format": request.text.format.to_wire()},
            "tool_choice": _wire(request.tool_choice) if request.tool_choice is not None else
            ("auto" if request.tools else "none"), "tools": [_wire(tool) for tool in request.tools],
            "truncation": "disabled", "metadata": request.metadata, "user": request.user,
            "usage": self.usage() if done else None,
        }

    def usage(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens()},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens}

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> dict[str, Any]:
        async with aclosing(deltas):
            async for delta in deltas:
                self.add(delta)
        return self.response(done=True)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return event

    def _in_message(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    async def events(self, deltas: AsyncIterator[TextDelta]) -> AsyncIterator[dict[str, Any]]:
        yield self.event("response.created", response=self.response(done=False))
        yield self.event("response.in_progress", response=self.response(done=False))
        if self.tools:  # text or calls: known once the answer is complete
            async with aclosing(deltas):
                held = [delta async for delta in deltas]
            for delta in held:
                self.add(delta)
            if self.calls:
                for index, item in enumerate(self.call_items()):
                    yield self.event("response.output_item.added", output_index=index,
                                     item={**item, "arguments": "", "status": "in_progress"})
                    yield self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, arguments=item["arguments"])
                    yield self.event("response.output_item.done", output_index=index, item=item)
                final = self.response(done=True)
                yield self.event(f"response.{final['status']}", response=final)
                return
            self.text, deltas = "", _replay(held)  # text after all: its events as they would have come
        yield self.event("response.output_item.added", output_index=0, item=self.message(done=False))
        yield self.event("response.content_part.added", **self._in_message(),
                         part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async with aclosing(deltas):
            async for delta in deltas:
                self.add(delta)
                if delta.text:
                    yield self.event("response.output_text.delta", **self._in_message(), delta=delta.text,
                                     logprobs=[])
        yield self.event("response.output_text.done", **self._in_message(), text=self.text, logprobs=[])
        yield self.event("response.content_part.done", **self._in_message(), part=self.part())
        yield self.event("response.output_item.done", output_index=0, item=self.message(done=True))
        final = self.response(done=True)
        yield self.event(f"response.{final['status']}", response=final)

    def error_event(self, exc: PredictorError) -> dict[str, Any]:
        """An error after the stream began: OpenAI's ``error`` event."""
        return self.event("error", code=exc.error_type, message=exc.message, param=exc.param)


async def _replay(deltas: list[TextDelta]) -> AsyncIterator[TextDelta]:
    for delta in deltas:
        yield delta


def _wire(model: Any) -> Any:
    return model.model_dump(exclude_none=True) if hasattr(model, "model_dump") else model
