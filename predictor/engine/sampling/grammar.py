"""Structured output: a grammar (a JSON schema) enforced as a per-sequence token mask inside the shared batch.

llguidance (which vLLM also uses) compiles the grammar and, at each step, says which tokens may come next; every
other token's score becomes -inf before the token is chosen, so even a random-weight model writes JSON that parses
and fits its schema (when it is given enough tokens to finish). The matcher is the grammar's state: it belongs to
one sequence, lives in its sampler's processors and is freed with it. Once the grammar is complete only eos may
follow.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import LogitsProcessor


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar for JSON matching ``schema``, written compactly (free whitespace would let a weak model
    write spaces forever); raises ``ValueError`` saying why llguidance cannot compile it."""
    return _validated(lambda: llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={"whitespace_flexible": False}))


def lark_grammar(lark: str) -> str:
    """llguidance's grammar of a Lark grammar (which may embed JSON schemas as ``%json {...}``); raises
    ``ValueError`` saying why it cannot be compiled."""
    return _validated(lambda: llguidance.LLMatcher.grammar_from_lark(lark))


def _validated(build: Callable[[], str]) -> str:
    """The grammar ``build`` makes, once llguidance has checked it; ``ValueError`` saying why not."""
    try:
        grammar = build()
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    if error := llguidance.LLMatcher.validate_grammar(grammar):
        raise ValueError(error)
    return grammar


class GrammarMask(LogitsProcessor):
    """Bans the tokens ``grammar`` does not allow next; the matcher advances on the tokens generated since the
    last call (``input_ids`` is the whole sequence, prompt first). The bitmask is filled as ``llguidance.torch``
    fills it, without importing that module: it ``torch.compile``s a kernel at import, which loads TorchDynamo
    (seconds of every start of the server)."""

    def __init__(self, grammar: str, tokenizer: PreTrainedTokenizerBase, prompt_len: int) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.seen = prompt_len
        self.matcher: llguidance.LLMatcher | None = None  # built at the first step, when the vocabulary size is known
        self.mask: torch.Tensor | None = None  # [1, words of 32 bits]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.matcher is None:
            self.matcher = llguidance.LLMatcher(_ll_tokenizer(self.tokenizer, scores.shape[-1]), self.grammar)
            self.mask = torch.full((1, (scores.shape[-1] + 31) // 32), -1, dtype=torch.int32)
        for token in input_ids[0, self.seen:].tolist():
            self.matcher.consume_token(token)
        self.seen = input_ids.shape[1]
        if self.matcher.is_error():  # cannot happen unless a later processor forced a banned token: stop masking
            return scores
        self.matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * self.mask.element_size())
        return scores.masked_fill(~_unpack(self.mask, scores.shape[-1]).to(scores.device), -torch.inf)


def _unpack(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask [1, words] as booleans [1, vocab], bit i of word w allowing token 32 * w + i. Written out
    rather than through ``llguidance.torch.apply_token_bitmask_inplace``, which ``torch.compile``s itself on first
    use: seconds on the batch's thread, and a C++ compiler the serving image need not have."""
    bits = torch.arange(32, dtype=torch.int32)
    return ((mask.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab_size].bool()  # [1, vocab]


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, built once per tokenizer."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


@functools.lru_cache(maxsize=4)
def grammar_support_error(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why llguidance cannot read this tokenizer's vocabulary (None: it can). It needs every token's bytes, which a
    byte-level BPE or byte-fallback SentencePiece tokenizer has and a word-level one (whose decoder puts spaces
    between tokens) has not."""
    try:
        llguidance.hf.from_tokenizer(tokenizer)
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError for decoders it does not know
        return f"llguidance cannot read its tokenizer ({exc})"
    return None
