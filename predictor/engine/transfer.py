"""Host data onto the device without making the host wait for the device.

A copy from pageable host memory to a GPU (``torch.tensor(..., device="cuda")``, ``cpu_tensor.to("cuda")``) first
waits until every kernel already queued on the stream has run. The decode worker builds step N+1's inputs while
step N is still on the device (one step ahead), so such a copy would make the host wait for step N before it can
launch N+1, and the device then waits for the launch. Staged in pinned memory and copied with ``non_blocking``, the
copy is queued behind step N's kernels and the host goes on; PyTorch's caching host allocator keeps the pinned
source alive until the copy has run. On any other device these are plain tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(data: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``; on a GPU without waiting for the work queued there."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` on ``device``, as ``to_device`` puts it there."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
