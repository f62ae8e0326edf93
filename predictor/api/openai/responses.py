"""OpenAI's Responses API (``POST /v1/responses``) as this server accepts it, and its mapping onto generation.

``input`` is a string (one user message) or a list of messages (``system``, ``developer``, ``user``, ``assistant``;
content a string or ``input_text``/``output_text`` parts); ``instructions`` is a system message in front of them.
The conversation is rendered in Falcon-instruct's format and answered as chat completions answer it (stopping at
the next ``User:`` turn). ``max_output_tokens``, ``temperature`` (0 is greedy) and ``top_p`` map as chat's
``max_completion_tokens``, ``temperature`` and ``top_p`` do; ``text.format`` (``json_schema``, ``json_object``) is
enforced by the grammar that chat's ``response_format`` uses.

Tools (``tools`` as the Responses API writes them, flat: ``{"type": "function", "name", "parameters"}``;
``tool_choice``; ``parallel_tool_calls``) work as on chat completions (``openai.tools``): an answer that is a list of
calls becomes ``function_call`` output items, and ``function_call`` / ``function_call_output`` input items sent back
are rendered as the assistant's calls and ``Tool:`` turns. With tools, a streamed answer's events come once the answer
is complete (it is not known to be text or calls before).

Not served, and refused by name: stored responses (``store: true``, ``previous_response_id``,
``conversation``: every response is answered and forgotten), reasoning, background runs, reusable prompts, extra
``include`` data, ``truncation: "auto"``. The values that ask for none of these (``tools: []``, ``store: false``...)
are accepted, as clients often send them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...engine.options import GenerationJob, GenerationOptions, Limits, ModelInfo
from .tools import (
    CalledFunction,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    Tool,
    ToolCall,
    callable_tools,
    calls_text,
    describe_tools,
    tools_grammar,
)
from ...errors import InvalidRequest
from ..chat_format import CHAT_STOP
from ..generation import pad_token_id, samples
from .mapping import format_grammar, resolve_max_tokens

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_NOT_STORED = "responses are not stored here: send the whole conversation as input"
REFUSED = {
    "max_tool_calls": "max_tool_calls is not supported: set parallel_tool_calls false for one call",
    "previous_response_id": _NOT_STORED, "conversation": _NOT_STORED, "store": _NOT_STORED,
    "background": "background responses are not supported (they need stored responses)",
    "reasoning": "Falcon is not a reasoning model",
    "prompt": "reusable prompts are stored on OpenAI's platform: send instructions and input instead",
    "include": "no extra output data (reasoning, search results, logprobs) is available",
    "truncation": 'only "disabled" is supported: an input longer than the context is a 400',
    "top_logprobs": "log-probabilities are not returned on the Responses API: use chat completions",
}
NEUTRAL = {"store": (False,), "background": (False,), "include": ([],), "truncation": ("disabled",),
           "top_logprobs": (0,)}
INPUT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class InputText(BaseModel):
    """A text part of a message: ``input_text``, or ``output_text`` in an earlier answer sent back."""

    model_config = _STRICT

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's, sent back with it: ignored
    logprobs: list[Any] | None = None


class InputMessage(BaseModel):
    model_config = _STRICT

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None  # an earlier answer's, sent back with it: ignored
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class TextFormat(BaseModel):
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "name",
    "schema"}``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(BaseModel):
    model_config = _STRICT

    format: TextFormat = TextFormat(type="text")


class ResponsesStreamOptions(BaseModel):
    model_config = _STRICT

    include_obfuscation: bool = False  # padding against side channels over the network: none is added


class FunctionTool(BaseModel):
    """A tool as the Responses API writes it: the function's fields beside ``type``."""

    model_config = _STRICT

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    def to_tool(self) -> Tool:
        return Tool(type="function", function=FunctionDefinition(name=self.name, description=self.description,
                                                                 parameters=self.parameters))


