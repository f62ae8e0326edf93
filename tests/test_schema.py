"""The /chat wire format: defaults, types, ranges and refusals, without a model."""

import pytest

from predictor.api.chat.schema import CODE_LOADING_OPTIONS, GenerateKwargs, parse_chat_request
from predictor.api.json_body import decode_json_body
from predictor.errors import InvalidRequest, MissingPrompt, UnknownParameter

KAITO_DEFAULTS = dict(max_length=200, min_length=0, do_sample=True, early_stopping=False, num_beams=1,
                      temperature=1.0, top_k=10, top_p=1, typical_p=1, repetition_penalty=1)


def test_defaults_are_those_of_the_falcon_chat_service():
    request = parse_chat_request({"prompt": "hi"})
    assert request.return_full_text is True
    assert request.clean_up_tokenization_spaces is False
    assert request.prefix is None and request.handle_long_generation is None
    for name, value in KAITO_DEFAULTS.items():
        assert getattr(request.generate_kwargs, name) == value, name


def test_the_full_contract_payload_parses():
    payload = {"prompt": "Tell me", "return_full_text": True, "clean_up_tokenization_spaces": False, "prefix": None,
               "handle_long_generation": None, "generate_kwargs": {
                   "max_length": 200, "min_length": 0, "do_sample": True, "early_stopping": False, "num_beams": 1,
                   "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 10, "top_p": 1,
                   "typical_p": 1, "repetition_penalty": 1, "length_penalty": 1, "no_repeat_ngram_size": 0,
                   "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1,
                   "output_scores": False, "return_dict_in_generate": False, "forced_bos_token_id": None,
                   "forced_eos_token_id": None, "remove_invalid_values": None, "pad_token_id": None,
                   "eos_token_id": None, "max_new_tokens": None, "min_new_tokens": None}}
    request = parse_chat_request(payload)
    assert set(payload["generate_kwargs"]) <= set(GenerateKwargs.model_fields)
    assert request.generate_kwargs.model_fields_set == set(payload["generate_kwargs"])


@pytest.mark.parametrize("body", [{}, {"prompt": ""}, {"prompt": None}, {"generate_kwargs": {}}])
def test_missing_prompt_has_the_message_clients_know(body):
    with pytest.raises(MissingPrompt) as caught:
        parse_chat_request(body)
    assert caught.value.message.startswith("Text generation parameter prompt required")
    assert "messages" in caught.value.message
    assert caught.value.status == 400


@pytest.mark.parametrize("kwargs, param", [
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"temperature": -0.1}, "temperature"), ({"typical_p": 0}, "typical_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"num_beams": 0}, "num_beams"),
    ({"max_length": "200"}, "max_length"), ({"do_sample": "yes"}, "do_sample"),
    ({"bad_words_ids": [1, 2]}, "bad_words_ids.0"), ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"num_return_sequences": 0}, "num_return_sequences"),
])
def test_out_of_range_options_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request({"prompt": "x", "generate_kwargs": kwargs})
    assert caught.value.param == f"generate_kwargs.{param}"
    assert f"generate_kwargs.{param}" in caught.value.message


def test_temperature_zero_is_valid():
    assert parse_chat_request({"prompt": "x", "generate_kwargs": {"temperature": 0}}).generate_kwargs.temperature == 0


@pytest.mark.parametrize("key", sorted(CODE_LOADING_OPTIONS))
def test_code_loading_options_are_refused(key):
    with pytest.raises(UnknownParameter) as caught:
        parse_chat_request({"prompt": "x", "generate_kwargs": {key: "anything"}})
    assert "never accepted" in caught.value.message and caught.value.param == f"generate_kwargs.{key}"


def test_unknown_options_are_named():
    with pytest.raises(UnknownParameter) as caught:
        parse_chat_request({"prompt": "x", "generate_kwargs": {"max_tokenz": 5}})
    assert "generate_kwargs.max_tokenz" in caught.value.message
    with pytest.raises(UnknownParameter) as caught:
        parse_chat_request({"prompt": "x", "modle": "other/model"})
    assert caught.value.param == "modle"


def test_model_names_an_adapter_and_is_checked_by_the_route():
    # The schema takes any name; whether it is served (the base or a LoRA adapter) is the route's 404.
    assert parse_chat_request({"prompt": "x", "model": "qkv"}).model == "qkv"


@pytest.mark.parametrize("body", [[1], "text", 5, None])
def test_non_object_bodies_are_refused(body):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_chat_request(body)


def test_nul_characters_are_refused():
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request({"prompt": "a\x00b"})
    assert caught.value.param == "prompt"


def test_handle_long_generation_takes_only_hole():
    assert parse_chat_request({"prompt": "x", "handle_long_generation": "hole"}).handle_long_generation == "hole"
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request({"prompt": "x", "handle_long_generation": "shift"})
    assert caught.value.param == "handle_long_generation"


def test_null_generate_kwargs_means_defaults():
    assert parse_chat_request({"prompt": "x", "generate_kwargs": None}).generate_kwargs.top_k == 10


@pytest.mark.parametrize("raw", [b"{", b'{"prompt": NaN}', b'{"prompt": Infinity}', b"\xff\xfe",
                                 b"[" * 5000 + b"]" * 5000])
def test_bodies_that_are_not_strict_json_are_client_errors(raw):
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        decode_json_body(raw)


def test_every_generation_config_option_is_decided_and_in_the_api_reference():
    """Each option of transformers' GenerationConfig is accepted, refused with a reason, or never accepted (it
    loads code or objects), and the API reference's table names it."""
    from pathlib import Path

    from transformers import GenerationConfig

    from predictor.api.chat.schema import REFUSED_OPTIONS

    reference = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    table = reference[reference.index("### transformers' generation options"):]
    for option in GenerationConfig().to_dict():
        decided = option in GenerateKwargs.model_fields or option in REFUSED_OPTIONS or option in CODE_LOADING_OPTIONS
        assert decided, option
        assert f"`{option}`" in table, option
    for option in REFUSED_OPTIONS:
        with pytest.raises(UnknownParameter) as caught:
            parse_chat_request({"prompt": "x", "generate_kwargs": {option: 1}})
        assert REFUSED_OPTIONS[option] in caught.value.message
