"""Falcon's forward pass over the engine's KV cache, written here so that the cache holds only the K/V heads.

transformers' ``FalconAttention`` repeats the K/V groups to every query head before caching them (falcon-40b would
cache 128 heads where it has 8), and its cache grows by concatenation. This forward uses the modules and weights
``from_pretrained`` loaded, unchanged, in both attention layouts (falcon-7b's multi-query, falcon-40b's "new
decoder architecture"); it writes each new key and value into its sequence's row of ``KVCache`` and expands the
groups only at compute time (prefill chunks with PyTorch's SDPA and ``enable_gqa``).

One call runs one scheduler step, packed: the decode tokens of the running rows first (a compiled step pads them to
a static count with tokens that write the scratch row), then each prefill chunk. Linear layers see all tokens at
once; attention is per group: the decode tokens against their own rows (a ``DecodePlan``), and each chunk against
its own row, causally.

Decode attention reads what the running rows hold, not rows x the longest row: beside one 1,900-token conversation,
63 short streams still read their own few columns, and a token's result depends on its own row only (to rounding,
within its group). An eager step groups the decode tokens by length (``DecodeGroups``: rows between half and all of
a group's width), each group one SDPA call over its own rows and width, in which the query heads sharing a K/V head
are that head's queries (no K/V head is repeated); a row reads less than twice its own columns, in a few large
calls. A compiled step needs static shapes whatever the lengths, so it goes block by block (``DecodeBlocks``): every
(token, block of ``DECODE_BLOCK`` columns of its row) pair is one small product of a batched one, padded to a static
pair count, the softmax taken over each token's blocks together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kv_cache import KVCache, LayerCache
from ..lora.bank import LoraStep
from ..transfer import move, to_device

DECODE_BLOCK = 64  # cache columns per block of decode attention: a row reads its length rounded up to this


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``start .. start + length`` of the sequence in cache row ``row``, packed after the decode
    tokens at ``offset``."""

    row: int
    start: int
    length: int
    offset: int


@dataclass
class DecodeGroup:
    """Decode tokens whose rows are about as long, attended over the group's own width, ``mask.shape[1]``."""

    tokens: torch.Tensor  # [n] their indexes among the step's decode tokens
    rows: torch.Tensor | slice  # [n] their cache rows; a slice where they are consecutive (read in place, no copy)
    mask: torch.Tensor  # [n, width] True for the columns at or before each token's position