class FunctionChoice(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    name: str


class FunctionCallItem(BaseModel):
    """An earlier answer's call, sent back."""

    model_config = _STRICT

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(BaseModel):
    """A call's result."""

    model_config = _STRICT

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ResponsesRequest(BaseModel):
    refused_fields: ClassVar[dict[str, str]] = REFUSED
    neutral_values: ClassVar[dict[str, tuple[Any, ...]]] = NEUTRAL

    model_config = _STRICT

    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutput]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    text: TextConfig = TextConfig()
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    tools: list[FunctionTool] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True  # false: at most one call per answer
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)  # returned with the response
    user: str | None = None  # end-user ids for abuse monitoring and caching: accepted, not used
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: ``instructions`` first as the system message (joined with a system
        or developer message that opens ``input``). Raises ``InvalidRequest`` naming the input at fault."""
        if isinstance(self.input, str):
            if not self.input:
                raise InvalidRequest("input: must not be empty", param="input")
            messages = [{"role": "user", "content": self.input}]
        else:
            messages = _turns(self.input)
        for i, message in enumerate(messages):
            if message["role"] == "system" and i > 0:
                raise InvalidRequest(f"input[{i}]: a system or developer message may only come first",
                                     param=f"input[{i}].role")
        if all(message["role"] == "system" for message in messages):
            raise InvalidRequest("input: holds no user message", param="input")
        tools, _ = self.tool_mode()
        system = "\n\n".join(text for text in (self.instructions, describe_tools(tools) if tools else "") if text)
        if system:
            if messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": f"{system}\n\n{messages[0]['content']}"}
            else:
                messages.insert(0, {"role": "system", "content": system})
        return messages

    def tool_mode(self) -> tuple[list[Tool], bool]:
        """The tools the model may call, and whether it must call one."""
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
        return callable_tools([tool.to_tool() for tool in self.tools], choice)


def _turns(items: list[InputMessage | FunctionCallItem | FunctionCallOutput]) -> list[dict[str, str]]:
    """Input items as conversation turns: consecutive function calls as one assistant turn of calls, a call's
    output as a tool turn."""
    turns: list[dict[str, str]] = []
    calls: list[ToolCall] = []
    for item in [*items, None]:
        if isinstance(item, FunctionCallItem):
            calls.append(ToolCall(id=item.call_id, function=CalledFunction(name=item.name, arguments=item.arguments)))
            continue
        if calls:
            turns.append({"role": "assistant", "content": calls_text(calls)})
            calls = []
        if isinstance(item, FunctionCallOutput):
            turns.append({"role": "tool", "content": item.output})
        elif item is not None:
            turns.append({"role": INPUT_ROLES[item.role], "content": item.text()})
    return turns


def check_input_items(body: Any) -> None:
    """Name an input item that is not a message (a function call's output, a reasoning item...) before validation,
    whose error would only say that ``type`` should be ``"message"``."""
    items = body.get("input") if isinstance(body, dict) else None
    for i, item in enumerate(items if isinstance(items, list) else []):
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind not in ("message", "function_call", "function_call_output"):
            raise InvalidRequest(f"input[{i}]: items of type {kind!r} are not supported: only messages and function "
                                 "calls with their outputs (no reasoning or files)", param=f"input[{i}].type")


def to_generation_job(request: ResponsesRequest, prompt: str, prompt_ids: list[int], model: ModelInfo,
                      limits: Limits) -> GenerationJob:
    """Map a validated Responses request and its rendered conversation onto a ``GenerationJob`` that answers as
    the assistant, up to the next ``User:`` turn."""
    max_new = resolve_max_tokens(request.max_output_tokens, len(prompt_ids), limits, "input", "max_output_tokens")
    do_sample = samples(True, request.temperature)
    eos = () if model.eos_token_id is None else (model.eos_token_id,)
    options = GenerationOptions(
        max_new_tokens=max_new, do_sample=do_sample, temperature=request.temperature if do_sample else 1.0,
        top_p=request.top_p if do_sample else 1.0, eos_token_ids=eos, pad_token_id=pad_token_id(None, eos, model),
        stop_strings=(CHAT_STOP,), grammar=_grammar(request),
    )
    return GenerationJob(prompt_ids=tuple(prompt_ids), options=options, prompt=prompt, return_full_text=False,
                         stop_texts=(CHAT_STOP,))


def _grammar(request: ResponsesRequest) -> str | None:
    """The tool calls' grammar (``tools``), or ``text.format``'s."""
    text_format = request.text.format
    tools, required = request.tool_mode()
    if not tools:
        return format_grammar(text_format.type, text_format.json_schema, "text.format", 'a "schema" (and a "name")')
    if text_format.type != "text":
        raise InvalidRequest('text.format: cannot be combined with tools (unless tool_choice is "none")',
                             param="text.format")
    return tools_grammar(tools, required, request.parallel_tool_calls)
