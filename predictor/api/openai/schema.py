"""The OpenAI wire format: completions and chat-completions requests as this server accepts them.

Pydantic lives here for the OpenAI routes as ``chat.schema`` holds it for /chat. ``parse_openai_request`` turns a
decoded JSON body into a request or raises an ``InvalidRequest`` naming the field at fault as OpenAI does
(``messages[0].content``); a field this server refuses (``REFUSED``: ``best_of``, ``audio``...) is named with the
reason. Tools and tool messages are described in ``tools``. vLLM's ``/tokenize`` and ``/detokenize`` bodies are
here too.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...errors import InvalidRequest, UnknownParameter
from .tools import Tool, ToolCall, ToolChoice, callable_tools, calls_text, describe_tools
from .wire import STRICT, WireModel

# OpenAI allows 4; vLLM sets no limit, and lm-eval sends each task's whole ``until`` list. The bound keeps the stop
# matching that runs on every streamed piece cheap.
MAX_STOP_SEQUENCES = 64
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it
# Options the engine cannot honour, with the values that ask for nothing (clients often send those explicitly).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {"best_of": (1,), "suffix": ("",), "use_beam_search": (False,)}
# Fields OpenAI or vLLM know that this server refuses, and why: named in the 400 rather than "not supported".
REFUSED = {
    "best_of": "best_of (several completions ranked server-side) is not supported: ask for n and choose",
    "suffix": "suffix (insertion) is not supported by Falcon",
    "use_beam_search": "beam search is not offered on the OpenAI routes: use POST /chat with num_beams",
    "functions": "functions (OpenAI's deprecated function calling) are not supported: send tools",
    "function_call": "function_call (OpenAI's deprecated function calling) is not supported: send tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported", "prediction": "predicted outputs are not supported",
    "reasoning_effort": "Falcon is not a reasoning model", "web_search_options": "web search is not supported",
}
_STRICT = STRICT


class StreamOptions(WireModel):
    include_usage: bool = False  # a last chunk, with no choices, carries the usage
    continuous_usage_stats: bool = Field(False, description="vLLM's extension: with include_usage, every chunk "
                                                            "carries the usage so far")


class JsonSchemaFormat(WireModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly


class ResponseFormat(WireModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationFields(WireModel):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="vLLM's extension; 0 keeps every token")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's extension; 0 is off")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="vLLM's extension (transformers' meaning)")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] = Field(default_factory=dict, description="token id -> bias in [-100, 100]")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: tokens before eos or a stop token may end it")
    stop_token_ids: list[int] = Field(default_factory=list, description="vLLM's extension: ids that end a choice")
    ignore_eos: bool = Field(False, description="vLLM's extension: go on past eos")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's extension: logprobs name tokens "
                                                                '"token_id:<id>" rather than by their text')
    include_stop_str_in_output: bool = Field(False, description="vLLM's extension: the stop string that ended a "
                                                                "choice stays at the end of its text")
    skip_special_tokens: bool = Field(True, description="vLLM's extension: false writes special tokens (eos) "
                                                        "into the text")
    add_special_tokens: bool = Field(False, description="vLLM's extension: the tokenizer's special tokens (a "
                                                        "BOS) around the prompt; Falcon's tokenizer adds none")
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end-user id for abuse monitoring: accepted, not used

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, value: dict[str, float]) -> dict[str, float]:
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, as strings (got {key[:20]!r})")
            if abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (got {bias:g})")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not stop for stop in stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, none of them empty")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def asked_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def echo_prompt(self) -> bool:
        return False

    def tool_mode(self) -> tuple[list[Tool], bool]:
        """The tools the model may call, and whether it must call one (chat completions' ``tools``)."""
        return [], False

    @abstractmethod
    def logprobs_asked(self) -> tuple[bool, int]:
        """Whether each token's log-probability is wanted, and how many top alternatives with it."""


class CompletionRequest(GenerationFields):
    prompt_param: ClassVar[str] = "prompt"

    # OpenAI's four shapes: a string, a list of strings, a list of token ids, a list of lists of token ids
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="the top alternatives to each token's logprob")
    echo: bool = Field(False, description="the prompt in front of the completion")

    @property
    def echo_prompt(self) -> bool:
        return self.echo

    def logprobs_asked(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    def prompts(self) -> list[tuple[str, str | list[int]]]:
        """Each prompt, a text or token ids, with the name an error about it gives (``prompt``, ``prompt[1]``);
        raise ``InvalidRequest`` naming an empty one."""
        prompt = self.prompt
        single = isinstance(prompt, str) or bool(prompt) and isinstance(prompt[0], int)
        prompts = [prompt] if single else prompt
        if not prompts:
            raise InvalidRequest("prompt: an empty list holds no prompt; send a string, a list of strings, a list "
                                 "of token ids or a list of lists of token ids", param="prompt")
        for i, one in enumerate(prompts):
            param = "prompt" if single else f"prompt[{i}]"
            if not one:
                raise InvalidRequest(f"{param}: a prompt must not be empty", param=param)
            if isinstance(one, str) and "\x00" in one:
                raise InvalidRequest(f"{param}: a prompt must not hold NUL characters", param=param)
        return [("prompt" if single else f"prompt[{i}]", one) for i, one in enumerate(prompts)]


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart] | None = None  # None only for an assistant's turn that called tools
    name: str | None = None  # a participant's name: accepted, not rendered (Falcon's format has no names)
    tool_calls: list[ToolCall] = Field(default_factory=list)  # an assistant's calls, sent back
    tool_call_id: str | None = None  # the call a tool's result answers: accepted, not rendered

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant's message with tool_calls may leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant's message has tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)

    def to_turn(self) -> dict[str, str]:
        """The message as a turn of the conversation format (an assistant's calls as the list it wrote)."""
        text = self.text()
        if self.tool_calls:
            text = f"{text}\n{calls_text(self.tool_calls)}" if text else calls_text(self.tool_calls)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationFields):
    prompt_param: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    tools: list[Tool] = Field(default_factory=list, max_length=128)
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True  # false: at most one call per answer

    def logprobs_asked(self) -> tuple[bool, int]:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return self.logprobs, self.top_logprobs

    @property
    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_mode(self) -> tuple[list[Tool], bool]:
        return callable_tools(self.tools, self.tool_choice)

    def turns(self) -> list[dict[str, str]]:
        """The conversation's turns, the callable tools described in the system turn (one is added if needed)."""
        turns = [message.to_turn() for message in self.messages]
        tools, _ = self.tool_mode()
        if tools:
            described = describe_tools(tools)
            if turns[0]["role"] == "system":
                turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{described}"}
            else:
                turns.insert(0, {"role": "system", "content": described})
        return turns


