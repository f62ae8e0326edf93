"""One pure function maps a validated request onto generation: ``to_generation_job``.

Every normalisation lives here, in one order of precedence (a value the request set, then the model's own
generation config, then the /chat API default): temperature 0 means greedy, Falcon's missing pad token becomes eos,
``max_new_tokens`` wins over ``max_length``, a prompt longer than the context is cut ("hole") or refused. The result
is a frozen ``GenerationJob`` the engine runs without further checks. No model is needed to test this module.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ...engine.options import GenerationJob, GenerationOptions, Limits, ModelInfo
from ...errors import ContextLengthExceeded, InvalidRequest
from ..generation import pad_token_id, samples, token_ids
from .schema import ChatRequest, GenerateKwargs


def to_generation_job(request: ChatRequest, prompt_ids: list[int], model: ModelInfo, limits: Limits,
                      prompt: str | None = None, stop_texts: Sequence[str] = ()) -> GenerationJob:
    """Map a validated request and its tokenized prompt (``prefix`` included) onto a ``GenerationJob``.

    ``prompt`` is the text generated from when it is not ``request.prompt`` (a rendered conversation, whose answer
    is then the assistant's reply alone, cut before ``stop_texts``). Raises ``InvalidRequest`` or
    ``ContextLengthExceeded`` naming the field at fault and what would fit.
    """
    sent = _resolve(request.generate_kwargs, model.generation_defaults)
    length_asked = bool({"max_length", "max_new_tokens"} & request.generate_kwargs.model_fields_set)
    max_new = _max_new_tokens(sent, len(prompt_ids), limits, length_asked)
    prompt_param = "prompt" if request.messages is None else "messages"
    prompt_ids, truncated = fit_context(prompt_ids, max_new, request.handle_long_generation, limits, prompt_param)
    options = _options(sent, len(prompt_ids) + truncated, max_new, model, limits, request.seed, stop_texts)
    return GenerationJob(prompt_ids=tuple(prompt_ids), options=options, prompt=prompt or request.prompt or "",
                         return_full_text=request.return_full_text and request.messages is None,
                         clean_up_tokenization_spaces=request.clean_up_tokenization_spaces,
                         truncated_tokens=truncated, stop_texts=tuple(stop_texts))


def _resolve(kwargs: GenerateKwargs, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Each option: the request's value if it set one, else the checkpoint's, else the API default."""
    values = kwargs.model_dump()
    for name in GenerateKwargs.model_fields:
        if name not in kwargs.model_fields_set and model_defaults.get(name) is not None:
            values[name] = model_defaults[name]
    return values


def _max_new_tokens(kw: dict[str, Any], prompt_len: int, limits: Limits, length_asked: bool) -> int:
    if kw["max_new_tokens"] is not None:
        max_new, param = kw["max_new_tokens"], "generate_kwargs.max_new_tokens"
    else:
        max_new, param = kw["max_length"] - prompt_len, "generate_kwargs.max_length"
        if max_new < 1:
            raise InvalidRequest(
                f"generate_kwargs.max_length is {kw['max_length']} but the prompt already has {prompt_len} tokens: "
                f"set max_length above {prompt_len} or set max_new_tokens", param=param)
    if max_new > limits.max_new_tokens and not length_asked:
        return limits.max_new_tokens  # the API's default length, on a server configured for shorter answers
    if max_new > limits.max_new_tokens:
        raise InvalidRequest(f"{param} asks for {max_new} new tokens; this server generates at most "
                             f"{limits.max_new_tokens} per sequence", param=param)
    if max_new >= limits.context_length:
        raise ContextLengthExceeded(f"{param} asks for {max_new} new tokens, but the model's context holds "
                                    f"{limits.context_length} tokens in all, prompt included", param=param)
    return max_new


def fit_context(prompt_ids: list[int], max_new: int, handle_long_generation: str | None, limits: Limits,
                prompt_param: str = "prompt") -> tuple[list[int], int]:
    """The prompt ids that fit the context with ``max_new`` more, and how many were cut from the left."""
    room = limits.context_length - max_new
    if len(prompt_ids) <= room:
        return prompt_ids, 0
    if handle_long_generation == "hole":
        return prompt_ids[-room:], len(prompt_ids) - room
    raise ContextLengthExceeded(
        f"the prompt has {len(prompt_ids)} tokens and {max_new} new tokens were asked for, but the model's context "
        f"holds {limits.context_length} tokens: send at most {room} prompt tokens, ask for fewer new tokens, or set "
        '"handle_long_generation": "hole" to cut the prompt from the left', param=prompt_param)


def _options(kw: dict[str, Any], prompt_len: int, max_new: int, model: ModelInfo, limits: Limits,
             seed: int | None, stop_texts: Sequence[str]) -> GenerationOptions:
    eos_ids = _token_ids(kw["eos_token_id"], "eos_token_id", model)
    if not eos_ids and model.eos_token_id is not None:
        eos_ids = (model.eos_token_id,)
    pad_id = _token_ids(kw["pad_token_id"], "pad_token_id", model)
    pad_id = pad_token_id(pad_id[0] if pad_id else None, eos_ids, model)

    min_new = kw["min_new_tokens"] if kw["min_new_tokens"] is not None else max(0, kw["min_length"] - prompt_len)
    if min_new > max_new:
        param = "min_new_tokens" if kw["min_new_tokens"] is not None else "min_length"
        raise InvalidRequest(f"generate_kwargs.{param} asks for at least {min_new} new tokens but at most {max_new} "
                             "may be generated: min_length must not exceed max_length",
                             param=f"generate_kwargs.{param}")

    do_sample = samples(kw["do_sample"], kw["temperature"])
    num_beams, groups, n = kw["num_beams"], kw["num_beam_groups"], kw["num_return_sequences"]
    _check_beams(num_beams, groups, n, do_sample, limits)

    bad_words = tuple(tuple(word) for word in kw["bad_words_ids"] or ())
    for word in bad_words:
        _token_ids(list(word), "bad_words_ids", model)
    forced_bos = kw["forced_bos_token_id"]
    _token_ids(forced_bos, "forced_bos_token_id", model)
    bias = tuple((_token_ids(ids, "sequence_bias", model), float(value)) for ids, value in kw["sequence_bias"] or ())
    decay = _decay(kw["exponential_decay_length_penalty"], max_new)
    stop_strings = kw["stop_strings"]
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
    return GenerationOptions(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=do_sample,
        temperature=kw["temperature"] if do_sample else 1.0,
        top_k=kw["top_k"] if do_sample else 0,
        top_p=kw["top_p"] if do_sample else 1.0,
        typical_p=kw["typical_p"] if do_sample else 1.0,
        min_p=(kw["min_p"] or 0.0) if do_sample else 0.0,
        top_h=(kw["top_h"] or 1.0) if do_sample else 1.0,
        epsilon_cutoff=kw["epsilon_cutoff"] if do_sample else 0.0,
        eta_cutoff=kw["eta_cutoff"] if do_sample else 0.0,
        sequence_bias=bias, exponential_decay_length_penalty=decay,
        suppress_tokens=_token_ids(kw["suppress_tokens"], "suppress_tokens", model),
        begin_suppress_tokens=_token_ids(kw["begin_suppress_tokens"], "begin_suppress_tokens", model),
        stop_strings=stop_strings + tuple(stop_texts), renormalize_logits=kw["renormalize_logits"],
        repetition_penalty=kw["repetition_penalty"], no_repeat_ngram_size=kw["no_repeat_ngram_size"],
        encoder_no_repeat_ngram_size=kw["encoder_no_repeat_ngram_size"], bad_words_ids=bad_words,
        forced_bos_token_id=forced_bos,
        forced_eos_token_id=_token_ids(kw["forced_eos_token_id"], "forced_eos_token_id", model),
        remove_invalid_values=bool(kw["remove_invalid_values"]), eos_token_ids=eos_ids, pad_token_id=pad_id,
        num_beams=num_beams, num_beam_groups=groups,
        diversity_penalty=kw["diversity_penalty"] if groups > 1 else 0.0,
        length_penalty=kw["length_penalty"], early_stopping=kw["early_stopping"], num_return_sequences=n,
        logprobs=kw["output_scores"] and kw["return_dict_in_generate"], seed=seed,
    )


def _check_beams(num_beams: int, groups: int, n: int, do_sample: bool, limits: Limits) -> None:
    def fail(param: str, message: str) -> None:
        raise InvalidRequest(f"generate_kwargs.{param}: {message}", param=f"generate_kwargs.{param}")

    if num_beams > 1 and limits.beams_refused:
        fail("num_beams", limits.beams_refused)
    if num_beams > limits.max_num_beams:
        fail("num_beams", f"{num_beams} is above this server's limit of {limits.max_num_beams}")
    if n > limits.max_num_return_sequences:
        fail("num_return_sequences", f"{n} is above this server's limit of {limits.max_num_return_sequences}")
    if num_beams * n > limits.max_sequences:
        fail("num_return_sequences", f"num_beams * num_return_sequences = {num_beams * n} is above this "
                                     f"server's limit of {limits.max_sequences} sequences per request")
    if num_beams > 1 and n > num_beams:
        fail("num_return_sequences", f"beam search returns at most num_beams = {num_beams} sequences, not {n}")
    if num_beams == 1 and n > 1 and not do_sample:
        fail("num_return_sequences", f"greedy decoding gives one sequence, not {n}: set do_sample (with a "
                                     "temperature above 0) or num_beams >= num_return_sequences")
    if groups > 1:
        if num_beams % groups:
            fail("num_beam_groups", f"{groups} must divide num_beams ({num_beams})")
        if do_sample:
            fail("num_beam_groups", "diverse beam search does not sample: set do_sample to false")


def _decay(value: list[int | float] | None, max_new: int) -> tuple[int, float] | None:
    """exponential_decay_length_penalty, refused where the factor would overflow before generation ends (transformers
    raises an OverflowError there, which in a shared batch would fail every request in it)."""
    if value is None:
        return None
    start, factor = int(value[0]), float(value[1])
    if max(0, max_new - start) * math.log(factor) > math.log(1e30):
        raise InvalidRequest(f"generate_kwargs.exponential_decay_length_penalty: a factor of {factor:g} from token "
                             f"{start} overflows before {max_new} new tokens: use a factor closer to 1 or a later "
                             "start", param="generate_kwargs.exponential_decay_length_penalty")
    return start, factor


def _token_ids(value: int | list[int] | None, name: str, model: ModelInfo) -> tuple[int, ...]:
    return token_ids(value, f"generate_kwargs.{name}", model)
