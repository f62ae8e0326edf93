"""The /chat wire format: what a client may send, with the defaults of the Falcon /chat service it replaces.

Pydantic lives here and only here. ``parse_chat_request`` turns a decoded JSON body into a ``ChatRequest`` or
raises an ``InvalidRequest`` whose message names the offending field and what it allows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import InvalidRequest, MissingPrompt, UnknownParameter

# generate() options that load code or objects, or reach outside the request. They are never accepted; the
# allowlist below is what keeps them out, this list only makes the refusal explain itself.
CODE_LOADING_OPTIONS = frozenset({
    "custom_generate", "trust_remote_code", "assistant_model", "assistant_tokenizer", "tokenizer", "streamer",
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "generation_config",
    "negative_prompt_ids", "negative_prompt_attention_mask", "watermarking_config", "cache_implementation",
    "cache_config", "past_key_values", "cache", "compile_config", "prompt_lookup_num_tokens", "assistant_early_exit",
})

# GenerationConfig options that are safe but refused, and why (docs/api.md's table lists every option).
REFUSED_OPTIONS = {
    "max_time": "the server's --request_timeout bounds each request's time",
    "output_logits": "raw logits for every vocabulary entry are not returned; output_scores gives log-probabilities",
    "output_attentions": "attention maps are not returned", "output_hidden_states": "hidden states are not returned",
    "guidance_scale": "classifier-free guidance needs a second forward pass per token outside the shared batch",
    "penalty_alpha": "contrastive search moved to the Hub in transformers 5 (remote code)",
    "dola_layers": "DoLa decoding moved to the Hub in transformers 5 (remote code)",
    "constraints": "constrained beam search moved to the Hub in transformers 5 (remote code)",
    "force_words_ids": "constrained beam search moved to the Hub in transformers 5 (remote code)",
    "low_memory": "a memory switch of beam search, decided by the server", "token_healing": "not offered here",
    "encoder_repetition_penalty": "Falcon has no encoder: transformers ignores it on a decoder-only model",
    "decoder_start_token_id": "Falcon has no decoder start token (it is decoder-only)",
    "bos_token_id": "Falcon's prompts carry no bos token; set forced_bos_token_id to force a first token",
    **dict.fromkeys(["num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                     "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "is_assistant",
                     "assistant_ensemble_weight", "speculation_type", "use_mtp"],
                    "a setting of assisted (speculative) decoding, which needs a second model and is not offered"),
    **dict.fromkeys(["continuous_batching_config", "disable_compile", "max_cache_len", "prefill_chunk_size"],
                    "a performance switch of the server, set once at start-up (--compile, --max_batch_size)"),
    **dict.fromkeys(["transformers_version", "_from_model_config"], "metadata of a saved generation config"),
}
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_BIAS = 100.0  # a logit bias beyond this already bans or forces a token (OpenAI's logit_bias range)
MAX_STOP_STRINGS = 8


class GenerateKwargs(BaseModel):
    """Hugging Face generation options a request may set; each has its transformers meaning."""

    model_config = _STRICT

    max_length: int = Field(200, ge=1, description="prompt + generated tokens, unless max_new_tokens is set")
    max_new_tokens: int | None = Field(None, ge=1, description="generated tokens; takes precedence over max_length")
    min_length: int = Field(0, ge=0, description="prompt + generated tokens before eos may be generated")
    min_new_tokens: int | None = Field(None, ge=0, description="generated tokens before eos; overrides min_length")
    do_sample: bool = True
    early_stopping: bool | Literal["never"] = False
    num_beams: int = Field(1, ge=1)
    num_beam_groups: int = Field(1, ge=1)
    # Upper bounds keep the arithmetic finite in float32 (a temperature of 1e-300 or a penalty of 1e308 would
    # turn logits into inf/NaN); they are far beyond any useful value.
    diversity_penalty: float = Field(0.0, ge=0, le=1000)
    temperature: float = Field(1.0, ge=0, le=100, description="0 (or below 1e-5) means greedy decoding")
    top_k: int = Field(10, ge=0, description="0 disables top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1)
    typical_p: float = Field(1.0, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1, description="keep tokens at least min_p times the best's probability")
    top_h: float | None = Field(None, gt=0, le=1, description="entropy-based truncation (transformers' top_h)")
    epsilon_cutoff: float = Field(0.0, ge=0, lt=1)
    eta_cutoff: float = Field(0.0, ge=0, lt=1)
    renormalize_logits: bool = False
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    length_penalty: float = Field(1.0, ge=-10, le=10)
    no_repeat_ngram_size: int = Field(0, ge=0)
    encoder_no_repeat_ngram_size: int = Field(0, ge=0)
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    sequence_bias: list[list[Any]] | None = Field(None, description="[[token ids], bias] pairs")
    exponential_decay_length_penalty: list[int | float] | None = Field(
        None, description="[start index, decay factor]: after start, eos grows more likely by the factor each token")
    stop_strings: str | list[str] | None = None
    use_cache: bool = True  # accepted for compatibility: the server always decodes from a KV cache
    num_return_sequences: int = Field(1, ge=1)
    output_scores: bool = False
    return_dict_in_generate: bool = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @field_validator("bad_words_ids")
    @classmethod
    def _no_empty_words(cls, value: list[list[int]] | None) -> list[list[int]] | None:
        if value is not None and any(len(word) == 0 for word in value):
            raise ValueError("each banned word must be a non-empty list of token ids")
        return value

    @field_validator("sequence_bias")
    @classmethod
    def _bias_pairs(cls, value: list[list[Any]] | None) -> list[list[Any]] | None:
        for pair in value or []:
            match pair:
                case [[*ids], float() | int() as bias] if ids and all(type(i) is int for i in ids) \
                        and type(bias) is not bool and abs(bias) <= MAX_BIAS:
                    continue
            raise ValueError(f"each entry must be [[token ids], bias] with a bias in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        return value

    @field_validator("exponential_decay_length_penalty")
    @classmethod
    def _start_and_factor(cls, value: list[int | float] | None) -> list[int | float] | None:
        if value is not None:
            match value:
                case [int() as start, float() | int() as factor] if start >= 0 and factor > 0:
                    pass
                case _:
                    raise ValueError("must be [start index (an integer >= 0), decay factor (a number > 0)]")
        return value

    @field_validator("stop_strings")
    @classmethod
    def _few_stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > MAX_STOP_STRINGS or any(not text or len(text) > 100 for text in strings):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, each of 1 to 100 characters")
        return value


class Message(BaseModel):
    """One turn of a conversation sent as ``messages``."""

    model_config = _STRICT

    role: str
    content: str


class ChatRequest(BaseModel):
    """The body of ``POST /chat``."""

    model_config = _STRICT

    prompt: str | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, description="a conversation, instead of a prompt")
    return_full_text: bool = True
    clean_up_tokenization_spaces: bool = False
    prefix: str | None = None
    handle_long_generation: Literal["hole"] | None = None
    generate_kwargs: GenerateKwargs = Field(default_factory=GenerateKwargs)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stream: bool = False
    model: str | None = Field(None, description="the served model's name or a LoRA adapter's (extension)")

    @field_validator("generate_kwargs", mode="before")
    @classmethod
    def _null_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("prompt", "prefix")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raise ``InvalidRequest`` naming the first field at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    if body.get("prompt") in (None, "") and body.get("messages") is None:
        raise MissingPrompt()
    if body.get("prompt") is not None and body.get("messages") is not None:
        raise InvalidRequest("send prompt or messages, not both: messages is a conversation the server renders "
                             "into the prompt", param="messages")
    kwargs = body.get("generate_kwargs")
    if isinstance(kwargs, dict):
        _refuse_unknown_options(kwargs)
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _to_invalid_request(exc, body) from None


def _refuse_unknown_options(kwargs: dict[str, Any]) -> None:
    for key in kwargs:
        if key in GenerateKwargs.model_fields:
            continue
        if key in CODE_LOADING_OPTIONS:
            raise UnknownParameter(f"generate_kwargs.{key} is never accepted: options that load code or objects "
                                   "cannot be set by a request", param=f"generate_kwargs.{key}")
        if key in REFUSED_OPTIONS:
            raise UnknownParameter(f"generate_kwargs.{key} is not supported: {REFUSED_OPTIONS[key]}",
                                   param=f"generate_kwargs.{key}")
        allowed = ", ".join(GenerateKwargs.model_fields)
        raise UnknownParameter(f"generate_kwargs.{key} is not a supported generation option; supported: {allowed}",
                               param=f"generate_kwargs.{key}")


# Fields that take more than one form: pydantic reports a failure per form, this says what is allowed at once.
_ALLOWED_FORMS = {
    "early_stopping": 'true, false or "never"',
    "eos_token_id": "a token id or a list of token ids",
    "forced_eos_token_id": "a token id or a list of token ids",
    "stop_strings": "a string or a list of strings",
}
_FIELD_NAMES = frozenset(ChatRequest.model_fields) | frozenset(GenerateKwargs.model_fields) | frozenset(
    Message.model_fields)


def _to_invalid_request(exc: ValidationError, body: dict[str, Any]) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    # The location without pydantic's union-member tags ("eos_token_id.int"): field names and list indexes only.
    extra = error["type"] == "extra_forbidden"
    parts = [str(p) for p in error["loc"] if isinstance(p, int) or p in _FIELD_NAMES or extra]
    param = ".".join(parts)
    if extra:
        return UnknownParameter(f"{param} is not a field of this request", param=param)
    field = next((p for p in reversed(parts) if p in _FIELD_NAMES), "")
    if field in _ALLOWED_FORMS:
        param = field if field in ChatRequest.model_fields else f"generate_kwargs.{field}"
        got = _shown((body.get("generate_kwargs") or {}).get(field, body.get(field)))
        return InvalidRequest(f"{param}: must be {_ALLOWED_FORMS[field]} (got {got})", param=param)
    return InvalidRequest(f"{param}: {error['msg']} (got {_shown(error.get('input'))})", param=param)


def _shown(value: Any) -> str:
    shown = repr(value) if not isinstance(value, (dict, list)) else _json_type(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
