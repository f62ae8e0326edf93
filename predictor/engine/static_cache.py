"""A static KV cache for the decode step, so that the step can be compiled with ``torch.compile`` (and, on a GPU,
replayed as a CUDA graph instead of launching every kernel from Python).

Its tensors are allocated once and never change shape: ``slots`` rows by ``capacity`` columns per layer. Each running
sequence owns a row; rows ``0..n-1`` are in use, packed. Every sequence ends at one shared column, ``end``: a decode
step writes each sequence's new key and value there, so one index serves the whole batch, and a per-row mask says
which columns hold that row's tokens (sequences that joined at different times start at different columns).
Positions are kept per row, so rotary embeddings see each sequence's own positions.

A step attends over the first rows and columns only: the smallest power-of-two bucket of rows that holds the running
sequences (1, 2, 4, ... ``slots``) and the narrowest tier of columns past ``end`` (128, 192, 256, 384, ...), so a
lone short request does not pay for 32 rows of 2,048 columns. Every (rows, columns) shape is run at warm-up, which
compiles them (a few graphs with dynamic sizes) and records their CUDA graphs. Rows past ``n`` in a bucket are free:
they compute on what they hold (finite values: at least their current column is unmasked) and are ignored.

The used columns move left when ``end`` reaches ``capacity``, or when sequences that started early have left and
the rest fit a narrower tier; a joining batch wider than ``end`` moves them right. A move copies the used columns.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

logger = logging.getLogger(__name__)


class _SlotLayer(StaticLayer):
    """One layer's rows of a bucket: views of the shared buffers, written at the shared ``end`` column."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, end: torch.Tensor) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.end = keys, values, end
        self.device = keys.device
        self.batch_size, self.num_heads, _, self.k_head_dim = keys.shape
        self.v_head_dim = values.shape[-1]
        self.cumulative_length = end
        self.is_initialized = True
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.end, key_states)
        self.values.index_copy_(2, self.end, value_states)
        return self.keys, self.values


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: Cache) -> torch.Tensor:
    """One decode step: next-token logits [rows, vocab]. ``mask`` is [rows, capacity], True where a row attends."""
    return model(input_ids=ids, attention_mask=mask[:, None, None, :], position_ids=positions, cache=cache,
                 use_cache=True).logits[:, -1, :]


