"""The mapping of a request onto generation options: precedence, normalisation and limits, without a model."""

import pytest

from predictor.api.chat.mapping import to_generation_job
from predictor.api.chat.schema import parse_chat_request
from predictor.engine.options import Limits, ModelInfo
from predictor.errors import ContextLengthExceeded, InvalidRequest

FALCON = ModelInfo(vocab_size=65024, eos_token_id=11)


def job_for(kwargs=None, prompt_len=5, model=FALCON, limits=Limits(), **fields):
    request = parse_chat_request({"prompt": "x", "generate_kwargs": kwargs or {}, **fields})
    return to_generation_job(request, list(range(100, 100 + prompt_len)), model, limits)


def test_defaults_sample_with_top_k_10_up_to_max_length_200():
    options = job_for(prompt_len=5).options
    assert options.do_sample and options.top_k == 10 and options.temperature == 1.0
    assert options.max_new_tokens == 195  # max_length counts the prompt
    assert options.eos_token_ids == (11,) and options.pad_token_id == 11  # Falcon has no pad token: eos pads


def test_max_new_tokens_wins_over_max_length():
    assert job_for({"max_length": 50, "max_new_tokens": 7}).options.max_new_tokens == 7


def test_min_length_counts_the_prompt_and_min_new_tokens_wins():
    assert job_for({"min_length": 12}, prompt_len=5).options.min_new_tokens == 7
    assert job_for({"min_length": 12, "min_new_tokens": 2}).options.min_new_tokens == 2


def test_min_above_max_is_refused():
    with pytest.raises(InvalidRequest, match="min_length must not exceed max_length"):
        job_for({"max_length": 10, "min_length": 20})


def test_temperature_zero_means_greedy():
    options = job_for({"temperature": 0, "do_sample": True}).options
    assert not options.do_sample
    assert options.top_k == 0 and options.temperature == 1.0  # warpers are off for greedy decoding


def test_prompt_longer_than_max_length_is_refused_with_advice():
    with pytest.raises(InvalidRequest, match="already has 300 tokens") as caught:
        job_for({"max_length": 200}, prompt_len=300)
    assert caught.value.param == "generate_kwargs.max_length"


def test_context_overflow_is_refused_without_hole():
    with pytest.raises(ContextLengthExceeded) as caught:
        job_for({"max_new_tokens": 100}, prompt_len=2000)
    assert caught.value.status == 422
    assert "2000 tokens" in caught.value.message and "at most 1948 prompt tokens" in caught.value.message


def test_hole_cuts_the_prompt_from_the_left():
    job = job_for({"max_new_tokens": 100}, prompt_len=2000, handle_long_generation="hole")
    assert len(job.prompt_ids) == 1948 and job.truncated_tokens == 52
    assert job.prompt_ids[-1] == 100 + 1999  # the end of the prompt is kept


def test_new_tokens_capped_by_the_server_limit():
    with pytest.raises(InvalidRequest, match="at most 64"):
        job_for({"max_new_tokens": 65}, limits=Limits(max_new_tokens=64))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_beams": 9}, "limit of 8"),
    ({"num_return_sequences": 9}, "limit of 8"),
    ({"num_beams": 8, "num_return_sequences": 4, "do_sample": False}, "16 sequences per request"),
    ({"num_beams": 2, "num_return_sequences": 3, "do_sample": False}, "at most num_beams"),
    ({"num_return_sequences": 2, "do_sample": False}, "greedy decoding gives one sequence"),
    ({"num_beams": 4, "num_beam_groups": 3, "do_sample": False}, "must divide num_beams"),
    ({"num_beams": 4, "num_beam_groups": 2}, "does not sample"),
    ({"bad_words_ids": [[70000]]}, "outside the vocabulary"),
    ({"eos_token_id": -1}, "outside the vocabulary"),
    ({"forced_eos_token_id": [1, 65024]}, "outside the vocabulary"),
])
def test_inconsistent_or_greedy_options_are_refused(kwargs, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        job_for(kwargs)


def test_request_values_win_over_the_checkpoint_which_wins_over_api_defaults():
    model = ModelInfo(vocab_size=65024, eos_token_id=11, generation_defaults={"top_k": 50, "eos_token_id": 2})
    assert job_for(model=model).options.top_k == 50
    assert job_for(model=model).options.eos_token_ids == (2,)
    assert job_for({"top_k": 3}, model=model).options.top_k == 3


def test_diverse_beam_options_reach_generate():
    kwargs = job_for({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.5, "do_sample": False,
                      "num_return_sequences": 2}).options.to_generate_kwargs()
    assert kwargs["num_beam_groups"] == 2 and kwargs["diversity_penalty"] == 1.5 and kwargs["num_beams"] == 4


def test_logprobs_need_output_scores_and_return_dict():
    assert not job_for({"output_scores": True}).options.logprobs
    assert job_for({"output_scores": True, "return_dict_in_generate": True}).options.logprobs
