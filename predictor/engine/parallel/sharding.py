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
would have to gather every step. A per-request LoRA adapter is cut the same way (``shard_adapter``). Each rank's
``FalconShape`` names its own heads and groups, so its KV cache holds only its groups: 1/N of the cache per rank.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..model.falcon import FalconShape
from ..model.loading import Reader, StoredTensor
from ..lora.adapter import TARGETS, LoraAdapter
from ..quantization.linear import Int8Linear

# Whether each linear layer is split by output rows (else by input columns). ``query_key_value``'s rows are laid out
# per K/V group, so equal parts of them are whole groups; ``dense`` takes the matching heads' outputs as its columns.
SPLIT_BY_OUTPUT = {"query_key_value": True, "dense": False, "dense_h_to_4h": True, "dense_4h_to_h": False}


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
    for layer in model.transformer.h:
        for target, block in TARGETS.items():
            linear = getattr(getattr(layer, block), target)
            if SPLIT_BY_OUTPUT[target]:
                _keep_rows(linear, *_part(linear.out_features, rank, world))
            else:
                _keep_columns(linear, *_part(linear.in_features, rank, world), rank)
    sharded = copy.copy(shape)
    sharded.heads, sharded.kv_heads = shape.heads // world, shape.kv_heads // world
    return sharded


def shard_reader(rank: int, world: int) -> Reader:
    """How rank ``rank`` of ``world`` reads a stored tensor: its slice of a split linear layer's weight and bias
    (cut as ``shard_model`` cuts them; a split-input layer's bias on rank 0 only), every other tensor whole."""
    def read(name: str, stored: StoredTensor) -> torch.Tensor | None:
        *_, target, kind = name.split(".")
        if target not in SPLIT_BY_OUTPUT:
            return stored.read()
        if SPLIT_BY_OUTPUT[target]:
            return stored.read(rows=_part(stored.shape[0], rank, world))
        if kind == "bias":
            return stored.read() if rank == 0 else None
        return stored.read(columns=_part(stored.shape[1], rank, world))

    return read


def shard_adapter(adapter: LoraAdapter, rank: int, world: int) -> LoraAdapter:
    """Rank ``rank``'s part of ``adapter``, cut as the layers are: ``B``'s rows of a layer split by output rows
    (``A`` whole: its input is the whole hidden state), ``A``'s columns of a layer split by input columns (``B``
    whole). A split-input layer's ranks then each give ``(x_r @ A_r.T) @ B.T``, which the layer's all-reduce adds
    up to ``(x @ A.T) @ B.T``, once, as it adds their partial outputs."""
    weights = {}
    for (layer, target), (a, b) in adapter.weights.items():
        if SPLIT_BY_OUTPUT[target]:
            start, count = _part(b.shape[0], rank, world)
            b = b[start:start + count]
        else:
            start, count = _part(a.shape[1], rank, world)
            a = a[:, start:start + count]
        weights[(layer, target)] = (a.clone(), b.clone())  # their own storage: a view pickles its whole base
    return dataclasses.replace(adapter, weights=weights)


def _part(size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank ``rank``'s equal part of ``size``."""
    count = size // world
    return rank * count, count


def _keep_rows(linear: torch.nn.Module, start: int, count: int) -> None:
    if isinstance(linear, Int8Linear):  # its rows' scales go with them
        linear.weight = linear.weight[start:start + count].clone()
        linear.scale = linear.scale[start:start + count].clone()
    else:
        linear.weight = torch.nn.Parameter(linear.weight.data[start:start + count].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:start + count].clone(), requires_grad=False)
    linear.out_features = count


def _keep_columns(linear: torch.nn.Module, start: int, count: int, rank: int) -> None:
    if isinstance(linear, Int8Linear):  # every row keeps its whole row's scale
        linear.weight = linear.weight[:, start:start + count].clone()
    else:
        linear.weight = torch.nn.Parameter(linear.weight.data[:, start:start + count].clone(), requires_grad=False)
    if linear.bias is not None and rank > 0:
        linear.bias = None
    linear.in_features = count
