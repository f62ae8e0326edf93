"""Tiny Falcon checkpoints built on this machine: random weights and a locally trained tokenizer.

They stand in for the real Falcon weights where none can be downloaded (tests, CI, the demo default). They are
saved with ``save_pretrained`` and served through the same ``from_pretrained`` path as falcon-7b and falcon-40b, in
both attention layouts:

- ``"7b"``: multi-query attention (one K/V head) with parallel attention/MLP, like falcon-7b;
- ``"40b"``: the "new decoder architecture" with grouped K/V heads, like falcon-40b.

Their tokenizer is byte-level BPE, Falcon's kind, unless another kind is asked for, so that what depends on the
vocabulary (stop strings, structured output, detokenizing) can be tested on each kind ``transformers`` loads:
``"wordlevel"`` (whole words, decoded with spaces between them), ``"wordpiece"`` (BERT's), ``"unigram"``
(SentencePiece's model with byte fallback, as Llama's).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

ARCHITECTURES = ("7b", "40b")
TOKENIZER_KINDS = ("bpe", "wordlevel", "wordpiece", "unigram")
VOCAB_SIZE = 1024
# Falcon's tokenizer starts with 11 document-structure tokens and puts <|endoftext|> at id 11; keeping that
# layout makes the tiny tokenizer's eos id the same as the real one's.
SPECIAL_TOKENS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<", ">>ANSWER<<",
                  ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<", "<|endoftext|>")
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"  # the tokenizers without byte-level coverage map unknown words to it
SEED = 1234


def default_cache_dir() -> Path:
    """Where the demo default keeps its tiny checkpoints (``$PREDICTOR_CACHE`` overrides)."""
    base = os.environ.get("PREDICTOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "falcon-predictor")
    return Path(base)


def training_corpus() -> list[str]:
    """English text to train the tokenizer on: the docstrings of Python's standard library, always at hand."""
    import argparse
    import asyncio
    import collections
    import dataclasses
    import functools
    import itertools
    import json as json_module
    import pathlib
    import re
    import string
    import textwrap
    import typing
    import unittest

    texts: list[str] = []
    for module in (argparse, asyncio, collections, dataclasses, functools, itertools, json_module, pathlib, re,
                   string, textwrap, typing, unittest, inspect, os):
        for _, member in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            doc = inspect.getdoc(member)
            if doc:
                texts.append(doc)
    return texts


def build_tokenizer(save_dir: Path, kind: str = "bpe") -> None:
    """Train a tokenizer of ``kind`` (one of ``TOKENIZER_KINDS``) and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    specials, unk = list(SPECIAL_TOKENS), None
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind in ("wordlevel", "wordpiece"):
        unk = UNK_TOKEN
        model = models.WordLevel(unk_token=unk) if kind == "wordlevel" else models.WordPiece(unk_token=unk)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.decoder = decoders.WordPiece()  # as the checkpoints that ship a word-level vocabulary have it
        trainer_type = trainers.WordLevelTrainer if kind == "wordlevel" else trainers.WordPieceTrainer
        trainer = trainer_type(vocab_size=VOCAB_SIZE, special_tokens=specials + [unk], show_progress=False)
    else:
        unk = UNK_TOKEN
        tokenizer = Tokenizer(models.Unigram(byte_fallback=True))
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
        tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.UnigramTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials + [unk] + byte_tokens,
                                          unk_token=unk, show_progress=False)
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    if kind == "unigram":  # training makes a new model, without byte fallback: turn it back on
        saved = json.loads(tokenizer.to_str())
        saved["model"]["byte_fallback"] = True
        tokenizer = Tokenizer.from_str(json.dumps(saved))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, unk_token=unk,
                                   model_max_length=2048)
    fast.save_pretrained(save_dir)


def tiny_config(architecture: str, vocab_size: int = VOCAB_SIZE):
    """A small ``FalconConfig`` in the attention layout of falcon-7b or falcon-40b."""
    from transformers import FalconConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    common = dict(vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=2048, bias=False, alibi=False, bos_token_id=11, eos_token_id=11,
                  # A wide initialisation gives peaked next-token distributions, so greedy choices are not
                  # near-ties that float rounding could flip between batch shapes.
                  initializer_range=0.5)
    if architecture == "7b":
        return FalconConfig(multi_query=True, parallel_attn=True, new_decoder_architecture=False, **common)
    return FalconConfig(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, **common)


def build_tiny_falcon(save_dir: str | os.PathLike, architecture: str = "7b", tokenizer: str = "bpe") -> Path:
    """Write a tiny random Falcon checkpoint with a tokenizer of kind ``tokenizer`` to ``save_dir`` and return the
    path.

    Building is deterministic (fixed seed) and skipped when ``save_dir`` already holds a finished checkpoint.
    """
    import torch
    from transformers import FalconForCausalLM

    save_dir = Path(save_dir)
    marker = save_dir / "tiny-falcon.json"
    if marker.exists():
        return save_dir
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a crash or a concurrent builder never leaves half a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=save_dir.name + ".", dir=save_dir.parent))
    build_tokenizer(staging, tokenizer)
    torch.manual_seed(SEED)
    model = FalconForCausalLM(tiny_config(architecture)).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(staging)
    (staging / "tiny-falcon.json").write_text(json.dumps({"architecture": architecture, "tokenizer": tokenizer,
                                                               "seed": SEED}))
    try:
        staging.rename(save_dir)
    except OSError:  # another process finished first: use its checkpoint
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return save_dir


def main() -> None:
    """``python -m predictor.tiny DIR [7b|40b] [--tokenizer KIND]``: build a tiny Falcon checkpoint in DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("save_dir", help="directory to write the checkpoint to")
    parser.add_argument("architecture", nargs="?", default="7b", choices=ARCHITECTURES)
    parser.add_argument("--tokenizer", default="bpe", choices=TOKENIZER_KINDS, help="the tokenizer's kind")
    args = parser.parse_args()
    print(build_tiny_falcon(args.save_dir, args.architecture, args.tokenizer))


if __name__ == "__main__":
    main()