R = TypeVar("R", bound=BaseModel)


def parse_openai_request(body: Any, request_type: type[R]) -> R:
    """Validate a decoded JSON body; raise ``InvalidRequest`` naming the first field at fault. ``null`` means the
    field's default, as OpenAI's clients send it. A request type may name its own ``refused_fields`` and
    ``neutral_values`` (the Responses API's differ)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    refused = getattr(request_type, "refused_fields", REFUSED)
    for name, neutral in getattr(request_type, "neutral_values", NEUTRAL_VALUES).items():
        if name in body and _is_neutral(body[name], neutral):
            del body[name]
    for name in body:
        if name in refused:
            raise UnknownParameter(f"{name}: {refused[name]}", param=name)
    try:
        return request_type.model_validate(body)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    """The first field at fault, named as OpenAI does (``messages[0].content``). A field that may take several
    forms (a string or a list) fails once per form: its name is what those errors' locations share."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    same_field = [error for error in errors if error["loc"][:1] == first["loc"][:1]]
    loc = os.path.commonprefix([error["loc"] for error in same_field])
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "extra_forbidden":
        return UnknownParameter(f"{param} is not supported by this server", param=param)
    reasons = list(dict.fromkeys(error["msg"] for error in same_field))
    return InvalidRequest(f"{param}: {'; or '.join(reasons[:3])}", param=param)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


class TokenizeRequest(WireModel):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered in the conversation format."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(WireModel):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
