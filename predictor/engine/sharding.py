"""Tensor-parallel sharding of a loaded Falcon: which part of every layer a rank keeps, and which ranks are refused.

Each of N ranks keeps, per decoder layer (as text-generation-inference's ``flash_rw_modeling.py`` does):

- ``query_key_value`` by whole K/V groups: in the new decoder architecture its rows are laid out per group (the
  group's query heads, then its key, then its value), so rank r keeps the contiguous rows of groups
  ``r * G/N .. (r + 1) * G/N`` with no reordering;
- ``dense`` by the matching input columns (those heads' outputs);
- ``dense_h_to_4h`` by output rows and ``dense_4h_to_h`` by the matching input columns.

``dense`` and ``dense_4h_to_h`` then give partial sums. Falcon adds attention and MLP outputs (parallel attention),
so one all-reduce of their sum per layer (``FalconShape.reduce``) completes it. Embeddings, layer norms and
``lm_head`` are replicated: the sampler on rank 0 needs the whole vocabulary's logits, which a vocabulary split
would have to gather every step. Each rank's ``FalconShape`` names its own heads and groups, so its KV cache holds
only its groups: 1/N of the cache per rank.
"""

from __future__ import annotations

import copy

import torch

from .falcon import FalconShape


def tensor_parallel_refusal(config, world: int, device: str, gpus: int) -> str | None:
    """Why ``world`` ranks cannot serve a checkpoint of ``config`` on ``device`` (``gpus`` visible), in one line;
    None when they can."""
    if world < 1:
        return f"--tensor_parallel_size must be at least 1, not {world}"
    if world == 1:
        return None
    shape = FalconShape(config)
    if not shape.new_decoder_architecture:
        return (f"--tensor_parallel_size {world}: this checkpoint uses multi-query attention (one K/V head, "
                f"{shape.heads} query heads, as falcon-7b), which cannot be split by K/V groups over ranks; "
                "serve it with --tensor_parallel_size 1 and scale by replicas")
    if shape.kv_heads % world or shape.heads % world:
        return (f"--tensor_parallel_size {world} does not divide the model's {shape.kv_heads} K/V groups and "
                f"{shape.heads} query heads; use a size that divides both (e.g. "
                f"{', '.join(str(n) for n in range(1, shape.kv_heads + 1) if shape.kv_heads % n == 0)})")
    if device == "cuda" and world > gpus:
        return (f"--tensor_parallel_size {world} needs {world} GPUs, one per rank, and {gpus} are visible; "
                f"use --tensor_parallel_size {max(gpus, 1)} or make more GPUs visible")
    if device == "cpu" and not torch.distributed.is_gloo_available():
        return (f"--tensor_parallel_size {world} on the CPU needs torch.distributed's gloo backend, which this "
                "PyTorch build lacks; use --tensor_parallel_size 1")
    return None


def shard_model(model: torch.nn.Module, shape: FalconShape, rank: int, world: int) -> FalconShape:
    """Cut ``model``'s layers down, in place, to rank ``rank``'s share of ``world`` (module docstring); its shape.
    Biases of the row-split layers stay on rank 0 only, so that the all-reduce adds each once."""
    groups = shape.kv_heads // world
    per_group = shape.heads // shape.kv_heads
    for layer in model.transformer.h:
        attention, mlp = layer.self_attention, layer.mlp
        rows = (per_group + 2) * shape.head_dim * groups  # fused rows of this rank's groups
        _keep_rows(attention.query_key_value, rank * rows, rows)
        columns = per_group * shape.head_dim * groups  # the query heads of those groups
        _keep_columns(attention.dense, rank * columns, columns, rank)
        width = mlp.dense_h_to_4h.out_features // world
        _keep_rows(mlp.dense_h_to_4h, rank * width, width)
        _keep_columns(mlp.dense_4h_to_h, rank * width, width, rank)
    sharded = copy.copy(shape)
    sharded.heads, sharded.kv_heads = shape.heads // world, groups
    return sharded


def _keep_rows(linear: torch.nn.Linear, start: int, count: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[start:start + count].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:start + count].clone(), requires_grad=False)
    linear.out_features = count


def _keep_columns(linear: torch.nn.Linear, start: int, count: int, rank: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, start:start + count].clone(), requires_grad=False)
    if linear.bias is not None and rank > 0:
        linear.bias = None
    linear.in_features = count
