"""Tiny Falcon checkpoints built on this machine: random weights and a locally trained tokenizer.

They stand in for the real Falcon weights where none can be downloaded (tests, CI, the demo default). They are
saved with ``save_pretrained`` and served through the same ``from_pretrained`` path as falcon-7b and falcon-40b, in
both attention layouts:

- ``"7b"``: multi-query attention (one K/V head) with parallel attention/MLP, like falcon-7b;
- ``"40b"``: the "new decoder architecture" with grouped K/V heads, like falcon-40b.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

ARCHITECTURES = ("7b", "40b")
VOCAB_SIZE = 1024
# Falcon's tokenizer starts with 11 document-structure tokens and puts <|endoftext|> at id 11; keeping that
# layout makes the tiny tokenizer's eos id the same as the real one's.
SPECIAL_TOKENS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<", ">>ANSWER<<",
                  ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<", "<|endoftext|>")
EOS_TOKEN = "<|endoftext|>"
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


def build_tokenizer(save_dir: Path) -> None:
    """Train a byte-level BPE tokenizer (Falcon's kind) and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, model_max_length=2048)
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


def build_tiny_falcon(save_dir: str | os.PathLike, architecture: str = "7b") -> Path:
    """Write a tiny random Falcon checkpoint with its tokenizer to ``save_dir`` and return the path.

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
    build_tokenizer(staging)
    torch.manual_seed(SEED)
    model = FalconForCausalLM(tiny_config(architecture)).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(staging)
    (staging / "tiny-falcon.json").write_text(json.dumps({"architecture": architecture, "seed": SEED}))
    try:
        staging.rename(save_dir)
    except OSError:  # another process finished first: use its checkpoint
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return save_dir


def main() -> None:
    """``python -m predictor.tiny DIR [7b|40b]``: build a tiny Falcon checkpoint in DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("save_dir", help="directory to write the checkpoint to")
    parser.add_argument("architecture", nargs="?", default="7b", choices=ARCHITECTURES)
    args = parser.parse_args()
    print(build_tiny_falcon(args.save_dir, args.architecture))


if __name__ == "__main__":
    main()
