"""Tool calling on the OpenAI routes, through the grammar that structured output uses.

Falcon-instruct was never trained on tools, so the tools are described to it in its own conversation format (the
system turn says which functions there are, with their JSON schemas, and how to call them: a JSON list of
``{"name": ..., "arguments": {...}}``), and the grammar makes the answer keep to that form:

- ``tool_choice: "required"`` or a named function: the answer must be such a list (of the named function's calls
  only), each call's ``arguments`` matching that function's ``parameters`` schema; with
  ``parallel_tool_calls: false`` a list of one (else of at most ``MAX_PARALLEL_CALLS``);
- ``"auto"`` (the default when tools are given): either that list or free text that does not begin with ``[``
  (TGI lets the model choose as well, through a ``no_tool`` function): the model decides;
- ``"none"``: the tools are neither described nor callable.

An answer that is such a list comes back in OpenAI's shape, ``message.tool_calls`` (``id``, ``type``,
``function.name``, ``function.arguments`` as a JSON string) with ``finish_reason: "tool_calls"``, streamed as one
``delta.tool_calls`` once the list is complete. An assistant turn's ``tool_calls`` sent back are rendered as the
same list, and a ``role: "tool"`` result as a ``Tool:`` turn.

An arguments object that lists its ``properties`` and says nothing of others takes only those (as vLLM's default
grammar backend and OpenAI's strict function calling do): JSON Schema would allow any other key, and a model that
writes one writes invented names until it runs out of tokens. Clients strip ``additionalProperties: false`` before
sending (LiteLLM does), so the answer cannot depend on it being there. A schema that states ``additionalProperties``,
``patternProperties``, ``unevaluatedProperties`` or ``allOf`` keeps its own word.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import Field

from ...engine.sampling.grammar import json_schema_grammar, lark_grammar
from ...errors import InvalidRequest
from .wire import WireModel

NO_WHITESPACE = {"whitespace_flexible": False}  # a weak model would write spaces forever
MAX_PARALLEL_CALLS = 8  # calls in one answer: a weak model may otherwise add calls until it runs out of tokens


class FunctionDefinition(WireModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # the parameters' schema is always enforced exactly


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(WireModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


def callable_tools(tools: list[Tool], choice: ToolChoice | None) -> tuple[list[Tool], bool]:
    """The tools the model may call under ``choice`` (None: ``auto`` when there are tools), and whether it must
    call one. Raises ``InvalidRequest`` for a choice that names no given tool, or ``required`` with none."""
    choice = choice if choice is not None else "auto"
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            raise InvalidRequest(f"tool_choice: names the function {choice.function.name!r}, which is not one of "
                                 "tools", param="tool_choice")
        return named, True
    if choice == "required" and not tools:
        raise InvalidRequest('tool_choice: "required" needs tools', param="tool_choice")
    return ([] if choice == "none" else list(tools)), choice == "required"


def describe_tools(tools: list[Tool]) -> str:
    """The system turn's description of the tools, in Falcon-instruct's plain-text format."""
    lines = ["You can call these functions:"]
    for tool in tools:
        function = tool.function
        described = {"name": function.name, "parameters": function.parameters}
        if function.description:
            described["description"] = function.description
        lines.append(_compact(described))
    lines.append('To call functions, answer with only a JSON list of calls: [{"name": <function name>, '
                 '"arguments": {<its arguments>}}]')
    return "\n".join(lines)


_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
# Values, and schemas whose closing would not narrow the answer: an allOf's branches (each would refuse the keys the
# others add), a negation's and a condition's (closing them would let more through, or pick the other branch).
_NOT_SCHEMAS = ("allOf", "not", "if", "const", "enum", "default", "examples")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that lists ``properties`` and states nothing of other keys closed to them
    (``additionalProperties: false``), through nested properties, items, alternatives and definitions. An ``allOf``
    and the object beside it are left open: closing either would refuse the keys that the other adds."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            closed[key] = {name: closed_objects(named) for name, named in value.items()}
        else:
            closed[key] = value if key in _NOT_SCHEMAS else closed_objects(value)
    left_open = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf"} & schema.keys()
    if isinstance(schema.get("properties"), dict) and not left_open:
        closed["additionalProperties"] = False
    return closed


def calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of the answer that calls functions: a list of calls of ``tools`` (of one unless
    ``parallel``), their arguments' objects closed (``closed_objects``)."""
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                                "arguments": closed_objects(tool.function.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    return {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def tools_grammar(tools: list[Tool], required: bool, parallel: bool) -> str:
    """The grammar of an answer that must call (``required``) or may call one of ``tools``; raises
    ``InvalidRequest`` naming ``tools`` when a parameters schema cannot be compiled."""
    schema = calls_schema(tools, parallel)
    try:
        if required:
            return json_schema_grammar(schema)
        # Free text may begin with anything but "[", which begins the calls.
        return lark_grammar(f'start: calls | text\ncalls: %json {json.dumps({"x-guidance": NO_WHITESPACE, **schema})}'
                            '\ntext: /[^\\[][^\\x00]*/ | ""\n')
    except ValueError as exc:
        raise InvalidRequest(f"tools: a function's parameters cannot be compiled: {exc}", param="tools") from None


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI's ``tool_calls`` for an answer that is a complete list of calls (None: it is text, or was cut off
    before the list was complete)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": _compact(call.get("arguments", {}))}} for call in calls]


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def calls_text(calls: list[ToolCall]) -> str:
    """An assistant's earlier calls, sent back, as the text it would have written for them."""
    return _compact([{"name": call.function.name, "arguments": _arguments(call.function.arguments)}
                     for call in calls])


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # sent back as the client has it
