"""LoRA adapters in PEFT's format: reading and checking one against the loaded Falcon.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (older ones:
``adapter_model.bin``), whose keys look like
``base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight``. Each target linear layer ``W``
[out, in] gains ``scaling * B @ A`` with ``A`` [r, in] and ``B`` [out, r]; ``scaling`` is ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``). The delta is added to a layer's whole output, so the fused
query/key/value projection needs nothing per attention layout: ``B``'s rows follow ``W``'s, grouped or not.

Everything an adapter may hold that this server would not apply as PEFT does is refused, in one line naming the
adapter and the problem (``AdapterError``): DoRA, ``modules_to_save``, trained biases, other targets, per-module
rank or alpha patterns, shapes of another Falcon size, a rank above the maximum, a pickled ``.bin`` that does not
load with ``weights_only=True``, a missing or unreadable file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

# Falcon's linear layers a LoRA may target, and the block each lives in.
TARGETS = {"query_key_value": "self_attention", "dense": "self_attention", "dense_h_to_4h": "mlp",
           "dense_4h_to_h": "mlp"}
WEIGHT_KEY = re.compile(r"^base_model\.model\.transformer\.h\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter this server cannot serve; the message names the adapter and the problem."""


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's weights, scaling folded into ``B``: ``weights[(layer, target)] = (A [r, in], B [out, r])``."""

    name: str
    path: str
    rank: int
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    use_rslora: bool = False

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(target for _, target in self.weights)


def linear_shapes(model: torch.nn.Module) -> list[dict[str, tuple[int, int]]]:
    """Each layer's target linear layers as ``{target: (out, in)}``."""
    return [{target: tuple(getattr(getattr(layer, block), target).weight.shape) for target, block in TARGETS.items()}
            for layer in model.transformer.h]


def read_adapter(name: str, path: str | Path, shapes: list[dict[str, tuple[int, int]]], max_rank: int,
                 dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read and check the adapter in ``path`` against a model whose target layers have ``shapes``."""
    folder = Path(path)
    config = _read_config(name, folder)
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter {name}: adapter_config.json has no valid rank 'r' (got {rank!r})")
    if rank > max_rank:
        raise AdapterError(f"adapter {name}: rank {rank} is above --max_lora_rank {max_rank}")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = _read_weights(name, folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, target, which = _parse_key(name, key, len(shapes))
        pairs.setdefault((layer, target), {})[which] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name}: its weights file holds no LoRA weights")
    weights = {}
    for (layer, target), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name}: layer {layer} {target} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        out_features, in_features = shapes[layer][target]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"adapter {name}: layer {layer} {target} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but this model needs [{rank}, {in_features}] and [{out_features}, {rank}]: the adapter was made "
                "for another Falcon size")
        weights[(layer, target)] = (a.to(dtype).contiguous(), (b.float() * scaling).to(dtype).contiguous())
    return LoraAdapter(name=name, path=str(folder), rank=rank, weights=weights,
                       use_rslora=bool(config.get("use_rslora")))


def _read_config(name: str, folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"adapter {name}: {file} is missing (a PEFT adapter folder holds {CONFIG_FILE})")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name}: {file} is unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name}: {file} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name}: DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter {name}: modules_to_save {config['modules_to_save']} (whole trained layers) "
                           "are not supported; only LoRA weights are applied")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name}: trained biases (bias={config['bias']!r}) are not supported")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise AdapterError(f"adapter {name}: per-module {pattern} is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGETS]
        if unknown:
            raise AdapterError(f"adapter {name}: targets {unknown}, which this model does not have (Falcon's "
                               f"linear layers are {', '.join(TARGETS)})")
    return config


def _read_weights(name: str, folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_FILE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(folder / SAFETENSORS_FILE, device="cpu")
        except (OSError, SafetensorError) as exc:
            raise AdapterError(f"adapter {name}: {folder / SAFETENSORS_FILE} is unreadable: {exc}") from None
    if (folder / BIN_FILE).is_file():
        try:  # a pickle: only plain tensors are loaded, never code
            loaded = torch.load(folder / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any refusal of the unpickler, named in one line
            raise AdapterError(f"adapter {name}: {folder / BIN_FILE} does not load with weights_only=True "
                               f"({type(exc).__name__}); convert it to {SAFETENSORS_FILE}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AdapterError(f"adapter {name}: {folder / BIN_FILE} is not a dictionary of tensors")
        return loaded
    raise AdapterError(f"adapter {name}: {folder} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def _parse_key(name: str, key: str, layers: int) -> tuple[int, str, str]:
    """(layer, target, "A" | "B") of a saved key, or the refusal that names what the key holds instead."""
    match = WEIGHT_KEY.match(key)
    if match is None:
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"adapter {name}: DoRA weights ({key}) are not supported")
        if "modules_to_save" in key:
            raise AdapterError(f"adapter {name}: modules_to_save weights ({key}) are not supported")
        if key.endswith(".bias"):
            raise AdapterError(f"adapter {name}: trained biases ({key}) are not supported")
        raise AdapterError(f"adapter {name}: {key} is not a LoRA weight of Falcon's linear layers "
                           f"({', '.join(TARGETS)})")
    layer, block, target, which = int(match[1]), match[2], match[3], match[4]
    if TARGETS.get(target) != block:
        raise AdapterError(f"adapter {name}: targets {block}.{target}, which this model does not have (Falcon's "
                           f"linear layers are {', '.join(TARGETS)})")
    if layer >= layers:
        raise AdapterError(f"adapter {name}: has weights for layer {layer}, but this model has {layers} layers: "
                           "the adapter was made for another Falcon size")
    return layer, target, which
