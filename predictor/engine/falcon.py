"""Falcon's forward pass over the engine's KV cache, written here so that the cache holds only the K/V heads.

transformers' ``FalconAttention`` repeats the K/V groups to every query head before caching them (falcon-40b would
cache 128 heads where it has 8), and its cache grows by concatenation. This forward uses the modules and weights
``from_pretrained`` loaded, unchanged, in both attention layouts (falcon-7b's multi-query, falcon-40b's "new
decoder architecture"); it writes each new key and value into its sequence's row of ``KVCache`` and attends with
PyTorch's SDPA, which expands the groups at compute time (``enable_gqa``).

One call runs one scheduler step, packed: the decode tokens of the running rows first (one per row of the cache's
first ``rows``, free rows included as padding so that shapes stay static), then each prefill chunk. Linear layers see
all tokens at once; attention is per group: the decode rows against their rows' first ``columns`` columns, and each
chunk against its own row, causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .lora_bank import LoraStep


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``start .. start + length`` of the sequence in cache row ``row``, packed after the decode
    tokens at ``offset``."""

    row: int
    start: int
    length: int
    offset: int


@dataclass
class StepTensors:
    """One step's inputs on the model's first device; every tensor is [tokens] unless noted."""

    ids: torch.Tensor
    positions: torch.Tensor  # each token's position, which is also its cache column
    write_rows: torch.Tensor  # the cache row each token's key and value go to (padding rows: the scratch row)
    decode_mask: torch.Tensor | None  # [rows, columns] True where a decode row attends; None without decode rows
    chunks: tuple[Chunk, ...]
    keep: torch.Tensor  # indexes of the tokens whose next-token logits are wanted
    lora: LoraStep | None = None  # each token's adapter; None: no token of the step uses one


class FalconShape:
    """How one checkpoint's fused query/key/value projection splits into heads."""

    def __init__(self, config) -> None:
        if getattr(config, "alibi", False):
            raise ValueError("Falcon checkpoints with ALiBi positions (falcon-rw) are not supported: this server "
                             "serves falcon-7b and falcon-40b, which use rotary positions")
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.new_decoder_architecture = bool(config.new_decoder_architecture)
        self.multi_query = bool(config.multi_query)
        if self.new_decoder_architecture:
            self.kv_heads = config.num_kv_heads
        else:
            self.kv_heads = 1 if self.multi_query else self.heads
        self.parallel_attn = bool(config.parallel_attn)
        self.two_layer_norms = self.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[tokens, fused] -> queries [tokens, heads, dim], keys and values [tokens, kv_heads, dim]."""
        tokens, d = qkv.shape[0], self.head_dim
        if self.new_decoder_architecture:  # per K/V group: its query heads, then its key, then its value
            grouped = qkv.view(tokens, self.kv_heads, self.heads // self.kv_heads + 2, d)
            return grouped[:, :, :-2].reshape(tokens, self.heads, d), grouped[:, :, -2], grouped[:, :, -1]
        if self.multi_query:  # every query head, then the one key and value
            fused = qkv.view(tokens, self.heads + 2, d)
            return fused[:, :-2], fused[:, -2:-1], fused[:, -1:]
        fused = qkv.view(tokens, self.heads, 3, d)
        return fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]


def forward(model: torch.nn.Module, shape: FalconShape, cache: KVCache, step: StepTensors) -> torch.Tensor:
    """Run one step and write its keys and values into ``cache``; next-token logits [len(step.keep), vocab]."""
    transformer = model.transformer
    hidden = transformer.word_embeddings(step.ids)  # [tokens, hidden]
    cos, sin = _rotary(transformer.rotary_emb, step.positions, hidden.dtype)  # [tokens, 1, dim]
    for index, layer in enumerate(transformer.h):
        device = layer.self_attention.dense.weight.device  # layers may sit on several GPUs
        if hidden.device != device:
            hidden, cos, sin = hidden.to(device), cos.to(device), sin.to(device)
            step = _on(step, device)
        hidden = _layer(layer, shape, cache, index, hidden, cos, sin, step)
    hidden = hidden[step.keep.to(hidden.device)]
    hidden = transformer.ln_f(hidden.to(transformer.ln_f.weight.device))
    return model.lm_head(hidden)


def _layer(layer: torch.nn.Module, shape: FalconShape, cache: KVCache, index: int, hidden: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, step: StepTensors) -> torch.Tensor:
    """One decoder block, as transformers' ``FalconDecoderLayer`` computes it."""
    if shape.two_layer_norms:
        attention_in, mlp_in = layer.ln_attn(hidden), layer.ln_mlp(hidden)
    else:
        attention_in = mlp_in = layer.input_layernorm(hidden)
    attention = _attention(layer.self_attention, shape, cache, index, attention_in, cos, sin, step)
    residual = hidden
    if not shape.new_decoder_architecture and not shape.parallel_attn:
        residual = attention + residual
        mlp_in = layer.post_attention_layernorm(residual)
    mlp = layer.mlp  # FalconMLP's forward, with each linear layer open to LoRA
    out = _linear(mlp, "dense_4h_to_h", mlp.act(_linear(mlp, "dense_h_to_4h", mlp_in, step, index)), step, index)
    if shape.new_decoder_architecture or shape.parallel_attn:
        out = out + attention
    return out + residual