def bytes_per_token(layout: DynamicCache) -> int:
    """Key and value bytes one token takes in every layer of a cache shaped as ``layout``."""
    return sum((layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()
               for layer in layout.layers)


def column_tiers(capacity: int, smallest: int = 128) -> list[int]:
    """The cache widths a step may attend over: ``smallest``, 1.5x and 2x it, 3x and 4x, ... below ``capacity``,
    then ``capacity``. A step attends over at most 1.5x the columns it needs (or ``smallest``)."""
    tiers, width = set(), smallest
    while width < capacity:
        tiers |= {width, width * 3 // 2}
        width *= 2
    return sorted(t for t in tiers if t < capacity) + [capacity]


def buckets_for(slots: int) -> list[int]:
    """Powers of two below ``slots``, then ``slots`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < slots:
        sizes.append(sizes[-1] * 2)
    return sizes + [slots] if sizes[-1] < slots else sizes


class SlotCache:
    """The running sequences' attention state in fixed-shape tensors (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, layout: DynamicCache, slots: int, capacity: int, pad_token_id: int,
                 compile: bool, smallest_tier: int = 128) -> None:
        """``layout`` is the cache of any prefill: it gives each layer's heads, head size, dtype and device."""
        self.model = model
        self.slots, self.capacity, self.pad_token_id = slots, capacity, pad_token_id
        device = layout.layers[0].keys.device  # where the inputs go (layer 0's; accelerate moves them on)
        self.device = device
        per_token = bytes_per_token(layout)
        self.nbytes = slots * capacity * per_token
        self.keys, self.values, self.ends = [], [], {}
        try:
            for layer in layout.layers:
                k, v = layer.keys, layer.values
                self.keys.append(k.new_zeros(slots, k.shape[1], capacity, k.shape[3]))
                self.values.append(v.new_zeros(slots, v.shape[1], capacity, v.shape[3]))
                self.ends.setdefault(k.device, torch.zeros(1, dtype=torch.long, device=k.device))
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # RuntimeError: the CPU allocator's refusal
            self.keys, self.values = [], []
            raise RuntimeError(
                f"the static KV cache needs {self.nbytes / 2**30:.1f} GiB ({slots} rows x {capacity} columns x "
                f"{per_token:,} bytes per token) and does not fit beside the weights: lower "
                "--max_batch_size, or serve without --compile (its cache grows with the requests)") from exc
        for end in self.ends.values():
            torch._dynamo.mark_static_address(end)
        self.mask = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.buckets = buckets_for(slots)
        self.tiers = column_tiers(capacity, smallest_tier)
        self._caches: dict[tuple[int, int], Cache] = {}
        self._step: Callable[..., torch.Tensor] = _forward
        self.compiled = compile
        if compile:
            # Sizes are dynamic in the compiled code, so a few graphs serve every shape; on a GPU "reduce-overhead"
            # records a CUDA graph per shape and replays it.
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._step = torch.compile(_forward, mode=mode, dynamic=True)
            # Compiled graphs are cached per function: about 4 per model (one row or more, the full width or less),
            # so a process compiling several models needs room for more than torch's default of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.n = 0  # rows in use
        self.end = 0  # the column the next decode step writes
        self.starts: list[int] = []  # each running row's first column (kept here: reading the mask would sync)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    # -- membership --------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.n = 0
        self.end = 0
        self.starts = []

    def add(self, joining_cache: DynamicCache, joining_mask: torch.Tensor, joining_positions: torch.Tensor) -> None:
        """Copy a prefill's sequences (left-padded to one width) into the next free rows, ending at ``end``."""
        rows, width = joining_mask.shape
        if self.n + rows > self.slots:
            raise RuntimeError(f"{self.n + rows} sequences do not fit {self.slots} cache rows")
        if width > self.end:
            self._move_columns(new_end=width)
        start, stop = self.end - width, self.end
        new = slice(self.n, self.n + rows)
        for keys, values, layer in zip(self.keys, self.values, joining_cache.layers):
            keys[new, :, start:stop] = layer.keys
            values[new, :, start:stop] = layer.values
        self.mask[new] = False
        self.mask[new, start:stop] = joining_mask.to(torch.bool)
        self.positions[new] = joining_positions
        self.starts += [self.end - length for length in joining_positions.tolist()]
        self.n += rows

    def keep(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (ascending), packed to the front."""
        first_moved = next((i for i, row in enumerate(keep) if row != i), len(keep))
        if first_moved < len(keep):
            source = torch.tensor(keep[first_moved:], device=self.device)
            target = slice(first_moved, len(keep))
            lo = self._first_used_column()
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[target, :, lo:self.end] = buffer[source.to(buffer.device), :, lo:self.end]
            self.mask[target] = self.mask[source]
            self.positions[target] = self.positions[source]
        self.n = len(keep)
        self.starts = [self.starts[row] for row in keep]

    # -- decoding ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each running sequence its last token; return next-token logits [n, vocab]."""
        # Move the used columns left when the end reaches the last column, or when sequences that started early
        # have left and the rest fit a narrower tier (at most once per sequence leaving: the move is a copy).
        used = self.end - self._first_used_column()
        if self.end == self.capacity or self._tier(used) < self._tier(self.end):
            self._move_columns(new_end=used)
            if self.end == self.capacity:
                raise RuntimeError(f"a sequence fills all {self.capacity} columns of the cache")
        rows = self.bucket(self.n)
        ids = torch.full((rows, 1), self.pad_token_id, dtype=torch.long)
        ids[: self.n, 0] = torch.tensor(tokens, dtype=torch.long)
        for end in self.ends.values():
            end.fill_(self.end)
        self.mask[:rows, self.end] = True  # each row's current token (free rows too, so none is all masked)
        cols = self._tier(self.end)
        # Inputs are fresh contiguous tensors: one compiled graph serves every width (and every batch above 1).
        logits = self._step(self.model, ids.to(self.device), self.mask[:rows, :cols].clone(),
                            self.positions[:rows, None].clone(), self._cache(rows, cols))
        self.positions[: self.n] += 1
        self.end += 1
        return logits[: self.n].clone()

    def _tier(self, end: int) -> int:
        """The columns a step attends over when it writes column ``end``."""
        return next((c for c in self.tiers if c > end), self.capacity)

    def _cache(self, rows: int, cols: int) -> Cache:
        """The first ``rows`` rows and ``cols`` columns of every layer, as a transformers cache."""
        cache = self._caches.get((rows, cols))
        if cache is None:
            cache = Cache(layers=[_SlotLayer(k[:rows, :, :cols], v[:rows, :, :cols], self.ends[k.device])
                                  for k, v in zip(self.keys, self.values)])
            self._caches[rows, cols] = cache
        return cache

    def warm_up(self) -> float:
        """Run (and so compile, and record) every shape a step can take; seconds taken. Leaves the cache empty."""
        started = time.monotonic()
        for rows in self.buckets:
            for cols in self.tiers:
                for _ in range(3):  # CUDA graphs are recorded on a later call than the first
                    self.clear()
                    self.end = cols - 1
                    self.mask[:rows] = False
                    self.n, self.starts = rows, [0] * rows
                    self.step([self.pad_token_id] * rows)
        self.mask.zero_()
        self.positions.zero_()
        self.clear()
        return time.monotonic() - started

    # -- columns -----------------------------------------------------------------------------------------------
    def _first_used_column(self) -> int:
        return min(self.starts, default=self.end)

    def _move_columns(self, new_end: int) -> None:
        """Move the running rows' used columns so they end at ``new_end`` instead of ``end``."""
        if new_end > self.capacity:
            raise RuntimeError(f"{new_end} columns do not fit a cache of {self.capacity}")
        lo = self._first_used_column()
        length = self.end - lo
        if length and self.n:
            rows = slice(0, self.n)
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[rows, :, new_end - length:new_end] = buffer[rows, :, lo:self.end].clone()
            used = self.mask[rows, lo:self.end].clone()
            self.mask[rows] = False
            self.mask[rows, new_end - length:new_end] = used
        self.starts = [start + new_end - self.end for start in self.starts]
        self.end = new_end
