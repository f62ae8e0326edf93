"""Falcon's four linear layers in 8 or 4 bits, quantized in place after loading (and after any merged adapter and
tensor-parallel cut, so each rank quantizes its own shard).

``int8`` is this module's own ``Int8Linear``, as gpt-fast's ``WeightOnlyInt8Linear``: torchao 0.18's int8
weight-only tensor dequantizes the whole weight on every call on the CPU (measured about 10x slower than the
unquantized layer), where PyTorch's ``_weight_int8pack_mm`` reads the int8 weight directly. ``fp8`` and ``int4``
are torchao's GPU tensors (``quantize_``). Embeddings, layer norms and ``lm_head`` stay in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lora.adapter import TARGETS
from .schemes import INT4_GROUP_SIZE

INT8_MAX = 127
QUANTIZE_ROWS = 256  # rows quantized at a time


class Int8Linear(torch.nn.Module):
    """A weight-only int8 linear layer: ``weight`` int8 [out, in] and one bfloat16 ``scale`` per output row
    (symmetric, as a row's largest weight over 127). ``weight`` keeps its name and shape, so what reads a linear
    layer's shape or device (LoRA, the cache budget) reads it here too."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
        # In blocks of rows, so that the float32 copies stay small beside the layer (loading peaks at the quantized
        # model and one layer). The scale is rounded to bfloat16 (the kernel's) before the weights are divided by
        # it, so that rounding costs nothing: a weight's error is at most half a step, a row's largest weight / 254.
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            rows = weight[start:start + QUANTIZE_ROWS].float()
            block = (rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float).tiny) / INT8_MAX).bfloat16()
            quantized[start:start + QUANTIZE_ROWS] = (rows / block.float()[:, None]).round().clamp(-INT8_MAX, INT8_MAX)
            scale[start:start + QUANTIZE_ROWS] = block
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(quantized, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [tokens, in]
        if x.device.type == "cpu":
            # The CPU kernel multiplies bfloat16 activations by the int8 weight, scaling each output column.
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), self.weight,
                                            self.scale).to(x.dtype)
        else:  # dequantized into the matmul (fused by --compile)
            out = F.linear(flat, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight it computes with [out, in]: what a reference model (PEFT, tests) loads."""
        return (self.weight.float() * self.scale.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_linears(model: torch.nn.Module, scheme: str, device: torch.device | None = None) -> None:
    """Quantize the four linear layers of every decoder layer of ``model`` to ``scheme``, in place, one decoder
    layer at a time; with ``device``, each layer is moved there first (so that a GPU holds the quantized layers and
    one unquantized layer, never the whole model unquantized)."""
    for layer in model.transformer.h:
        if device is not None:
            layer.to(device)
        quantize_layer(layer, scheme)


def quantize_layer(layer: torch.nn.Module, scheme: str) -> None:
    """Quantize one decoder layer's four linear layers to ``scheme``, in place, where the layer lies."""
    for target, block in TARGETS.items():
        parent = getattr(layer, block)
        linear = getattr(parent, target)
        if scheme == "int8":
            setattr(parent, target, Int8Linear.from_linear(linear))
        else:
            _quantize_with_torchao(linear, scheme)


def _quantize_with_torchao(linear: torch.nn.Linear, scheme: str) -> None:
    from torchao.quantization import (  # noqa: PLC0415 - GPU schemes only
        Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, PerRow, quantize_)

    if scheme == "fp8":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    quantize_(linear, config, filter_fn=lambda module, name: module is linear)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take as held: parameters and buffers (int8 weights and their scales), a
    tensor subclass (torchao's) counted by its own storage."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights counted once
    return sum(_nbytes(t) for t in tensors.values())


def _nbytes(tensor: torch.Tensor) -> int:
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = inner()
        return sum(_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
