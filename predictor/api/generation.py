"""What every protocol's mapping onto generation options shares: greedy or sampling, the pad id, and token ids
checked against the vocabulary."""

from __future__ import annotations

from typing import Sequence

from ..engine.options import GREEDY_BELOW_TEMPERATURE, ModelInfo
from ..errors import InvalidRequest


def samples(do_sample: bool, temperature: float) -> bool:
    """Whether to sample. temperature 0 is the usual way to ask for greedy decoding; transformers 5 raises on it.
    Below 1e-5 sampling is greedy in all but float overflow, so it is treated the same (as vLLM does)."""
    return do_sample and temperature >= GREEDY_BELOW_TEMPERATURE


def pad_token_id(asked: int | None, eos_ids: Sequence[int], model: ModelInfo) -> int:
    """The id rows are padded with: the request's, the tokenizer's, else eos (Falcon has no pad token; transformers
    pads with eos too)."""
    if asked is not None:
        return asked
    if model.pad_token_id is not None:
        return model.pad_token_id
    if eos_ids:
        return eos_ids[0]
    return model.eos_token_id if model.eos_token_id is not None else 0


def token_ids(value: int | Sequence[int] | None, param: str, model: ModelInfo) -> tuple[int, ...]:
    """``value`` as a tuple of ids, each checked against the vocabulary; ``param`` names the field at fault."""
    if value is None:
        return ()
    ids = (value,) if isinstance(value, int) else tuple(value)
    for token_id in ids:
        if not 0 <= token_id < model.vocab_size:
            raise InvalidRequest(f"{param}: token id {token_id} is outside the vocabulary [0, {model.vocab_size - 1}]",
                                 param=param)
    return ids
