"""Loading a quantized checkpoint a decoder layer at a time, so that memory peaks at the quantized model plus one
unquantized layer rather than the whole unquantized model (falcon-40b: 42 GB in 8 bits, not 84 GB in bfloat16).

The model is built with empty weights (accelerate's ``init_empty_weights``: parameters on the meta device, the
rotary buffers real); each layer's tensors are then read from the safetensors files, converted to the serving dtype,
quantized and moved to the device before the next layer is read. The files are read with plain reads at the offsets
their headers give, not memory-mapped: a mapping keeps every page it touched resident in the process (counted in its
memory, as a pod's limit counts it) until it is closed, which would hold the whole unquantized checkpoint again.
Embeddings, layer norms and ``lm_head`` (tied to the embeddings) follow. Checkpoints without safetensors files, and
those with merged adapters (which need a layer's unquantized weights with every adapter's delta), load whole
through ``from_pretrained`` instead (``loading.load_engine``).

A tensor-parallel rank loads the same way, with its cut made on the empty model first (``cut``) and each tensor
read as the rank keeps it (``reader``): a layer split by output rows is one contiguous byte range per rank, one split
by input columns a range per row, so a rank reads its slices and not the rest of the file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..lora.adapter import TARGETS
from ..quantization.linear import quantize_layer
from ..quantization.schemes import BYTES_PER_WEIGHT

logger = logging.getLogger(__name__)
LAYER_PREFIX = "transformer.h."
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (its header says)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int

    def read(self, rows: tuple[int, int] | None = None, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its ``rows`` or (2-D) ``columns`` ``(start, count)``: the other bytes are not read."""
        shape, start, itemsize = list(self.shape), self.start, self.dtype.itemsize
        row_bytes = itemsize * (shape[1] if len(shape) > 1 else 1)
        if rows is not None:
            start, shape[0] = start + rows[0] * row_bytes, rows[1]
        ranges = [(start, shape[0] * row_bytes)]
        if columns is not None:
            shape[1] = columns[1]
            ranges = [(start + row * row_bytes + columns[0] * itemsize, columns[1] * itemsize)
                      for row in range(shape[0])]
        data = bytearray(sum(length for _, length in ranges))
        view, at = memoryview(data), 0
        with self.path.open("rb") as file:
            for offset, length in ranges:
                if os.preadv(file.fileno(), [view[at:at + length]], offset) != length:
                    raise OSError(f"{self.path} ends inside a tensor its header lists")
                at += length
        return torch.frombuffer(data, dtype=self.dtype).view(shape)


# How a process keeps one stored tensor: its value (a slice, for a tensor-parallel rank), or None if it keeps none.
Reader = Callable[[str, StoredTensor], "torch.Tensor | None"]


def read_whole(name: str, stored: StoredTensor) -> torch.Tensor:
    return stored.read()


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file: an 8-byte header length, a JSON header, then the data."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: StoredTensor(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + entry["data_offsets"][0],
                               base + entry["data_offsets"][1]) for name, entry in header.items()}


def can_load_by_layers(source: str) -> bool:
    """Whether ``source`` is a local directory of safetensors files holding every weight of the model its config
    describes. A Hub id is loaded whole; so is a checkpoint that lacks weights, which ``from_pretrained``
    initialises (with its warning), as a benchmark's random-weights checkpoint relies on."""
    if not (Path(source).is_dir() and any(Path(source).glob("*.safetensors"))):
        return False
    stored = {name for path in Path(source).glob("*.safetensors") for name in stored_tensors(path)}
    return {name for name, _ in _parameters(AutoConfig.from_pretrained(source), torch.float32)} <= stored


def planned_weight_bytes(source: str, dtype: torch.dtype, scheme: str | None) -> int:
    """Bytes the weights of the checkpoint at ``source`` (its config alone is read) will take loaded as ``dtype``
    with its linear layers in ``scheme``: known before anything is loaded, so that a model that cannot fit is
    refused in one line rather than by the allocator. Buffers (the rotary tables) are left out."""
    linear = tuple(f".{block}.{target}.weight" for target, block in TARGETS.items())
    return sum(int(tensor.numel() * (BYTES_PER_WEIGHT[scheme] if scheme is not None and name.endswith(linear)
                                     else dtype.itemsize))
               for name, tensor in _parameters(AutoConfig.from_pretrained(source), dtype))


def _parameters(config, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of the model ``config`` describes, by name, on the meta device (tied ones once). Built from
    a one-layer model, its layer's parameters repeated under every layer's name: Falcon's decoder layers are alike,
    and building falcon-40b's 60 on the meta device takes seconds."""
    one = copy.copy(config)
    one.num_hidden_layers = 1
    layer = f"{LAYER_PREFIX}0."
    named = []
    for name, tensor in _empty_model(one, dtype).named_parameters():
        if name.startswith(layer):
            rest = name[len(layer):]
            named += [(f"{LAYER_PREFIX}{index}.{rest}", tensor) for index in range(config.num_hidden_layers)]
        else:
            named.append((name, tensor))
    return named


def _empty_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``config`` describes, its parameters on the meta device (no memory), its rotary buffers real."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # lm_head is the embedding, as loading makes it
    return model


@torch.no_grad()
def load_by_layers(source: str, dtype: torch.dtype, scheme: str | None, device: torch.device,
                   cut: Callable[[torch.nn.Module], None] = lambda model: None, reader: Reader = read_whole
                   ) -> torch.nn.Module:
    """The checkpoint in directory ``source`` with its linear layers in ``scheme`` (None: as stored), on
    ``device``, read a decoder layer at a time; ``cut`` shapes the empty model as this process keeps it, and
    ``reader`` reads each tensor to match (module docstring)."""
    model = _empty_model(AutoConfig.from_pretrained(source), dtype)
    cut(model)
    where = {name: tensor for path in sorted(Path(source).glob("*.safetensors"))
             for name, tensor in stored_tensors(path).items()}
    by_layer: dict[int, list[str]] = {}
    for name in where:
        if name.startswith(LAYER_PREFIX):
            by_layer.setdefault(int(name[len(LAYER_PREFIX):].split(".")[0]), []).append(name)
    def place(name: str, on: torch.device | str) -> None:
        if (value := reader(name, where[name])) is not None:
            set_module_tensor_to_device(model, name, on, value=value, dtype=dtype)

    for index, layer in enumerate(model.transformer.h):
        for name in by_layer.get(index, []):
            place(name, "cpu")
        if device.type == "cuda":
            layer.to(device)  # torchao quantizes on the GPU
        if scheme is not None:
            quantize_layer(layer, scheme)
        layer.to(device)
    for name in where:
        if not name.startswith(LAYER_PREFIX):
            place(name, device)
    model.tie_weights()
    missing = [name for name, tensor in model.named_parameters() if tensor.device.type == "meta"]
    if missing:
        raise SystemExit(f"{source} is not a complete Falcon checkpoint: no weights for {', '.join(missing[:3])}")
    model.to(device)  # the rotary buffers
    if (Path(source) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model.eval()
