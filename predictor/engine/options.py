"""What the engine is asked to do: a job's token ids and frozen generation options, and the model facts and
per-request bounds the API maps requests against. Plain dataclasses; nothing here knows the wire formats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Limits:
    """Per-request bounds that keep one request from exhausting memory or holding the accelerator."""

    context_length: int = 2048  # prompt + generated tokens the model attends over
    max_new_tokens: int = 2048  # generated tokens per sequence
    max_num_beams: int = 8
    max_num_return_sequences: int = 8
    max_sequences: int = 16  # num_beams * num_return_sequences: rows one request may occupy in a batch
    beams_refused: str | None = None  # why this server runs no beam search (tensor parallelism), if it does not


@dataclass(frozen=True)
class ModelInfo:
    """What the mapping needs to know about the served model and its tokenizer."""

    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int | None = None
    generation_defaults: Mapping[str, Any] = field(default_factory=dict)  # the checkpoint's own generation config


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate, with every default and normalisation applied; each running sequence carries its own."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0  # 0: off
    top_h: float = 1.0  # 1: off
    epsilon_cutoff: float = 0.0  # 0: off
    eta_cutoff: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # (token ids, bias); one id is a logit bias
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated as the first new token
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start index, decay factor)
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    renormalize_logits: bool = False  # beam search only: reported log-probabilities are always normalised
    eos_token_ids: tuple[int, ...] = ()  # the ids that end a sequence (eos, and OpenAI's stop_token_ids)
    pad_token_id: int = 0
    num_beams: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # and that many most likely tokens' at each step
    prompt_logprobs: int | None = None  # the prompt tokens' log-probabilities too, with that many top ones
    stop_strings: tuple[str, ...] = ()  # transformers' meaning: end after the token that completes one
    grammar: str | None = None  # an llguidance grammar the text must follow (structured output)
    seed: int | None = None

    @property
    def uses_beams(self) -> bool:
        return self.num_beams > 1

    def to_generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``generate`` (the beam-search path)."""
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=self.do_sample,
            num_beams=self.num_beams, num_beam_groups=self.num_beam_groups, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping, num_return_sequences=self.num_return_sequences,
            repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
            encoder_no_repeat_ngram_size=self.encoder_no_repeat_ngram_size,
            bad_words_ids=[list(word) for word in self.bad_words_ids] or None,
            forced_bos_token_id=self.forced_bos_token_id,
            forced_eos_token_id=list(self.forced_eos_token_id) or None,
            remove_invalid_values=self.remove_invalid_values, renormalize_logits=self.renormalize_logits,
            eos_token_id=list(self.eos_token_ids) or None, pad_token_id=self.pad_token_id,
            output_scores=self.logprobs, return_dict_in_generate=True,
            sequence_bias=[[list(ids), bias] for ids, bias in self.sequence_bias] or None,
            suppress_tokens=list(self.suppress_tokens) or None,
            begin_suppress_tokens=list(self.begin_suppress_tokens) or None,
            exponential_decay_length_penalty=self.exponential_decay_length_penalty,
            stop_strings=list(self.stop_strings) or None,
        )
        if self.num_beam_groups > 1:
            kwargs["diversity_penalty"] = self.diversity_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, typical_p=self.typical_p,
                          min_p=self.min_p or None, top_h=self.top_h if self.top_h < 1.0 else None,
                          epsilon_cutoff=self.epsilon_cutoff, eta_cutoff=self.eta_cutoff)
        return kwargs


@dataclass(frozen=True)
class GenerationJob:
    """A request ready for the engine: token ids, options, and how to shape the answer."""

    prompt_ids: tuple[int, ...]
    options: GenerationOptions
    prompt: str  # the client's prompt, returned in front of the continuation when return_full_text is set
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    skip_special_tokens: bool = True  # false: special tokens (eos) are written into the text
    truncated_tokens: int = 0  # prompt tokens cut from the left by handle_long_generation="hole"
    stop_texts: tuple[str, ...] = ()  # the answer's text is cut before the first of these (OpenAI's stop, a chat's
    #                                    next turn); the tokens up to it count as generated
    kept_stop_texts: tuple[str, ...] = ()  # those of stop_texts that end the answer but stay in its text
    adapter: str | None = None  # the LoRA adapter to generate with; None: the base model


# -- speculative decoding (``sampling.speculation``, ``scheduling.speculating``) -------------------------------------
SPECULATIVE_METHODS = ("ngram", "draft_model")
# Above this many running sequences no step speculates (vLLM's ``disable_by_batch_size``). Verifying drafts costs
# a step k extra tokens per sequence and its overlap with the host (a speculating step reads its tokens back before
# the next is planned); at low batch a decode step is bound by reading the weights and the extra tokens are nearly
# free, at high batch it is bound by compute and they are not. TensorRT-LLM turns n-gram speculation off above 32;
# benchmarks/speculative.py's sweep: even drafts that are always right still paid at 32 on the CPU, less at 64.
DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """``--speculative_config``: how drafts are made and how many a sequence verifies per step."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most drafts a sequence verifies in one step (k)
    model: str | None = None  # draft_model: the drafting checkpoint's directory (or Hugging Face id)
    prompt_lookup_min: int = 2  # shortest n-gram matched against the sequence's earlier tokens
    prompt_lookup_max: int = 4  # longest; the longest that matches wins
    disable_by_batch_size: int = DISABLE_BY_BATCH_SIZE  # no speculation with more running sequences than this


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """``--speculative_config``'s JSON as a config; a ValueError naming the key at fault, in one line. As in vLLM,
    one of ``prompt_lookup_min`` / ``prompt_lookup_max`` given alone sets both."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError("expected a JSON object such as {\"method\": \"ngram\", \"num_speculative_tokens\": 4}")
    known = {f.name for f in fields(SpeculativeConfig)}
    if unknown := sorted(set(given) - known):
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if given.get("method", "ngram") not in SPECULATIVE_METHODS:
        raise ValueError(f"method {given['method']!r} is not served; served: {', '.join(SPECULATIVE_METHODS)}")
    if (given.get("method") == "draft_model") != isinstance(given.get("model"), str):
        raise ValueError("model (the draft checkpoint's directory) goes with method draft_model, and only with it")
    for key in known - {"method", "model"}:
        if key in given and (not isinstance(given[key], int) or isinstance(given[key], bool) or given[key] < 1):
            raise ValueError(f"{key} must be an integer of at least 1, not {given[key]!r}")
    if "num_speculative_tokens" not in given:
        raise ValueError("num_speculative_tokens is required")
    if ("prompt_lookup_min" in given) != ("prompt_lookup_max" in given):
        given["prompt_lookup_min"] = given["prompt_lookup_max"] = given.get("prompt_lookup_min",
                                                                            given.get("prompt_lookup_max"))
    config = SpeculativeConfig(**given)
    if config.prompt_lookup_min > config.prompt_lookup_max:
        raise ValueError(f"prompt_lookup_min ({config.prompt_lookup_min}) is above prompt_lookup_max "
                         f"({config.prompt_lookup_max})")
    return config