@dataclass
class DecodeGroups:
    """An eager step's decode tokens, grouped by length; every token in exactly one group."""

    groups: tuple[DecodeGroup, ...]
    tokens: int

    def attend(self, shape: FalconShape, cache: LayerCache, q: torch.Tensor) -> torch.Tensor:
        """Each decode token's attention over its own row [tokens, heads, dim]: one SDPA call per group, over the
        group's rows and width."""
        out = torch.empty_like(q)
        heads, dim = q.shape[1:]
        for group in self.groups:
            width = group.mask.shape[1]
            k, v = cache.read(group.rows, width)  # [n, kv_heads, width, dim]
            # The query heads sharing a K/V head are that head's queries: [n, kv_heads, heads per K/V head, dim].
            grouped = q[group.tokens].view(-1, shape.kv_heads, heads // shape.kv_heads, dim)
            attended = F.scaled_dot_product_attention(grouped, k, v, attn_mask=group.mask[:, None, None, :])
            out[group.tokens] = attended.view(-1, heads, dim)
        return out


@dataclass
class DecodeBlocks:
    """The cache blocks the decode tokens of a compiled step attend over: one entry per (decode token, block of its
    row) pair, each token's pairs together. Padding pairs (for a static count) read the scratch row for a dummy
    token, ``tokens``."""

    tokens: torch.Tensor  # [decode tokens]: their indexes, 0 .. tokens - 1 (its length is the decode token count)
    rows: torch.Tensor  # [pairs] the cache row a block lies in
    blocks: torch.Tensor  # [pairs] which block of that row
    owners: torch.Tensor  # [pairs] the decode token it serves
    mask: torch.Tensor  # [pairs, DECODE_BLOCK] True for the block's columns at or before its token's position

    def attend(self, shape: FalconShape, cache: LayerCache, q: torch.Tensor) -> torch.Tensor:
        return _block_attention(shape, cache, q, self)


DecodePlan = DecodeGroups | DecodeBlocks


@dataclass
class StepTensors:
    """One step's inputs on the model's first device; every tensor is [tokens] unless noted."""

    ids: torch.Tensor
    positions: torch.Tensor  # each token's position, which is also its cache column
    write_rows: torch.Tensor  # the cache row each token's key and value go to (padding rows: the scratch row)
    decode: DecodePlan | None  # None without decode tokens
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
        # Tensor parallelism (``parallel``): this rank holds some K/V groups and part of the MLP, so a layer's
        # attention + MLP output is a partial sum that this adds up over the ranks, once per layer.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

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
            step = moved(step, device)
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
    if shape.reduce is not None:
        out = shape.reduce(out)
    return out + residual


def _attention(module: torch.nn.Module, shape: FalconShape, cache: KVCache, index: int, hidden: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, step: StepTensors) -> torch.Tensor:
    q, k, v = shape.split(_linear(module, "query_key_value", hidden, step, index))  # [tokens, heads | kv_heads, dim]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    layer = cache.layer(index)  # [rows + 1, kv_heads, capacity, dim], read in the model's dtype
    layer.write(step.write_rows, step.positions, k, v)
    gqa = shape.kv_heads != shape.heads
    parts = []
    decode = step.decode
    if decode is not None:
        tokens = decode.tokens if isinstance(decode, DecodeGroups) else decode.tokens.shape[0]
        parts.append(decode.attend(shape, layer, q[:tokens]))
    for chunk in step.chunks:
        end = chunk.start + chunk.length
        query = q[chunk.offset:chunk.offset + chunk.length].transpose(0, 1)[None]  # [1, heads, length, dim]
        keys, values = layer.read(slice(chunk.row, chunk.row + 1), end)  # [1, kv_heads, end, dim]
        if chunk.start == 0:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)
        else:  # a later chunk sees the columns before it and itself causally
            mask = torch.ones(chunk.length, end, dtype=torch.bool, device=q.device).tril(chunk.start)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa)
        parts.append(out[0].transpose(0, 1))  # [length, heads, dim]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return _linear(module, "dense", out.reshape(out.shape[0], -1), step, index)


def _linear(block: torch.nn.Module, target: str, x: torch.Tensor, step: StepTensors, index: int) -> torch.Tensor:
    """Linear layer ``target`` of ``block`` in layer ``index``, plus what the step's LoRA adapters add to it."""
    out = getattr(block, target)(x)
    return step.lora.apply(index, target, x, out) if step.lora is not None else out


def _block_attention(shape: FalconShape, cache: LayerCache, q: torch.Tensor, plan: DecodeBlocks) -> torch.Tensor:
    """Each decode token's attention over its own row's blocks [tokens, heads, dim] (see the module docstring)."""
    tokens, heads, dim = q.shape
    kv_heads, groups = shape.kv_heads, heads // shape.kv_heads
    blocks_per_row = cache.keys.shape[2] // DECODE_BLOCK
    # Each pair's block of each K/V head, as one index into the cache seen as [row, head, block]: one plain copy
    # of whole blocks (index_select), far cheaper than indexing two dimensions around a third.
    heads_of_row = plan.rows[:, None] * kv_heads + torch.arange(kv_heads, device=q.device)  # [pairs, kv_heads]
    index = (heads_of_row * blocks_per_row + plan.blocks[:, None]).flatten()
    k, v = (t.view(-1, kv_heads, DECODE_BLOCK, dim) for t in cache.read_blocks(index, DECODE_BLOCK))
    q = torch.cat((q, q.new_zeros(1, heads, dim)))[plan.owners]  # [pairs, heads, dim]; the dummy token last
    q = q.view(-1, kv_heads, groups, dim)  # query heads grouped by the K/V head they share
    scores = (q @ k.transpose(-1, -2)).float() * dim**-0.5  # [pairs, kv_heads, groups, block]
    scores = scores.masked_fill(~plan.mask[:, None, None, :], float("-inf"))
    slots = (tokens + 1, kv_heads, groups)
    block_top = scores.amax(-1)  # [pairs, kv_heads, groups]
    top = scores.new_full(slots, float("-inf")).scatter_reduce_(0, plan.owners[:, None, None].expand_as(block_top),
                                                                 block_top, "amax")
    weights = torch.exp(scores - top[plan.owners][..., None])
    total = scores.new_zeros(slots).index_add_(0, plan.owners, weights.sum(-1))
    out = scores.new_zeros(*slots, dim).index_add_(0, plan.owners, (weights.to(v.dtype) @ v).float())
    # A padding token of a compiled step has no blocks: 0 / 0 would be NaN, so its (unused) output is 0.
    out = out[:tokens] / total[:tokens, ..., None].clamp_min(torch.finfo(torch.float).tiny)
    return out.to(q.dtype).view(tokens, heads, dim)


