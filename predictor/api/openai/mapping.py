"""One pure function maps a validated OpenAI request onto generation: ``to_generation_job``.

The OpenAI request goes straight onto the engine's ``GenerationOptions``, as the /chat mapping's does (and with its
helpers), so an error names the OpenAI parameter and a new parameter touches this module alone. The choices:

- ``temperature`` 0 is greedy decoding; above 0 it samples with that temperature, ``top_p`` and no top-k (OpenAI has
  none, so /chat's ``top_k=10`` default does not apply; vLLM's ``top_k`` extension sets one). OpenAI's default
  temperature is 1.
- ``max_tokens`` defaults to 16 for completions, as OpenAI's; for chat, to what the context has left, up to the
  server's ``--max_new_tokens``. ``max_completion_tokens`` is chat's newer name for it.
- ``presence_penalty`` and ``frequency_penalty`` have OpenAI's definitions, over the generated tokens;
  ``logit_bias`` adds its bias to a token's logit (transformers' ``sequence_bias`` of one token).
- vLLM's extensions: ``min_tokens`` holds eos and ``stop_token_ids`` back that long; ``stop_token_ids`` end a choice
  as eos does; ``ignore_eos`` goes on past eos; ``top_k``, ``min_p`` and ``repetition_penalty``.
- ``stop`` (up to 64 strings: OpenAI allows 4, vLLM any number) cuts the text before the first one, or after it
  with vLLM's ``include_stop_str_in_output``; the engine also stops the choice there. Chat also stops at
  ``"\\nUser:"`` (``chat_format.CHAT_STOP``), so the model does not write the user's next turn (never kept).
- vLLM's ``skip_special_tokens: false`` writes special tokens (eos) into the text; ``add_special_tokens`` encodes
  the prompt with the tokenizer's special tokens (Falcon's adds none, so the default is false for both APIs).
- ``tools`` (chat): the answer's grammar is the tool calls' (``tools``); ``response_format`` may not be combined
  with them.
- ``response_format`` ``json_object`` or ``json_schema`` is compiled by llguidance into a grammar that masks every
  token that would leave it; a schema it cannot compile is a 400 saying why.
- A completions request's prompts (a string, strings, token ids, lists of token ids) are a job each, run side by
  side in the shared batch; prompts x ``n`` is bounded by ``--max_sequences_per_request`` (``check_sequences``).
- ``logprobs`` (chat: with ``top_logprobs`` up to 20; completions: an integer up to 5) reports each generated
  token's log-probability under the distribution it was chosen from. ``echo`` puts the prompt in front of a
  completion; with ``logprobs`` too, the prompt's own tokens come first in ``logprobs`` (the first with ``null``),
  each scored by the model's distribution before it (computed, never taken from the prefix cache).
"""

from __future__ import annotations

from typing import Any, Sequence

from ...engine.sampling.grammar import json_schema_grammar
from ...engine.options import GenerationJob, GenerationOptions, Limits, ModelInfo
from ...errors import ContextLengthExceeded, InvalidRequest
from ..generation import pad_token_id, samples, token_ids
from .schema import GenerationFields, ResponseFormat
from .tools import tools_grammar


def to_generation_job(request: GenerationFields, prompt: str, prompt_ids: list[int], stops: Sequence[str],
                      model: ModelInfo, limits: Limits) -> GenerationJob:
    """Map a validated OpenAI request, its prompt (a chat's rendered conversation) and that prompt's ids onto a
    ``GenerationJob``; ``stops`` are the texts the answer is cut before. Raises ``InvalidRequest`` or
    ``ContextLengthExceeded`` naming the OpenAI field at fault."""
    max_new = resolve_max_tokens(request.asked_tokens, len(prompt_ids), limits, request.prompt_param)
    do_sample = samples(True, request.temperature)
    _check_n(request.n, do_sample, limits)
    eos = () if request.ignore_eos or model.eos_token_id is None else (model.eos_token_id,)
    ends = eos + token_ids(request.stop_token_ids, "stop_token_ids", model)
    if request.min_tokens > max_new:
        raise InvalidRequest(f"min_tokens: {request.min_tokens} is more than the {max_new} tokens that may be "
                             "generated (max_tokens)", param="min_tokens")
    logprobs, top_logprobs = request.logprobs_asked()
    options = GenerationOptions(
        max_new_tokens=max_new, min_new_tokens=request.min_tokens, do_sample=do_sample,
        temperature=request.temperature if do_sample else 1.0,
        top_k=request.top_k if do_sample else 0,
        top_p=request.top_p if do_sample else 1.0,
        min_p=request.min_p if do_sample else 0.0,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        sequence_bias=logit_bias(request.logit_bias, model),
        eos_token_ids=ends, pad_token_id=pad_token_id(None, eos, model), num_return_sequences=request.n,
        logprobs=logprobs, top_logprobs=top_logprobs, stop_strings=tuple(stops), seed=request.seed,
        prompt_logprobs=top_logprobs if logprobs and request.echo_prompt else None,
        grammar=request_grammar(request),
    )
    kept = tuple(request.stops()) if request.include_stop_str_in_output else ()
    return GenerationJob(prompt_ids=tuple(prompt_ids), options=options, prompt=prompt,
                         return_full_text=request.echo_prompt, stop_texts=tuple(stops), kept_stop_texts=kept,
                         skip_special_tokens=request.skip_special_tokens)


