"""How many threads the model's operators take when it runs on the CPU: the cores this process may use, less one
for the HTTP side.

The decode worker's operators and the event loop (HTTP, JSON, tokenizing, detokenizing) share the process's cores.
torch takes one operator thread per core by default, so under load every operator waits for the thread that the
event loop, or a client on the same host, has just taken its core from: on 2 cores at 32 clients the server did
more with one operator thread than with two (``benchmarks/README.md``, "Operator threads on the CPU"). A pod's CPU
limit counts as its cores (torch reads only the machine's). ``OMP_NUM_THREADS``, when set, decides instead.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def cgroup_cores(cpu_max: Path = CPU_MAX) -> float | None:
    """The cores a cgroup v2 CPU limit allows this process (a pod's ``limits.cpu``), None without a limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on: those it is pinned to, within its cgroup's CPU limit."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cores(cpu_max)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def operator_threads(cores: int) -> int:
    """Operator threads for a process with ``cores`` cores: one core is left to the HTTP side."""
    return max(1, cores - 1)


def set_operator_threads() -> None:
    """Give torch's operators their threads, unless ``OMP_NUM_THREADS`` chose already (torch read it at start)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    cores = available_cores()
    torch.set_num_threads(operator_threads(cores))
    logger.info("Operators run on %d thread(s) of the %d core(s) this process may use; one is left to the HTTP "
                "side (OMP_NUM_THREADS sets another count)", torch.get_num_threads(), cores)
