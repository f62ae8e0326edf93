"""An engine from a checkpoint: where the weights come from and how they are placed (``LoadSpec``), the device and
dtype ``auto`` stands for, the tokenizer, adapters merged into the weights, and quantization. A quantized
checkpoint in safetensors files loads a decoder layer at a time (``layerwise``); anything else loads whole through
transformers' ``from_pretrained`` (native Falcon code; remote code is never run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..lora.adapter import AdapterError
from ..lora.merge import merge_adapters
from ..quantization.linear import quantize_linears, weight_bytes
from ..quantization.schemes import scheme_refusal
from .layerwise import can_load_by_layers, load_by_layers
from .runner import Engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """Where the weights come from and how to place them."""

    source: str  # local directory or Hugging Face id
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None  # "int8", "fp8" or "int4" (``quantization.schemes``); None: the model's dtype
    kv_cache_dtype: str = "auto"  # "fp8": keys and values stored in 8 bits (``kv_cache``)
    # (name, folder, strength) of adapters merged into the weights as they load (Kaito's adapter directory):
    # before any tensor-parallel split, so each rank cuts its shard out of the merged weights
    merged_adapters: tuple[tuple[str, str, float], ...] = ()


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """``auto`` picks CUDA with bfloat16 when a GPU is visible, else the CPU with float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible")
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def load_engine(spec: LoadSpec) -> Engine:
    """Load the tokenizer and model with transformers (native Falcon code; remote code is never run)."""
    device, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    refusal = scheme_refusal(spec.quantization, device, capability)
    if refusal:
        raise SystemExit(refusal)
    logger.info("Loading %s (revision %s) on %s as %s", spec.source, spec.revision or "default", device, dtype)
    tokenizer = load_tokenizer(spec)
    if spec.quantization is not None and not spec.merged_adapters and can_load_by_layers(spec.source):
        before = time.monotonic()
        model = load_by_layers(spec.source, dtype, spec.quantization, torch.device(device))
        logger.info("Loaded %s a layer at a time in %.1f s; quantized the linear layers to %s: weights take %s",
                    type(model).__name__, time.monotonic() - before, spec.quantization, _size(weight_bytes(model)))
        return Engine(model, tokenizer, spec.kv_cache_dtype)
    # PyTorch's scaled-dot-product attention (fused kernels on GPUs); named so a transformers default cannot change it
    kwargs: dict = dict(revision=spec.revision, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa")
    if device == "cuda" and spec.quantization is None:
        kwargs["device_map"] = "auto"  # splits the layers over every visible GPU (falcon-40b needs two)
    # Quantized, the model is read into host memory and goes to one GPU a decoder layer at a time, quantized there.
    model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
    if device == "cpu":
        model = model.to("cpu")
    model.eval()
    if spec.merged_adapters:  # merged before quantizing, into the weights as published
        try:
            merge_adapters(model, spec.merged_adapters)
        except AdapterError as exc:
            raise SystemExit(str(exc)) from None
    logger.info("Loaded %s: %s parameters", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}")
    if spec.quantization is not None:
        quantize(model, spec.quantization, torch.device(device))
    return Engine(model, tokenizer, spec.kv_cache_dtype)


def load_tokenizer(spec: LoadSpec) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(spec.source, revision=spec.revision, trust_remote_code=False)


def quantize(model: torch.nn.Module, scheme: str, device: torch.device) -> None:
    """Quantize ``model``'s linear layers to ``scheme`` on ``device`` (``quantization``), logging the bytes."""
    before = weight_bytes(model)
    quantize_linears(model, scheme, device if device.type == "cuda" else None)
    model.to(device)
    logger.info("Quantized the linear layers to %s: weights take %s (%s unquantized)", scheme,
                _size(weight_bytes(model)), _size(before))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
