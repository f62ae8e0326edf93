"""Falcon-instruct's conversation format, as a chat template the tokenizer applies.

The instruct models take plain-text turns. The Falcon /chat service this project replaces wrote a conversation as
an optional system message first, then each turn after a blank line as ``User: ...`` or ``Assistant: ...``, ending
with ``Assistant:`` when the model is to answer::

    You are a helpful assistant.

    User: Hello!

    Assistant: Hi. How can I help?

    User: Tell me a joke.

    Assistant:

A function's result, sent back after an assistant called tools (``openai.tools``), is a ``Tool: ...`` turn.
``FALCON_CHAT_TEMPLATE`` writes exactly that, and ``render_chat`` applies it with the tokenizer's own
``apply_chat_template`` (sandboxed Jinja). The project's template is used even when a checkpoint carries one, so a
conversation reads the same on every Falcon variant and ``CHAT_STOP`` matches it. Generation for a chat stops at
``CHAT_STOP`` as well as at eos: without it the model goes on to write the user's next turn itself.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from ..errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")  # tool: a function's result (OpenAI's tool calling)
CHAT_STOP = "\nUser:"

FALCON_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{%- if message['role'] == 'user' %}{{ 'User: ' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}"
    "{%- elif message['role'] == 'tool' %}{{ 'Tool: ' }}{% endif -%}"
    "{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ 'Assistant:' }}{% endif -%}"
)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True) -> str:
    """The prompt for ``messages`` (each with ``role`` and ``content``), ending with the generation prompt unless
    ``add_generation_prompt`` is false."""
    check_messages(messages)
    return tokenizer.apply_chat_template([dict(m) for m in messages], chat_template=FALCON_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise ``InvalidRequest`` unless there is at least one turn and a system message, if any, comes first."""
    if not messages:
        raise InvalidRequest("messages must hold at least one message", param="messages")
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}",
                                 param=f"messages[{i}].role")
        if role == "system" and i > 0:
            raise InvalidRequest(f"messages[{i}]: a system message may only come first", param=f"messages[{i}].role")
    if all(message["role"] == "system" for message in messages):
        raise InvalidRequest("messages holds only a system message: add a user message", param="messages")
