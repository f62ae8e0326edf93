"""The KV cache: every running sequence's keys and values, reserved once at start-up, holding only the K/V heads.

Layout: per layer, keys and values of ``[rows + 1, kv_heads, capacity, head_dim]`` (``capacity`` is the context
length). Each sequence owns one row from column 0, its token at position ``p`` in column ``p``, so a row needs no
padding, no mask of its own beyond its length, and no neighbour: joining writes only the joining sequence's row,
leaving moves nothing. Rows reserve the whole context, so a running sequence never runs out of room and never has to
be preempted; admission asks only for a free row. The extra last row is scratch: padding rows of a static-shape step
write there, so they never disturb a row's contents.

A step reads the running rows only, each up to its own length, wherever they lie. Rows are still handed out low first,
as when a step computed every row below the highest running one; a new sequence could now take the row of its own
cached prefix, or the least recently used one, without moving anything. A free row keeps what it held: its tokens are indexed by a hash chain over blocks of ``BLOCK_SIZE``
tokens, and a new sequence whose prompt begins with a cached prefix copies those columns instead of computing them
(the copy is of that prefix only). Prefixes live in free rows and in running ones (concurrent requests with one
system prompt, or ``num_return_sequences`` > 1, share it). A new sequence takes the lowest free row, whose cached
tokens move up to the least recently used free row (one copy of that row), so running rows stay packed low while
prefixes are evicted least recently used first; cached prefixes never take a row from a running request.

With ``fp8`` (``--kv_cache_dtype fp8``) keys and values are stored as float8 e4m3, each token's head scaled by its
largest value over e4m3's largest (448) with a bfloat16 scale beside it: 66 bytes per head of 64 where bfloat16
takes 128, so a budget holds 1.94x the rows. Attention reads them back in the model's dtype (``LayerCache``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SCALE_DTYPE = torch.bfloat16  # an fp8 head's scale: the range of float32 in 2 bytes
BLOCK_SIZE = 16  # tokens per block of the prefix index: a prefix is reused in whole blocks
# Sequences run at once by default, when the memory holds them: vLLM's defaults (``get_batch_defaults``), 1,024 on
# GPUs of 70 GiB or more other than the A100 (where it measured no gain past 256), 256 elsewhere.
ROW_CAP = 256
LARGE_GPU_ROW_CAP = 1024
LARGE_GPU_GIB = 70


@dataclass(frozen=True)
class CacheShape:
    """What one token costs: layers, K/V heads and head size, in a dtype (the model's, which attention computes
    in), stored as it is or, with ``fp8``, as float8 with a scale per head."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    fp8: bool = False

    @property
    def bytes_per_token(self) -> int:
        per_head = (self.head_dim * FP8.itemsize + SCALE_DTYPE.itemsize if self.fp8
                    else self.head_dim * self.dtype.itemsize)
        return 2 * self.layers * self.kv_heads * per_head

    @property
    def storage(self) -> str:
        """How a head is stored, for the start-up log."""
        return "fp8 e4m3 + a bfloat16 scale per head" if self.fp8 else str(self.dtype).removeprefix("torch.")


