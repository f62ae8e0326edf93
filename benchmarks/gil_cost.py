"""What the HTTP side costs the decode thread: the share of its steps' wall time it spends not running (issue 30,
point 4).

    python benchmarks/gil_cost.py            -> benchmarks/results/gil-cost.{json,md}

A server on the tiny Falcon (7b layout, CPU, one torch thread, so that a step's compute runs on the decode thread
itself) is driven by this process's streaming load generator (``loadgen.streamed_loop``: guidellm's body, every
request streamed) at 1, 8 and 32 concurrent clients. Around each round the script reads, from ``/proc``, the CPU
seconds of every server thread, and from ``/metrics`` the decode steps' wall time (``falcon_step_host_seconds`` plus
``falcon_step_device_wait_seconds``: on a CPU the device wait is nil and the forward's compute is host time). The
decode thread is the busiest thread other than the main one, which runs the event loop (HTTP parsing, JSON, SSE,
detokenization of streams). Its CPU seconds over its steps' seconds is the share of each step it ran; the rest it
waited, runnable: for the GIL while the event loop held it, or for a core (the load generator shares the two).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guidellm_compare import make_prompts  # noqa: E402
from loadgen import start_server, stop_server, streamed_loop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP_METRICS = ("falcon_step_host_seconds", "falcon_step_device_wait_seconds")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each of ``pid``'s threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def step_seconds(url: str) -> tuple[float, int]:
    """The decode steps' wall seconds so far, and how many steps."""
    total, steps = 0.0, 0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in (f"{metric}_sum" for metric in STEP_METRICS):
            total += float(value)
        if name == f"{STEP_METRICS[0]}_count":
            steps = int(float(value))
    return total, steps


def measure(server, prompts: list[str], concurrency: int, new_tokens: int, requests_per_worker: int) -> dict:
    asyncio.run(streamed_loop(server.url, server.model_name, prompts, concurrency, new_tokens, 1))  # warm-up
    cpu_before, (steps_s_before, steps_before) = thread_cpu(server.process.pid), step_seconds(server.url)
    started = time.perf_counter()
    figures = asyncio.run(streamed_loop(server.url, server.model_name, prompts, concurrency, new_tokens,
                                        requests_per_worker))
    wall = time.perf_counter() - started
    cpu_after, (steps_s_after, steps_after) = thread_cpu(server.process.pid), step_seconds(server.url)
    used = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    loop = used.pop(server.process.pid, 0.0)
    decode = max(used.values())
    steps_s = steps_s_after - steps_s_before
    return dict(concurrency=concurrency, wall_s=wall, tokens_per_s=figures["output_tokens_per_s"],
                failed=figures["failed"], steps=steps_after - steps_before, steps_s=steps_s,
                decode_thread_cpu_s=decode, event_loop_cpu_s=loop, other_threads_cpu_s=sum(used.values()) - decode,
                ran_share=decode / steps_s if steps_s else None)


def main() -> int:
    from predictor.tiny import build_tiny_falcon

    workdir = Path(tempfile.mkdtemp(prefix="gil-cost-"))
    model_dir = build_tiny_falcon(workdir / "tiny", "7b")
    prompts = make_prompts(model_dir, 32, 32)
    server = start_server(model_dir, name="gil-cost", dtype="auto", device="cpu", max_batch_size=None, threads=1,
                          log_dir=workdir, cwd=ROOT)
    rows = []
    try:
        for concurrency in (1, 8, 32):
            rows.append(measure(server, prompts, concurrency, new_tokens=64, requests_per_worker=4))
            print(rows[-1], flush=True)
    finally:
        stop_server(server)
    lines = ["| clients | steps | steps' wall s | decode thread CPU s | ran / steps' wall | event loop CPU s | "
             "tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['steps']} | {r['steps_s']:.2f} | {r['decode_thread_cpu_s']:.2f} | "
                     f"{r['ran_share']:.2f} | {r['event_loop_cpu_s']:.2f} | {r['tokens_per_s']:.0f} |")
    out = ROOT / "benchmarks" / "results" / "gil-cost"
    out.with_suffix(".json").write_text(json.dumps(dict(machine=dict(platform=platform.platform(),
                                                                     load_avg=os.getloadavg()), rows=rows), indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
