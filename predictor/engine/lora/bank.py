"""Per-request LoRA adapters served together: the registered adapters, the slots of stacked weights one step
reads, and the batched LoRA delta.

Each target linear layer has its adapters' weights stacked side by side, ``max_loras`` slots of ``max_rank``:
``A`` [slots * rank, in] and ``B`` [out, slots * rank], an adapter of lower rank zero-padded. A step computes every
token's delta with two matmuls, ``((x @ A.T) * mask) @ B.T``, where ``mask`` [tokens, slots * rank] keeps the
columns of each token's own slot (none for the base model's tokens). So requests for different adapters and for the
base model share one step, with static shapes a compiled step can record; the cost per token is
``slots * rank * (in + out)``, beside the layer's ``in * out``.

Registered adapters live in host memory; one is copied into a free slot when a request for it is admitted (a slot
is free when no running request uses it), so at most ``max_loras`` adapters run in one step and the others' requests
wait. Unregistering an adapter lets the requests using it finish; its slot is freed after them.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from ..transfer import to_device
from .adapter import TARGETS, LoraAdapter

BASE = -1  # the slot of a token that uses no adapter


@dataclass
class _Slot:
    adapter: LoraAdapter | None = None
    key: int = 0  # which registration of the adapter it holds (a name may be loaded again with new weights)
    users: int = 0  # admitted requests using it


@dataclass(frozen=True)
class LoraStep:
    """One step's view of the bank: each token's mask [tokens, width] over the first ``width`` stacked columns
    (the slots up to the highest one the step uses), and the targets its adapters have."""

    bank: "AdapterBank"
    mask: torch.Tensor
    targets: frozenset[str]

    def apply(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (target ``target`` of layer ``layer`` applied to ``x`` [tokens, in]) plus the adapters' delta."""
        if target not in self.targets:
            return out
        a, b = self.bank.stacked[layer][target]
        width = self.mask.shape[1]
        mask = self.mask if self.mask.device == x.device else self.mask.to(x.device)
        return torch.addmm(out, (x @ a[:width].T) * mask, b[:, :width].T)  # via [tokens, width]


class AdapterBank:
    """The served adapters and the ``max_loras`` slots of stacked weights (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.stacked: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        width = max_loras * max_rank
        for layer in model.transformer.h:
            weights = {}
            for target, block in TARGETS.items():
                linear = getattr(getattr(layer, block), target)
                out_features, in_features = linear.weight.shape
                device = linear.weight.device
                weights[target] = (torch.zeros(width, in_features, dtype=self.dtype, device=device),
                                   torch.zeros(out_features, width, dtype=self.dtype, device=device))
            self.stacked.append(weights)
        device = model.transformer.word_embeddings.weight.device
        self.column_slots = torch.arange(width, device=device) // max_rank  # [slots * rank]: each column's slot
        self._registered: dict[str, tuple[int, LoraAdapter]] = {}
        self._slots = [_Slot() for _ in range(max_loras)]
        self._keys = itertools.count(1)
        self._lock = threading.Lock()  # registration happens on the event loop, placement on the decode thread

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.stacked for pair in layer.values() for t in pair]

    # -- registration (any thread) ------------------------------------------------------------------------------
    def register(self, adapter: LoraAdapter) -> None:
        with self._lock:
            self._registered[adapter.name] = (next(self._keys), adapter)

    def unregister(self, name: str) -> bool:
        """Stop serving ``name``; requests already using it finish with it. Whether it was served."""
        with self._lock:
            return self._registered.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._registered)

    def adapter(self, name: str) -> LoraAdapter | None:
        with self._lock:
            entry = self._registered.get(name)
        return entry[1] if entry else None

    # -- placement (the decode thread) ------------------------------------------------------------------------
    def place(self, name: str) -> int | None:
        """A slot holding adapter ``name`` for one more request: its own if placed, else a free one, into which it
        is copied now. None when every slot is in use (the request waits). KeyError: ``name`` is not served."""
        with self._lock:
            key, adapter = self._registered[name]
        for index, slot in enumerate(self._slots):
            if slot.adapter is not None and slot.key == key:
                slot.users += 1
                return index
        free = [i for i, slot in enumerate(self._slots) if slot.users == 0]
        if not free:
            return None
        index = next((i for i in free if self._slots[i].adapter is None), free[0])
        self.copy_in(index, adapter)
        self._slots[index] = _Slot(adapter, key, 1)
        return index

    def key(self, slot: int) -> int:
        """Which registration the adapter in ``slot`` was copied from: a prefix cache salt that changes when the
        adapter's weights do, and stays with the slot even if its name is unloaded meanwhile."""
        return self._slots[slot].key

    def release(self, slot: int) -> None:
        if slot != BASE:
            self._slots[slot].users -= 1

    def running(self) -> list[str]:
        """Names of the adapters that admitted requests use."""
        return [slot.adapter.name for slot in self._slots if slot.users and slot.adapter is not None]

    def step(self, token_slots: list[int], static: bool = False) -> LoraStep:
        """The step's view for each token's slot. ``static`` (a compiled step): every slot and target, so that the
        shapes never change; else only the slots up to the highest used and the targets their adapters have."""
        if static:
            used, targets = self.max_loras, frozenset(TARGETS)
        else:
            used = max(token_slots) + 1
            targets = frozenset().union(*(self._slots[s].adapter.targets for s in set(token_slots) if s != BASE))
        slots = to_device(token_slots, self.column_slots.device, torch.long)
        columns = self.column_slots[:used * self.max_rank]
        return LoraStep(self, (slots[:, None] == columns[None, :]).to(self.dtype), targets)

    def copy_in(self, index: int, adapter: LoraAdapter) -> None:
        """Write ``adapter`` into slot ``index`` in place (the stacked tensors' addresses stay, for CUDA graphs)."""
        columns = slice(index * self.max_rank, (index + 1) * self.max_rank)
        for layer, weights in enumerate(self.stacked):
            for target, (a, b) in weights.items():
                a[columns].zero_()
                b[:, columns].zero_()
                pair = adapter.weights.get((layer, target))
                if pair is not None:
                    a[columns][:adapter.rank].copy_(pair[0])
                    b[:, columns][:, :adapter.rank].copy_(pair[1])
