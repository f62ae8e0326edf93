"""A draft model's proposals for speculative decoding (``{"method": "draft_model", ...}``): a smaller model with
the target's tokenizer (falcon-7b for falcon-40b) drafts k tokens greedily for each drafting sequence, all sequences
in one batched step per draft token.

The draft engine keeps its own KV cache, row for row with the target's: before drafting, a row keeps the longest
prefix it holds of its sequence's tokens (the drafts the target rejected last time, or another sequence's tokens
after the row changed hands, are dropped) and computes the rest as one chunk. Its drafts are verified like any
others (sample-and-match, ``speculating``), so the output is the target's whatever the draft model proposes.
"""

from __future__ import annotations

import torch

from ..model.runner import Engine
from .running import RunningSequence


class DraftModel:
    """Greedy drafts from ``engine``, a smaller model sharing the target's tokenizer (its cache reserved with as
    many rows as the target's)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @torch.inference_mode()
    def __call__(self, sequences: list[RunningSequence], lengths: list[int]) -> list[list[int]]:
        """Up to ``lengths[i]`` drafts for each of ``sequences``: one step to catch each row up with its sequence
        (its first draft from the last logits), then a decode step per further draft."""
        cache = self.engine.cache
        chunks = []
        for seq in sequences:
            kept = common_prefix(cache.tokens(seq.row), seq.tokens[:-1])
            cache.truncate(seq.row, kept)
            chunks.append((seq.row, seq.tokens[kept:], 1))
        drafts = [[token] for token in self.engine.step([], chunks).argmax(-1).tolist()]
        for j in range(1, max(lengths, default=0)):
            going = [i for i, k in enumerate(lengths) if k > j]
            chosen = self.engine.step([(sequences[i].row, drafts[i][-1]) for i in going]).argmax(-1).tolist()
            for i, token in zip(going, chosen):
                drafts[i].append(token)
        return [d[:k] for d, k in zip(drafts, lengths)]


def common_prefix(held: list[int], tokens: list[int]) -> int:
    """How many leading tokens ``held`` and ``tokens`` share."""
    for i, (a, b) in enumerate(zip(held, tokens)):
        if a != b:
            return i
    return min(len(held), len(tokens))


def draft_fit_refusal(model: str, weight_bytes: int, free_bytes: int) -> str | None:
    """Why a draft model whose weights take ``weight_bytes`` cannot be loaded beside the target into the
    ``free_bytes`` its devices have left, in one line naming what would serve; None when it fits."""
    if weight_bytes <= free_bytes:
        return None
    return (f"--speculative_config: the draft model {model} needs {weight_bytes / 1e9:.1f} GB for its weights and "
            f"{free_bytes / 1e9:.1f} GB of GPU memory is free beside the target; use a smaller draft model, quantize "
            'both (--quantization int8 or fp8), or draft without a model ({"method": "ngram"})')


def tokenizer_mismatch(draft: Engine, target: Engine) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (their vocabularies or special ids differ), or None."""
    if draft.info.vocab_size != target.info.vocab_size:
        return f"its vocabulary has {draft.info.vocab_size} logits, the target's {target.info.vocab_size}"
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        return "its tokenizer's vocabulary differs from the target's"
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        ours, theirs = getattr(draft.tokenizer, name), getattr(target.tokenizer, name)
        if ours != theirs:
            return f"its {name} ({ours}) is not the target's ({theirs})"
    return None
