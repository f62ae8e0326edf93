"""Kaito's mix of adapters, merged into the weights: every request gets it at no cost per token.

Kaito's /chat server loads every adapter of its adapter directory with PEFT and combines them with
``add_weighted_adapter(adapters, weights, adapter_name="combined_adapter")``, whose default ``combination_type`` is
``svd`` (PEFT switches to ``linear`` for one adapter), then applies the combination unmerged to every request. This
computes the same combined delta per target layer, as PEFT does:

- one adapter at weight ``w``: ``w * scaling * B @ A``;
- several: ``sum(w_i * scaling_i * B_i @ A_i)`` over the adapters that target the layer, truncated by SVD to the
  largest of their ranks;

both times the combined adapter's own scaling (``lora_alpha = r``: 1, or ``sqrt(r)`` when the first adapter uses
rsLoRA, whose settings PEFT copies), and adds it to the layer's weight.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from .adapter import TARGETS, LoraAdapter, linear_shapes, read_adapter

logger = logging.getLogger(__name__)


def merge_adapters(model: torch.nn.Module, adapters: Sequence[tuple[str, str | Path, float]]) -> None:
    """Read each (name, folder, strength) adapter, checked against ``model``, and merge their combination into its
    weights. Raises ``AdapterError`` naming the first adapter that cannot be served."""
    shapes = linear_shapes(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    read = [(read_adapter(name, path, shapes, math.inf, dtype), strength) for name, path, strength in adapters]
    merge_into(model, combined_deltas(read))
    for adapter, _ in read:
        logger.info("Adapter added: %s", adapter.name)
    logger.info("Merged %d adapter(s) into the weights (strengths %s)", len(read),
                ", ".join(f"{a.name}={s:g}" for a, s in read))


def combined_deltas(adapters: Sequence[tuple[LoraAdapter, float]]) -> dict[tuple[int, str], torch.Tensor]:
    """Each target layer's combined delta [out, in], in float32."""
    rank = max(adapter.rank for adapter, _ in adapters)
    scaling = math.sqrt(rank) if adapters[0][0].use_rslora else 1.0  # the combined adapter's lora_alpha / r
    modules = sorted({key for adapter, _ in adapters for key in adapter.weights})
    deltas = {}
    for key in modules:
        delta = sum(weight * (b.float() @ a.float()) for adapter, weight in adapters
                    if (pair := adapter.weights.get(key)) is not None for a, b in [pair])
        if len(adapters) > 1:  # PEFT's "svd" combination: the sum, truncated to the largest rank
            u, s, vh = torch.linalg.svd(delta, full_matrices=True)
            delta = (u[:, :rank] @ torch.diag(s[:rank])) @ vh[:rank]
        deltas[key] = delta * scaling
    return deltas


@torch.no_grad()
def merge_into(model: torch.nn.Module, deltas: dict[tuple[int, str], torch.Tensor]) -> None:
    """Add each delta to its layer's weight, in place."""
    for (layer, target), delta in deltas.items():
        weight = getattr(getattr(model.transformer.h[layer], TARGETS[target]), target).weight
        weight += delta.to(weight.device, weight.dtype)
