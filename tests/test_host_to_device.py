"""A step's host-built inputs reach the device without the host waiting for the step still running there: on a GPU
through pinned memory and non-blocking copies (checked with CUDA's sync debug mode, which raises on any copy that
synchronizes the stream), elsewhere as plain tensors with the same values and dtypes."""

from __future__ import annotations

import pytest
import torch

from predictor.engine.model.falcon import decode_blocks, decode_groups
from predictor.engine.transfer import move, to_device

CPU = torch.device("cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_on_the_cpu_they_are_the_tensors_torch_tensor_makes() -> None:
    for data, dtype in (([3, 1, 4], torch.long), ([0.5, 2.0], torch.float32), ([], torch.long)):
        made = to_device(data, CPU, dtype)
        assert made.dtype == dtype and made.device == CPU and made.tolist() == data
    mask = torch.arange(6).reshape(2, 3) > 2
    assert move(mask, CPU) is mask


@needs_gpu
def test_host_data_reaches_the_gpu_without_synchronizing() -> None:
    gpu = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=gpu)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # work queued ahead, as the step launched before would be
            busy = busy @ busy / 4096
        ids = to_device([5, 6, 7], gpu, torch.long)
        mask = move(torch.arange(8) < 5, gpu)
        groups = decode_groups([3, 70, 5], [0, 1, 2], gpu)
        blocks = decode_blocks([3, 70], [0, 1], 4, 8, 9, gpu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ids.tolist() == [5, 6, 7] and mask.tolist() == [True] * 5 + [False] * 3
    assert sum(len(group.tokens) for group in groups.groups) == 3
    assert blocks.rows.tolist()[:3] == [0, 1, 1]