def check_sequences(prompts: int, n: int, limits: Limits) -> None:
    """Several prompts run side by side, ``n`` choices each: together at most ``--max_sequences_per_request``."""
    if prompts * n > limits.max_sequences:
        raise InvalidRequest(f"prompt: {prompts} prompts x n {n} are {prompts * n} sequences, above this server's "
                             f"limit of {limits.max_sequences} per request: send fewer prompts per request",
                             param="prompt" if prompts > 1 else "n")


def resolve_max_tokens(asked: int | None, prompt_tokens: int, limits: Limits, prompt_param: str = "prompt",
                       tokens_param: str = "max_tokens") -> int:
    """New tokens to generate: ``asked``, or (None) what the context has left up to the server's limit;
    ``tokens_param`` is the field that asked."""
    room = limits.context_length - prompt_tokens
    if asked is None and room >= 1:
        return min(room, limits.max_new_tokens)
    if asked is None or asked > room:
        raise ContextLengthExceeded(
            f"this model's context holds {limits.context_length} tokens, but the prompt has {prompt_tokens} and "
            f"{asked or 'at least 1'} more were asked for: shorten the prompt or lower {tokens_param}",
            param=prompt_param if asked is None or room < 1 else tokens_param)
    if asked > limits.max_new_tokens:
        raise InvalidRequest(f"{tokens_param}: {asked} is above this server's limit of {limits.max_new_tokens} new "
                             "tokens per choice", param=tokens_param)
    return asked


def logit_bias(bias: dict[str, float], model: ModelInfo) -> tuple[tuple[tuple[int, ...], float], ...]:
    """OpenAI's ``logit_bias`` (token ids as strings) as one-token sequence biases, each id checked."""
    return tuple((token_ids(int(key), "logit_bias", model), float(value)) for key, value in bias.items())


def request_grammar(request: GenerationFields) -> str | None:
    """The grammar the answer must follow: the tool calls' (``tools``), or ``response_format``'s."""
    tools, required = request.tool_mode()
    if not tools:
        return grammar(request.response_format)
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequest('response_format: cannot be combined with tools (unless tool_choice is "none"): ask '
                             "for one or the other", param="response_format")
    return tools_grammar(tools, required, request.parallel_tool_calls)


def grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar ``response_format`` asks the text to follow (None: free text)."""
    if response_format is None:
        return None
    schema = response_format.json_schema.json_schema if response_format.json_schema is not None else None
    return format_grammar(response_format.type, schema, "response_format",
                          'a json_schema: {"name": ..., "schema": {...}}')


def format_grammar(kind: str, schema: dict[str, Any] | None, param: str, how: str) -> str | None:
    """The grammar of an output format: ``text`` (None: free text), ``json_object`` or ``json_schema`` with its
    schema; ``param`` names the field at fault, ``how`` says how a missing schema is given."""
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if schema is None:
        raise InvalidRequest(f'{param}: type "json_schema" needs {how}', param=param)
    try:
        return json_schema_grammar(schema)
    except ValueError as exc:
        raise InvalidRequest(f"{param}: the JSON schema cannot be compiled: {exc}", param=param) from None


def _check_n(n: int, do_sample: bool, limits: Limits) -> None:
    if n > limits.max_num_return_sequences:
        raise InvalidRequest(f"n: {n} is above this server's limit of {limits.max_num_return_sequences}", param="n")
    if n > 1 and not do_sample:
        raise InvalidRequest(f"n: temperature 0 (greedy decoding) gives one completion, not {n}: set a temperature "
                             "above 0", param="n")
