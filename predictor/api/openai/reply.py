"""The OpenAI answers: a completion or chat completion put together from text deltas, whole or as chunks.

``CompletionsApi`` and ``ChatCompletionsApi`` hold what differs between the two (object names, how a choice and its
log-probabilities look); ``Reply`` collects one answer's choices, finish reasons, token counts and log-probabilities.
A completions request may hold several prompts (``ReplyPrompt``): choice ``index`` is prompt x ``n`` + sequence, in
OpenAI's order, and ``usage`` sums over the prompts. With tools (``tools``), a choice whose text is a list of calls
is answered as ``tool_calls``: streamed, its text is held back from its first ``[`` and sent as one
``delta.tool_calls`` when it ends.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ...engine.sampling.sampler import TokenLogprob
from ..streaming import TextDelta
from ..tracing import random_hex_id
from .tools import parse_tool_calls

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

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any,
                     tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self.choice(index, text, finish_reason, logprobs)

    def first_chunks(self, prefixes: dict[int, str], logprobs: Any = None) -> list[dict[str, Any]]:
        """What a stream starts with: an echoed prompt per choice index (with its tokens' log-probabilities if
        asked)."""
        return [self.choice(i, prefix, None, logprobs) for i, prefix in prefixes.items() if prefix]

    def logprobs(self, tokens: list[LoggedToken], token_text: TokenText) -> dict[str, Any]:
        """The legacy completions shape: parallel lists (``null`` for an echoed prompt's first token)."""
        return {"tokens": [token_text(t.token_id) for t in tokens],
                "token_logprobs": [t.logprob.logprob if t.logprob else None for t in tokens],
                "top_logprobs": [{token_text(i): value for i, value in t.logprob.top} if t.logprob else None
                                 for t in tokens],
                "text_offset": [t.text_offset for t in tokens]}


class ChatCompletionsApi(CompletionsApi):
    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if tool_calls:
            return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
                    "logprobs": logprobs, "finish_reason": "tool_calls"}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any,
                     tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if tool_calls:
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": "tool_calls"}
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def first_chunks(self, prefixes: dict[int, str], logprobs: Any = None) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in prefixes]

    def logprobs(self, tokens: list[LoggedToken], token_text: TokenText) -> dict[str, Any]:
        def entry(token_id: int, value: float) -> dict[str, Any]:
            text = token_text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token_id, t.logprob.logprob),
                             "top_logprobs": [entry(i, value) for i, value in t.logprob.top]} for t in tokens],
                "refusal": None}


@dataclass(frozen=True)
class ReplyPrompt:
    """One prompt of a request, as its answer needs it."""

    tokens: int  # its token count, for usage
    prefix: str = ""  # the text in front of each of its choices: the prompt when echoed
    # for an echoed prompt with log-probabilities: its logged tokens, once the engine has them (the ticket's, set
    # before its first token event)
    echoed: Callable[[], list[LoggedToken]] | None = None
    cached: Callable[[], int] = lambda: 0  # its tokens taken from the prefix cache, once the request has started


@dataclass
class _Choice:
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    logged: list[LoggedToken] = field(default_factory=list)
    logged_chars: int = 0  # the logged tokens' text so far, from the end of the echoed prompt
    sent: int = 0  # characters of text streamed so far (tools: the rest may be held back)
    tool_calls: list[dict[str, Any]] | None = None  # parsed from the text when it ended (tools)