def _attention(module: torch.nn.Module, shape: FalconShape, cache: KVCache, index: int, hidden: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, step: StepTensors) -> torch.Tensor:
    q, k, v = shape.split(_linear(module, "query_key_value", hidden, step, index))  # [tokens, heads | kv_heads, dim]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    keys, values = cache.keys[index], cache.values[index]  # [rows + 1, kv_heads, capacity, dim]
    keys[step.write_rows, :, step.positions] = k
    values[step.write_rows, :, step.positions] = v
    gqa = shape.kv_heads != shape.heads
    parts = []
    if step.decode_mask is not None:
        rows, columns = step.decode_mask.shape
        out = F.scaled_dot_product_attention(q[:rows].unsqueeze(2), keys[:rows, :, :columns],
                                             values[:rows, :, :columns], attn_mask=step.decode_mask[:, None, None],
                                             enable_gqa=gqa)  # [rows, heads, 1, dim]
        parts.append(out.squeeze(2))
    for chunk in step.chunks:
        end = chunk.start + chunk.length
        query = q[chunk.offset:chunk.offset + chunk.length].transpose(0, 1)[None]  # [1, heads, length, dim]
        row = slice(chunk.row, chunk.row + 1)
        if chunk.start == 0:
            out = F.scaled_dot_product_attention(query, keys[row, :, :end], values[row, :, :end], is_causal=True,
                                                 enable_gqa=gqa)
        else:  # a later chunk sees the columns before it and itself causally
            mask = torch.ones(chunk.length, end, dtype=torch.bool, device=q.device).tril(chunk.start)
            out = F.scaled_dot_product_attention(query, keys[row, :, :end], values[row, :, :end], attn_mask=mask,
                                                 enable_gqa=gqa)
        parts.append(out[0].transpose(0, 1))  # [length, heads, dim]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return _linear(module, "dense", out.reshape(out.shape[0], -1), step, index)


def _linear(block: torch.nn.Module, target: str, x: torch.Tensor, step: StepTensors, index: int) -> torch.Tensor:
    """Linear layer ``target`` of ``block`` in layer ``index``, plus what the step's LoRA adapters add to it."""
    out = getattr(block, target)(x)
    return step.lora.apply(index, target, x, out) if step.lora is not None else out


def _rotary(rotary: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rotary cos and sin for each token's position [tokens, 1, dim], as ``FalconRotaryEmbedding`` makes them."""
    freqs = positions[:, None].float() * rotary.inv_freq.to(positions.device, torch.float)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = rotary.attention_scaling
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _on(step: StepTensors, device: torch.device) -> StepTensors:
    mask = step.decode_mask.to(device) if step.decode_mask is not None else None
    lora = step.lora.to(device) if step.lora is not None else None
    return StepTensors(step.ids.to(device), step.positions.to(device), step.write_rows.to(device), mask,
                       step.chunks, step.keep, lora)
