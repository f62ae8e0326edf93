"""Tensor-parallel sharding of a Falcon: which part of every layer a rank keeps, how it loads it, and which ranks are
refused.

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

``load_shard`` gives a rank its part: read as slices of a safetensors checkpoint where it can (``shard_reader``),
else cut from the whole model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from ..model.falcon import FalconShape
from ..model.layerwise import Reader, StoredTensor, can_load_by_layers, load_by_layers
from ..model.loading import LoadSpec, load_engine, load_tokenizer, quantize, resolve_device_and_dtype
from ..lora.adapter import TARGETS, LoraAdapter, linear_shapes
from ..quantization.linear import Int8Linear
from ..quantization.schemes import QUANTIZED_BEFORE_THE_CUT, scheme_refusal

logger = logging.getLogger(__name__)

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


def load_shard(spec: LoadSpec, rank: int, world: int
                ) -> tuple[torch.nn.Module, object, FalconShape, list[dict[str, tuple[int, int]]]]:
    """This rank's shard of the checkpoint on the rank's device; also the whole model's linear shapes, which
    adapters are checked against.

    From a directory of safetensors files a rank reads only its slices, a decoder layer at a time
    (``load_by_layers`` with the cut made on the empty model): host memory holds one layer beyond the shard, and
    the ranks read their parts of the files at once. Otherwise (a Hub id, merged adapters, int8) it loads the whole
    checkpoint on the CPU and keeps its shard, the ranks one after another so that host memory holds one whole copy
    at a time (falcon-40b: 83 GB in bfloat16). int8 is quantized before the cut, each row's scale over the whole
    row, so that every rank computes with the very weights one process would; torchao's GPU schemes quantize each
    rank's shard on its GPU."""
    refusal = scheme_refusal(spec.quantization, spec.device,
                             torch.cuda.get_device_capability(rank) if spec.device == "cuda" else None)
    if refusal:
        raise SystemExit(refusal)
    if reads_slices(spec):
        return _read_shard(spec, rank, world)
    before_cut = spec.quantization if spec.quantization in QUANTIZED_BEFORE_THE_CUT else None
    engine = load_engine(dataclasses.replace(spec, device="cpu", quantization=before_cut))
    shape = shard_model(engine.model, engine.shape, rank, world)
    device = torch.device("cuda", rank) if spec.device == "cuda" else torch.device("cpu")
    if spec.quantization is not None and before_cut is None:
        quantize(engine.model, spec.quantization, device)
    return engine.model.to(device), engine.tokenizer, shape, engine.adapter_shapes


def reads_slices(spec: LoadSpec) -> bool:
    """Whether each rank reads only its slices of the checkpoint (``load_shard``), so they may load at once."""
    return (spec.quantization not in QUANTIZED_BEFORE_THE_CUT and not spec.merged_adapters
            and can_load_by_layers(spec.source))


def _read_shard(spec: LoadSpec, rank: int, world: int
                ) -> tuple[torch.nn.Module, object, FalconShape, list[dict[str, tuple[int, int]]]]:
    """This rank's slices of a safetensors checkpoint, read a layer at a time into the model cut on the meta
    device (``load_shard``)."""
    device_kind, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    whole: list[list[dict[str, tuple[int, int]]]] = []
    shapes: list[FalconShape] = []

    def cut(model: torch.nn.Module) -> None:
        whole.append(linear_shapes(model))
        shapes.append(shard_model(model, FalconShape(model.config), rank, world))

    before = time.monotonic()
    model = load_by_layers(spec.source, dtype, spec.quantization, device, cut, shard_reader(rank, world))
    logger.info("Rank %d read its 1/%d of %s's layers in %.1f s", rank, world, spec.source, time.monotonic() - before)
    return model, load_tokenizer(spec), shapes[0], whole[0]