@dataclass
class LayerCache:
    """One layer's keys and values, written and read by attention in the model's dtype whatever the cache stores.
    Rows are an index tensor or a slice; every read is [rows, kv_heads, columns, head_dim]."""

    keys: torch.Tensor  # [rows + 1, kv_heads, capacity, head_dim]
    values: torch.Tensor
    key_scales: torch.Tensor | None  # [rows + 1, kv_heads, capacity] with fp8, else None
    value_scales: torch.Tensor | None
    dtype: torch.dtype

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each token's key and value [tokens, kv_heads, dim] into column ``positions`` of cache row ``rows``."""
        if self.key_scales is None:
            self.keys[rows, :, positions] = k
            self.values[rows, :, positions] = v
            return
        self.keys[rows, :, positions], self.key_scales[rows, :, positions] = to_fp8(k)
        self.values[rows, :, positions], self.value_scales[rows, :, positions] = to_fp8(v)

    def read(self, rows: torch.Tensor | slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``width`` columns of ``rows``: keys and values [rows, kv_heads, width, dim]."""
        k, v = self.keys[rows, :, :width], self.values[rows, :, :width]
        if self.key_scales is None:
            return k, v
        return (from_fp8(k, self.key_scales[rows, :, :width], self.dtype),
                from_fp8(v, self.value_scales[rows, :, :width], self.dtype))

    def read_blocks(self, index: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks of ``block`` columns, ``index`` counting them over the cache seen as [row, head, block]: keys and
        values [len(index), block, dim]."""
        dim = self.keys.shape[-1]
        k = self.keys.view(-1, block, dim).index_select(0, index)
        v = self.values.view(-1, block, dim).index_select(0, index)
        if self.key_scales is None:
            return k, v
        return (from_fp8(k, self.key_scales.view(-1, block).index_select(0, index), self.dtype),
                from_fp8(v, self.value_scales.view(-1, block).index_select(0, index), self.dtype))


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., dim] as float8 e4m3 and a scale per vector [...]: its largest value maps to e4m3's largest."""
    scale = (x.float().abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float).tiny).to(SCALE_DTYPE)
    return (x.float() / scale.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def from_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) * scale.to(dtype)[..., None]


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix: ``tokens`` columns of row ``row`` hold the first ``tokens`` of the prompt."""

    row: int
    tokens: int


class KVCache:
    """The reserved rows, which sequence holds which, and the prefix index (see the module docstring)."""

    def __init__(self, shape: CacheShape, rows: int, capacity: int, devices: list[torch.device]) -> None:
        """``devices`` holds each layer's device (accelerate may split the layers over several GPUs)."""
        self.shape, self.rows, self.capacity = shape, rows, capacity
        self.nbytes = rows * capacity * shape.bytes_per_token
        size = (rows + 1, shape.kv_heads, capacity, shape.head_dim)
        try:
            stored = FP8 if shape.fp8 else shape.dtype
            self.keys = [torch.zeros(size, dtype=stored, device=d) for d in devices]
            self.values = [torch.zeros(size, dtype=stored, device=d) for d in devices]
            scales = [torch.zeros(size[:-1], dtype=SCALE_DTYPE, device=d) for d in devices for _ in "kv"]
            self.key_scales, self.value_scales = (scales[0::2], scales[1::2]) if shape.fp8 else (None, None)
        except (torch.OutOfMemoryError, RuntimeError):  # RuntimeError: the CPU allocator's refusal
            raise MemoryError(
                f"the KV cache needs {self.nbytes / 2**30:.2f} GiB ({rows} rows x {capacity} tokens x "
                f"{shape.bytes_per_token:,} bytes) and does not fit: lower --kv_cache_memory or "
                "--max_batch_size") from None
        self.scratch_row = rows
        self._free = set(range(rows))
        self._lengths = [0] * rows  # tokens whose keys and values a row holds
        self._tokens: list[list[int]] = [[] for _ in range(rows)]  # those tokens, for the prefix index
        self._blocks: dict[int, set[int]] = {}  # hash of a chain of blocks -> rows that hold it
        self._row_blocks: list[list[int]] = [[] for _ in range(rows)]  # the chain hashes a row is indexed under
        # What a row's chain starts from: keys and values computed with a LoRA adapter are that adapter's alone.
        self._salts: list[object] = [None] * rows
        self._last_used = [0] * rows
        self._clock = itertools.count(1)
        self.used_tokens = 0  # tokens held by running rows
        self.copies: list[tuple[int, int, int]] | None = None  # row copies not yet told to the other ranks

    def layer(self, index: int) -> LayerCache:
        """Layer ``index``'s keys and values, as attention writes and reads them."""
        scales = self.key_scales is not None
        return LayerCache(self.keys[index], self.values[index], self.key_scales[index] if scales else None,
                          self.value_scales[index] if scales else None, self.shape.dtype)

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (a compiled step marks their addresses static)."""
        return self.keys + self.values + (self.key_scales + self.value_scales if self.key_scales else [])

    # -- rows ----------------------------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Reserved token room that running sequences hold, 0-1."""
        return self.used_tokens / (self.rows * self.capacity)

    def allocate(self, running: int, prefix: PrefixHit | None = None, salt: object = None) -> int:
        """A free row for a new sequence, holding ``prefix`` already when one is given (found with the same
        ``salt``: the sequence's adapter, None for the base model).

        Rows are handed out low first (see the module docstring): the row is
        the prefix's own when that is among the rows a step of ``running + 1`` sequences computes (nothing to copy),
        else the lowest free one. What that row held moves to a row above, unless every free row holds something
        used more recently: prefixes are evicted least recently used first, wherever they lie."""
        if not self._free:
            raise RuntimeError("no free KV cache row")  # the scheduler admits only what fits
        window = _bucket(running + 1)
        if prefix is not None and prefix.row < window and prefix.row in self._free:
            row, keep = prefix.row, prefix.tokens
        else:
            row, keep = min(self._free), 0
            moved = self._keep_elsewhere(row, window, prefix.row if prefix is not None else None)
            if prefix is not None and prefix.row == row:
                prefix = PrefixHit(moved, prefix.tokens) if moved is not None else None
        self._free.discard(row)
        self._forget(row, keep=keep)
        self._salts[row] = salt
        self.used_tokens += keep
        if prefix is not None and row != prefix.row:
            self.copy_prefix(prefix.row, row, prefix.tokens)
        return row

    def _keep_elsewhere(self, row: int, window: int, wanted: int | None) -> int | None:
        """Move free ``row``'s cached tokens to the least recently used free row above ``window`` when that one
        was used longer ago (an empty row, first); the row they went to, or None. Row ``wanted`` holds the prefix
        being taken: it is copied from next, so it is never the one overwritten."""
        if not self._lengths[row]:
            return None
        above = [r for r in self._free if r >= window and r != wanted]
        if not above:
            return None
        target = min(above, key=lambda r: (self._lengths[r] > 0, self._last_used[r], r))
        if self._lengths[target] and self._last_used[target] > self._last_used[row]:
            return None
        self._forget(target, keep=0)
        length = self._lengths[row]
        self.copy_columns(row, target, length)
        self._tokens[target], self._tokens[row] = self._tokens[row], []
        self._row_blocks[target], self._row_blocks[row] = self._row_blocks[row], []
        self._salts[target] = self._salts[row]
        for key in self._row_blocks[target]:
            holders = self._blocks[key]
            holders.discard(row)
            holders.add(target)
        self._lengths[target], self._lengths[row] = length, 0
        self._last_used[target] = self._last_used[row]
        return target

    def release(self, row: int, keep: bool = True) -> None:
        """The sequence in ``row`` ended; its contents stay, indexed, until the row is needed again (``keep``: the
        prefix cache may find them), or are forgotten now: without prefix caching nothing would find them, and the
        next sequence to take the row would first move them to a free row above (a copy, and a search of the free
        rows, per admission)."""
        self.used_tokens -= self._lengths[row]
        if not keep:
            self._forget(row, keep=0)
        self._last_used[row] = next(self._clock)
        self._free.add(row)

    def clear(self) -> None:
        """Forget every row (after a failed step, whose writes may be partial)."""
        for row in range(self.rows):
            self._forget(row, keep=0)
        self._free = set(range(self.rows))
        self.used_tokens = 0

    # -- what a row holds -------------------------------------------------------------------------------------
    def extend(self, row: int, tokens: list[int] | tuple[int, ...]) -> None:
        """``tokens`` were written into ``row`` after what it held; index the blocks they complete."""
        held = self._tokens[row]
        held.extend(tokens)
        self._lengths[row] = len(held)
        if row not in self._free:
            self.used_tokens += len(tokens)
        chain = self._row_blocks[row]
        for start in range(len(chain) * BLOCK_SIZE, len(held) - BLOCK_SIZE + 1, BLOCK_SIZE):
            key = hash((chain[-1] if chain else self._salts[row], tuple(held[start:start + BLOCK_SIZE])))
            chain.append(key)
            self._blocks.setdefault(key, set()).add(row)

    def length(self, row: int) -> int:
        return self._lengths[row]

    def tokens(self, row: int) -> list[int]:
        """The tokens whose keys and values ``row`` holds (a copy)."""
        return list(self._tokens[row])

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first ``length`` tokens of ``row`` (a draft model's cache drops the drafts the target
        rejected); the blocks past them leave the prefix index."""
        if row not in self._free:
            self.used_tokens -= self._lengths[row] - min(length, self._lengths[row])
        self._forget(row, keep=min(length, self._lengths[row]))

    def find_prefix(self, prompt: list[int] | tuple[int, ...], salt: object = None) -> PrefixHit | None:
        """The longest cached prefix of ``prompt`` in whole blocks computed with ``salt``'s adapter, leaving at
        least its last token to compute (its logits pick the first new token)."""
        best, parent = None, salt
        for start in range(0, len(prompt) - BLOCK_SIZE, BLOCK_SIZE):
            key = hash((parent, tuple(prompt[start:start + BLOCK_SIZE])))
            rows = self._blocks.get(key)
            if not rows:
                break
            best, parent = (rows, start + BLOCK_SIZE), key
        if best is None:
            return None
        rows, tokens = best
        row = min(rows)
        if self._tokens[row][:tokens] != list(prompt[:tokens]) or self._salts[row] != salt:  # a hash collision
            return None
        return PrefixHit(row=row, tokens=tokens)

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Give ``target`` (just allocated, empty) the first ``tokens`` columns of ``source``."""
        if source != target:
            self.copy_columns(source, target, tokens)
        self.extend(target, self._tokens[source][:tokens])

    def copy_columns(self, source: int, target: int, tokens: int) -> None:
        """Copy the first ``tokens`` columns of row ``source`` over row ``target``, in every layer; noted in
        ``copies`` when that is a list (tensor parallelism: the other ranks' caches make the same copies)."""
        for buffer in self.buffers:
            buffer[target, :, :tokens] = buffer[source, :, :tokens]
        if self.copies is not None:
            self.copies.append((source, target, tokens))

    def _forget(self, row: int, keep: int) -> None:
        for key in self._row_blocks[row][keep // BLOCK_SIZE:]:
            holders = self._blocks.get(key)
            if holders is not None:
                holders.discard(row)
                if not holders:
                    del self._blocks[key]
        del self._row_blocks[row][keep // BLOCK_SIZE:]
        del self._tokens[row][keep:]
        self._lengths[row] = keep


def default_row_cap(gpus: list[tuple[str, int]]) -> tuple[int, str]:
    """The most rows a cache gets by default on these GPUs (name, total bytes; none: the CPU), and why."""
    if gpus and all(total >= LARGE_GPU_GIB * 2**30 and "a100" not in name.lower() for name, total in gpus):
        return LARGE_GPU_ROW_CAP, f"the cap on GPUs of {LARGE_GPU_GIB} GiB or more other than the A100"
    where = f"GPUs under {LARGE_GPU_GIB} GiB and A100s" if gpus else "the CPU"
    return ROW_CAP, f"the cap on {where}"


def _bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the shapes a compiled step is recorded for."""
    return 1 << max(rows - 1, 0).bit_length()


def row_buckets(rows: int) -> list[int]:
    """Powers of two below ``rows``, then ``rows`` itself: the row counts a step may run over."""
    sizes = [1]
    while sizes[-1] * 2 < rows:
        sizes.append(sizes[-1] * 2)
    return sizes + [rows] if sizes[-1] < rows else sizes


def column_tiers(capacity: int, smallest: int = 128) -> list[int]:
    """The cache widths a step may attend over: ``smallest``, 1.5x and 2x it, 3x and 4x, ... below ``capacity``,
    then ``capacity``. A step attends over at most 1.5x the columns it needs (or ``smallest``)."""
    tiers, width = set(), smallest
    while width < capacity:
        tiers |= {width, width * 3 // 2}
        width *= 2
    return sorted(t for t in tiers if t < capacity) + [capacity]


def smallest_at_least(sizes: list[int], needed: int) -> int:
    return next(size for size in sizes if size >= needed)