class Reply:
    """One answer being put together: its id, each choice's text so far, finish reason, token count and (when
    asked) log-probabilities. Choice ``i`` answers prompt ``i // n``."""

    def __init__(self, api: CompletionsApi, model_name: str, prompts: list[ReplyPrompt], n: int,
                 token_text: TokenText, logprobs: bool, tools: bool = False) -> None:
        self.api = api
        self.id = f"{api.id_prefix}{random_hex_id()}"
        self.created = int(time.time())
        self.model_name = model_name
        self.prompts = prompts
        self.n = n
        self.choices = [_Choice(prompt.prefix, sent=len(prompt.prefix)) for prompt in prompts for _ in range(n)]
        self.token_text = token_text
        self.wants_logprobs = logprobs
        self.tools = tools  # the model may answer with a list of tool calls

    def prompt_of(self, index: int) -> ReplyPrompt:
        return self.prompts[index // self.n]

    def add(self, delta: TextDelta) -> tuple[str | None, LoggedToken | None]:
        """Record a delta (its ``index`` the choice's); return its OpenAI finish reason if it ends its choice, and
        its logged token."""
        choice = self.choices[delta.index]
        logged = None
        if delta.logprob is not None and delta.token_id is not None:
            offset = len(self.prompt_of(delta.index).prefix) + choice.logged_chars
            logged = LoggedToken(delta.token_id, delta.logprob, offset)
            choice.logged.append(logged)
            choice.logged_chars += len(self.token_text(delta.token_id))
        choice.text += delta.text
        choice.tokens = delta.tokens
        if delta.finish_reason is not None:
            choice.finish_reason = FINISH_REASONS.get(delta.finish_reason, "length")
            if self.tools:
                choice.tool_calls = parse_tool_calls(choice.text)
        return choice.finish_reason, logged

    def _held(self, choice: _Choice) -> bool:
        """Whether a choice's text is held back: with tools, until it is known not to be a list of calls."""
        begun = choice.text.lstrip()
        return self.tools and (not begun or begun.startswith("["))

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name}

    def usage(self) -> dict[str, Any]:
        """Each prompt counts once whatever ``n``; each choice's tokens up to where it ended (its stop included);
        ``cached_tokens``: the prompts' tokens the prefix cache held."""
        prompt = sum(prompt.tokens for prompt in self.prompts)
        completion = sum(choice.tokens for choice in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(prompt.cached() for prompt in self.prompts)}}

    def _logprobs(self, tokens: list[LoggedToken]) -> Any:
        return self.api.logprobs(tokens, self.token_text) if self.wants_logprobs else None

    def _echoed(self, prompt: ReplyPrompt) -> list[LoggedToken]:
        return prompt.echoed() if prompt.echoed is not None else []

    def body(self) -> dict[str, Any]:
        choices = [self.api.choice(i, c.text, c.finish_reason,
                                   self._logprobs(self._echoed(self.prompt_of(i)) + c.logged), c.tool_calls)
                   for i, c in enumerate(self.choices)]
        return {**self.head(self.api.object_name), "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head(self.api.chunk_object_name), "choices": choices}

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> dict[str, Any]:
        async with aclosing(deltas):
            async for delta in deltas:
                self.add(delta)
        return self.body()

    def _first_chunks(self, prompt_indexes: list[int], logprobs: Any = None) -> list[dict[str, Any]]:
        return self.api.first_chunks({p * self.n + i: self.prompts[p].prefix
                                      for p in prompt_indexes for i in range(self.n)}, logprobs)

    async def chunks(self, deltas: AsyncIterator[TextDelta], include_usage: bool,
                     continuous_usage: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The stream's chunks, then (``include_usage``) one with no choices and the usage; ``continuous_usage``
        (vLLM's ``continuous_usage_stats``) puts the usage so far on every chunk too."""
        async for chunk in self._chunks(deltas):
            yield {**chunk, "usage": self.usage()} if continuous_usage else chunk
        if include_usage:
            yield {**self.chunk([]), "usage": self.usage()}

    async def _chunks(self, deltas: AsyncIterator[TextDelta]) -> AsyncIterator[dict[str, Any]]:
        # An echoed prompt with log-probabilities waits for its first token: the engine scores the prompt first.
        waiting = {p for p, prompt in enumerate(self.prompts) if prompt.echoed is not None}
        if first := self._first_chunks([p for p in range(len(self.prompts)) if p not in waiting]):
            yield self.chunk(first)
        async with aclosing(deltas):
            async for delta in deltas:
                if (p := delta.index // self.n) in waiting:
                    waiting.discard(p)
                    yield self.chunk(self._first_chunks([p], self._logprobs(self._echoed(self.prompts[p]))))
                finish_reason, logged = self.add(delta)
                choice = self.choices[delta.index]
                if self._held(choice) and finish_reason is None:
                    continue
                text, choice.sent = choice.text[choice.sent:], len(choice.text)
                if text or delta.finish_reason is not None or logged is not None:
                    logprobs = self._logprobs([logged]) if logged is not None else None
                    yield self.chunk([self.api.chunk_choice(delta.index, text, finish_reason, logprobs,
                                                            choice.tool_calls)])


def echoed_tokens(prompt_ids: tuple[int, ...], logprobs: tuple[TokenLogprob | None, ...] | None,
                  token_text: TokenText) -> list[LoggedToken]:
    """An echoed prompt's tokens with their log-probabilities and text offsets (the lengths of the tokens' own
    texts, ``token_text``, as the generated tokens' offsets count them from the end of the echoed prompt)."""
    logged, offset = [], 0
    for token_id, logprob in zip(prompt_ids, logprobs or ()):
        logged.append(LoggedToken(token_id, logprob, offset))
        offset += len(token_text(token_id))
    return logged
