"""Falcon-instruct's conversation format: the exact text the chat template renders, and the messages it refuses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from predictor.api.chat_format import CHAT_STOP, render_chat
from predictor.errors import InvalidRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_system_message_then_turns_then_the_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert render_chat(tokenizer, messages) == (
        "You are a helpful assistant.\n\nUser: Hello!\n\nAssistant: Hi. How can I help?\n\nUser: Tell me a joke."
        "\n\nAssistant:")


def test_without_a_system_message_the_first_turn_starts_the_prompt(tokenizer):
    assert render_chat(tokenizer, [{"role": "user", "content": "Hi"}]) == "User: Hi\n\nAssistant:"


def test_content_is_kept_as_written(tokenizer):
    content = "  two\nlines {{ not a template }} <|endoftext|> "
    assert render_chat(tokenizer, [{"role": "user", "content": content}]) == f"User: {content}\n\nAssistant:"


def test_the_stop_string_matches_where_the_next_user_turn_would_begin(tokenizer):
    two_turns = render_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}])
    answer = two_turns.split("Assistant: ", 1)[1]
    assert answer.index(CHAT_STOP) == len("b\n")


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "system", "content": "only rules"}], "messages"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "messages[1].role"),
    ([{"role": "function", "content": "a"}], "messages[0].role"),
])
def test_messages_that_make_no_conversation_are_refused(tokenizer, messages, param):
    with pytest.raises(InvalidRequest) as caught:
        render_chat(tokenizer, messages)
    assert caught.value.param == param