def _rotary(rotary: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rotary cos and sin for each token's position [tokens, 1, dim], as ``FalconRotaryEmbedding`` makes them."""
    freqs = positions[:, None].float() * rotary.inv_freq.to(positions.device, torch.float)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = rotary.attention_scaling
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def moved(value, device: torch.device):
    """``value`` (a dataclass of tensors, its nested dataclasses and tuples of them too) with every tensor on
    ``device``: a step's inputs for the GPU that holds a layer, or sent to another rank."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(moved(item, device) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: moved(getattr(value, field.name), device)
                                             for field in dataclasses.fields(value) if field.init})
    return value


def decode_groups(positions: list[int], rows: list[int], device: torch.device) -> DecodePlan | None:
    """An eager step's decode tokens at ``positions`` of cache ``rows``, grouped by length: a group holds the rows
    of ``DECODE_BLOCK`` columns or fewer, then those of (64, 128], (128, 256], ... columns, each group attending over
    its longest row's columns, so that a row reads less than twice its own."""
    if not positions:
        return None
    members: dict[int, list[int]] = {}
    for token, position in enumerate(positions):
        members.setdefault((position // DECODE_BLOCK).bit_length(), []).append(token)
    groups = []
    for tokens in members.values():
        tokens.sort(key=rows.__getitem__)
        at, rows_read = torch.tensor([positions[token] for token in tokens]), [rows[token] for token in tokens]
        consecutive = rows_read == list(range(rows_read[0], rows_read[0] + len(rows_read)))
        mask = torch.arange(int(at.max()) + 1) <= at[:, None]
        groups.append(DecodeGroup(tokens=to_device(tokens, device, torch.long),
                                  rows=(slice(rows_read[0], rows_read[-1] + 1) if consecutive
                                        else to_device(rows_read, device, torch.long)),
                                  mask=move(mask, device)))
    return DecodeGroups(tuple(groups), len(positions))


def decode_blocks(positions: list[int], rows: list[int], tokens: int, blocks: int, scratch: int,
                   device: torch.device) -> DecodeBlocks:
    """The blocks a compiled step's decode tokens at ``positions`` of cache ``rows`` read: each its row's blocks up
    to its own column. ``tokens`` and ``blocks`` pad both counts (a static shape); padding pairs read the scratch
    row's first column for a dummy token, ``tokens``."""
    pair_rows, pair_blocks, owners, limits = [], [], [], []  # limits: the last column each pair's token sees
    for token, (position, row) in enumerate(zip(positions, rows)):
        count = position // DECODE_BLOCK + 1
        pair_rows += [row] * count
        pair_blocks += range(count)
        owners += [token] * count
        limits += [position] * count
    padding = blocks - len(owners)
    pair_rows += [scratch] * padding
    pair_blocks += [0] * padding
    owners += [tokens] * padding
    limits += [0] * padding
    block = torch.tensor(pair_blocks, dtype=torch.long)
    mask = block[:, None] * DECODE_BLOCK + torch.arange(DECODE_BLOCK) <= torch.tensor(limits)[:, None]
    return DecodeBlocks(tokens=torch.arange(tokens, device=device),
                        rows=to_device(pair_rows, device, torch.long), blocks=move(block, device),
                        owners=to_device(owners, device, torch.long), mask=move(mask, device))
