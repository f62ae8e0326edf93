"""The OpenAI answers: a completion or chat completion put together from text deltas, whole or as chunks.

``CompletionsApi`` and ``ChatCompletionsApi`` hold what differs between the two (object names, how a choice and its
log-probabilities look); ``Reply`` collects one answer's choices, finish reasons, token counts and log-probabilities.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ...engine.sampling import TokenLogprob
from ..streaming import TextDelta

FINISH_REASONS = {"stop": "stop", "length": "length", "shutdown": "shutdown"}  # others (time_limit,
# cancelled) were cut short: "length"
TokenText = Callable[[int], str]  # a token id's text


@dataclass(frozen=True)
class LoggedToken:
    """A generated token with its log-probabilities and where its text starts: the length of the choice's text
    before it, counting each token's own text (as vLLM does; a part of a character counts as one U+FFFD)."""

    token_id: int
    logprob: TokenLogprob | None  # None: the prompt's first token, which nothing predicts
    text_offset: int


class CompletionsApi:
    """How an OpenAI API shapes its answer; chat completions differ only in these."""

    object_name, chunk_object_name, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, route: str) -> None:
        self.route = route

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    chunk_choice = choice

    def first_chunks(self, prefixes: list[str], logprobs: Any = None) -> list[dict[str, Any]]:
        """What a stream starts with: an echoed prompt per choice (with its tokens' log-probabilities if asked)."""
        return [self.choice(i, prefix, None, logprobs) for i, prefix in enumerate(prefixes) if prefix]

    def logprobs(self, tokens: list[LoggedToken], token_text: TokenText) -> dict[str, Any]:
        """The legacy completions shape: parallel lists (``null`` for an echoed prompt's first token)."""
        return {"tokens": [token_text(t.token_id) for t in tokens],
                "token_logprobs": [t.logprob.logprob if t.logprob else None for t in tokens],
                "top_logprobs": [{token_text(i): value for i, value in t.logprob.top} if t.logprob else None
                                 for t in tokens],
                "text_offset": [t.text_offset for t in tokens]}


class ChatCompletionsApi(CompletionsApi):
    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def first_chunks(self, prefixes: list[str], logprobs: Any = None) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(prefixes))]

    def logprobs(self, tokens: list[LoggedToken], token_text: TokenText) -> dict[str, Any]:
        def entry(token_id: int, value: float) -> dict[str, Any]:
            text = token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token_id, t.logprob.logprob),
                             "top_logprobs": [entry(i, value) for i, value in t.logprob.top]} for t in tokens],
                "refusal": None}


@dataclass
class _Choice:
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    logged: list[LoggedToken] = field(default_factory=list)
    logged_chars: int = 0  # the logged tokens' text so far, from the end of the echoed prompt


class Reply:
    """One answer being put together: its id, each choice's text so far, finish reason, token count and (when
    asked) log-probabilities."""

    def __init__(self, api: CompletionsApi, model_name: str, prompt_tokens: int, prefixes: list[str],
                 token_text: TokenText, logprobs: bool,
                 echoed: Callable[[], list[LoggedToken]] | None = None) -> None:
        """``echoed``, for an echoed prompt with log-probabilities: its logged tokens, once the engine has them
        (the ticket's, set before its first token event)."""
        self.api = api
        self.id = f"{api.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self.prefixes = prefixes
        self.choices = [_Choice(prefix) for prefix in prefixes]
        self.token_text = token_text
        self.wants_logprobs = logprobs
        self.echoed = echoed

    def add(self, delta: TextDelta) -> tuple[str | None, LoggedToken | None]:
        """Record a delta; return its OpenAI finish reason if it ends its choice, and its logged token."""
        choice = self.choices[delta.index]
        logged = None
        if delta.logprob is not None and delta.token_id is not None:
            logged = LoggedToken(delta.token_id, delta.logprob, len(self.prefixes[delta.index]) + choice.logged_chars)
            choice.logged.append(logged)
            choice.logged_chars += len(self.token_text(delta.token_id))
        choice.text += delta.text
        choice.tokens = delta.tokens
        if delta.finish_reason is not None:
            choice.finish_reason = FINISH_REASONS.get(delta.finish_reason, "length")
        return choice.finish_reason, logged

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name}

    def usage(self) -> dict[str, int]:
        """The prompt counts once whatever ``n``; each choice's tokens up to where it ended (its stop included)."""
        completion = sum(choice.tokens for choice in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _logprobs(self, tokens: list[LoggedToken]) -> Any:
        return self.api.logprobs(tokens, self.token_text) if self.wants_logprobs else None

    def body(self) -> dict[str, Any]:
        echoed = self.echoed() if self.echoed is not None else []
        choices = [self.api.choice(i, c.text, c.finish_reason, self._logprobs(echoed + c.logged))
                   for i, c in enumerate(self.choices)]
        return {**self.head(self.api.object_name), "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head(self.api.chunk_object_name), "choices": choices}

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> dict[str, Any]:
        async with aclosing(deltas):
            async for delta in deltas:
                self.add(delta)
        return self.body()

    async def chunks(self, deltas: AsyncIterator[TextDelta], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        # An echoed prompt with log-probabilities waits for the first token: the engine scores the prompt first.
        if self.echoed is None and (first := self.api.first_chunks(self.prefixes)):
            yield self.chunk(first)
        async with aclosing(deltas):
            async for delta in deltas:
                if self.echoed is not None:
                    yield self.chunk(self.api.first_chunks(self.prefixes, self._logprobs(self.echoed())))
                    self.echoed = None
                finish_reason, logged = self.add(delta)
                if delta.text or delta.finish_reason is not None or logged is not None:
                    logprobs = self._logprobs([logged]) if logged is not None else None
                    yield self.chunk([self.api.chunk_choice(delta.index, delta.text, finish_reason, logprobs)])
        if include_usage:
            yield {**self.chunk([]), "usage": self.usage()}


def echoed_tokens(prompt_ids: tuple[int, ...], logprobs: tuple[TokenLogprob | None, ...] | None,
                  token_text: TokenText) -> list[LoggedToken]:
    """An echoed prompt's tokens with their log-probabilities and text offsets (the lengths of the tokens' own
    texts, ``token_text``, as the generated tokens' offsets count them from the end of the echoed prompt)."""
    logged, offset = [], 0
    for token_id, logprob in zip(prompt_ids, logprobs or ()):
        logged.append(LoggedToken(token_id, logprob, offset))
        offset += len(token_text(token_id))
    return logged
