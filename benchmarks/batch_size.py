"""How many sequences run at once, and what a decode step costs beside a long row (issue 21), in one run, on the CPU:

1. **128 clients**: closed-loop clients of short greedy /chat requests against the default server, one started with
   ``--max_batch_size 32`` and one with ``128`` (and, with ``--before DIR``, that checkout's default server), all
   started first and measured in turns: requests/s, tokens/s and the peak of ``falcon_running_sequences`` (polled
   on ``/metrics``).
2. **Mixed lengths**, on the engine without HTTP, both tiny shapes, 64 rows: the median decode step (every stream's
   gap between tokens) with 63 short rows beside one 1,900-token row, against beside a short one; the ratio. Steps
   of the two batches alternate, so both see the same load on the machine.
3. **Step time** at 1, 32, 128 and 256 running rows of equal length, on the engine.
4. **Long rows**: one decode step of 24 rows of 1,400 tokens on the tiny with falcon-40b's attention layout (32
   query heads over 2 K/V groups, ``kv_memory.build_grouped``), where decode attention is most of a step.

The engine scenarios run in a child process per checkout, importing that checkout's ``predictor``, so the
``--before`` figures come from its own code. Every loop is bounded and runs on loopback only.

    python benchmarks/batch_size.py
    python benchmarks/batch_size.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
LONG_TOKENS = 1900
SHORT_TOKENS = 16
MIXED_ROWS = 64
EQUAL_ROWS = (1, 32, 128, 256)
EQUAL_TOKENS = 128
LONG_ROWS, LONG_ROW_TOKENS = 24, 1400
STEPS = 31


# -- engine scenarios (child process) -------------------------------------------------------------------------------

def _prefill(engine, rows: list[int], length: int) -> None:
    """Write ``length`` prompt tokens into each of ``rows``, a few rows per step."""
    for start in range(0, len(rows), 8):
        engine.step([], [(row, [20 + (row + i) % 900 for i in range(length)], 0) for row in rows[start:start + 8]])


def _engine(model_dir: str, rows: int):
    from predictor.engine.model.loading import LoadSpec, load_engine

    engine = load_engine(LoadSpec(model_dir, device="cpu", dtype="float32"))
    engine.reserve(rows)
    return engine, [engine.cache.allocate(running) for running in range(rows)]


def _step_seconds(engine, rows: list[int]) -> float:
    started = time.perf_counter()
    engine.step([(row, 30) for row in rows])
    return time.perf_counter() - started


def engine_figures(model_dirs: dict[str, str]) -> dict[str, Any]:
    import torch

    # One thread: on a shared machine torch's thread pool waits on busy cores, which swamps what is measured.
    torch.set_num_threads(1)
    mixed = {}
    for shape in ("7b", "40b"):
        model_dir, batches = model_dirs[shape], {}
        for neighbour in ("short", "long"):
            engine, rows = _engine(model_dir, MIXED_ROWS)
            _prefill(engine, rows[:-1], SHORT_TOKENS)
            _prefill(engine, rows[-1:], LONG_TOKENS if neighbour == "long" else SHORT_TOKENS)
            batches[neighbour] = (engine, rows)
        gaps: dict[str, list[float]] = {"short": [], "long": []}
        for _ in range(STEPS):
            for neighbour, (engine, rows) in batches.items():
                gaps[neighbour].append(_step_seconds(engine, rows))
        short, long = (statistics.median(gaps[n]) * 1000 for n in ("short", "long"))
        mixed[shape] = dict(short_neighbour_ms=short, long_neighbour_ms=long, ratio=long / short)
    engine, rows = _engine(model_dirs["7b"], max(EQUAL_ROWS))
    _prefill(engine, rows, EQUAL_TOKENS)
    equal = {}
    for count in EQUAL_ROWS:
        equal[str(count)] = statistics.median(_step_seconds(engine, rows[:count]) for _ in range(STEPS)) * 1000
    engine, rows = _engine(model_dirs["grouped"], LONG_ROWS)
    _prefill(engine, rows, LONG_ROW_TOKENS)
    long_rows = statistics.median(_step_seconds(engine, rows) for _ in range(STEPS)) * 1000
    return dict(mixed=mixed, step_ms_at_rows=equal, long_rows_step_ms=long_rows)


def run_engine_child(repo: Path, model_dirs: dict[str, str]) -> dict[str, Any]:
    """``engine_figures`` in a child process importing ``repo``'s ``predictor``."""
    env = {**os.environ, "PYTHONPATH": str(repo), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--engine-child", json.dumps(model_dirs)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"the engine scenarios failed in {repo}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- 128 clients over HTTP ------------------------------------------------------------------------------------------

class RunningPeak:
    """Polls ``falcon_running_sequences`` on ``/metrics`` every 50 ms on its own thread; keeps the highest."""

    def __init__(self, url: str) -> None:
        self.url, self.peak, self._done = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RunningPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._done.is_set():
                found = re.search(r"^falcon_running_sequences (\S+)$", client.get("/metrics").text, re.M)
                self.peak = max(self.peak, float(found.group(1)) if found else 0.0)
                time.sleep(0.05)


def http_figures(servers: list[tuple[Path, int | None]], model_dir: Path, workdir: Path, clients: int,
                 new_tokens: int, seconds: float, rounds: int) -> list[dict[str, Any]]:
    """Every server is started first, then measured in turns, ``rounds`` times ``seconds / rounds`` each: the load
    others put on a shared machine drifts over minutes, and taking turns spreads it over all of them alike. Each
    server's figures are the medians of its rounds; ``vs_first`` is the median of its per-round ratio to the first
    server's requests/s (the round's neighbour in time)."""
    from loadgen import closed_loop, start_server, stop_server

    prompts = [f"Tell me about falcons, number {i}." for i in range(clients)]
    started = []
    try:
        for repo, size in servers:
            name = f"batch-{os.getpid()}-{len(started)}-{size or 'default'}"
            started.append(start_server(model_dir, name=name, dtype="float32", device="cpu", max_batch_size=size,
                                        threads=None, log_dir=workdir, cwd=repo))
        for server in started:
            asyncio.run(closed_loop(server.url, prompts, clients, new_tokens, 1, 0.0))  # warm-up
        measured: list[list[dict[str, float]]] = [[] for _ in started]
        for _ in range(rounds):
            for figures, server in zip(measured, started):
                with RunningPeak(server.url) as peak:
                    load = asyncio.run(closed_loop(server.url, prompts, clients, new_tokens, 1, seconds / rounds))
                figures.append(dict(requests_per_s=load["sequences_per_s"], tokens_per_s=load["tokens_per_s"],
                                    peak_running=peak.peak, requests=load["requests"]))
        logs = [server.log_tail(200_000) for server in started]
    finally:
        for server in started:
            stop_server(server)
    results = []
    for (repo, size), figures, log in zip(servers, measured, logs):
        rows = re.search(r"Running up to (\d+) sequences", log)
        ratios = [mine["requests_per_s"] / first["requests_per_s"] for mine, first in zip(figures, measured[0])]
        results.append(dict(
            repo=str(repo), max_batch_size=size or "default", rows=int(rows.group(1)) if rows else size or 32,
            requests_per_s=statistics.median(f["requests_per_s"] for f in figures),
            tokens_per_s=statistics.median(f["tokens_per_s"] for f in figures),
            peak_running=max(f["peak_running"] for f in figures), requests=sum(f["requests"] for f in figures),
            vs_first=statistics.median(ratios), rounds=figures))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another checkout measured the same way in the same run")
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per server, over its rounds")
    parser.add_argument("--rounds", type=int, default=4, help="turns each server takes, alternating with the others")
    parser.add_argument("--skip-http", action="store_true", help="only the engine scenarios")
    parser.add_argument("--engine-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batch-size.json")
    args = parser.parse_args()
    if args.engine_child:
        print(json.dumps(engine_figures(json.loads(args.engine_child))))
        return
    sys.path.insert(0, str(REPO))
    from predictor.tiny import build_tiny_falcon

    workdir = Path(tempfile.mkdtemp(prefix="batch-size-"))
    model_dirs = {shape: str(build_tiny_falcon(workdir / f"tiny-{shape}", shape)) for shape in ("7b", "40b")}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kv_memory import build_grouped

    model_dirs["grouped"] = str(build_grouped(workdir / "tiny-grouped"))
    checkouts = [REPO] + ([args.before.resolve()] if args.before else [])
    results: dict[str, Any] = {"engine": {str(repo): run_engine_child(repo, model_dirs) for repo in checkouts}}
    if not args.skip_http:
        servers = [(REPO, 128), (REPO, None), (REPO, 32)] + ([(args.before.resolve(), None)] if args.before else [])
        results["http"] = http_figures(servers, Path(model_dirs["7b"]), workdir, args.clients, args.new_tokens,
                                       args.seconds, args.rounds)
    args.out.write_text(json.dumps(results, indent=2))
    for repo, figures in results["engine"].items():
        for shape, row in figures["mixed"].items():
            print(f"{repo} {shape}: {MIXED_ROWS} rows, step beside a short row {row['short_neighbour_ms']:.2f} ms, "
                  f"beside a {LONG_TOKENS}-token row {row['long_neighbour_ms']:.2f} ms: {row['ratio']:.2f}x")
        steps = ", ".join(f"{rows}: {ms:.2f} ms" for rows, ms in figures["step_ms_at_rows"].items())
        print(f"{repo} step at rows of {EQUAL_TOKENS} tokens: {steps}")
        print(f"{repo} step of {LONG_ROWS} rows of {LONG_ROW_TOKENS} tokens, 40b attention layout: "
              f"{figures['long_rows_step_ms']:.1f} ms")
    for row in results.get("http", []):
        print(f"{row['repo']} --max_batch_size {row['max_batch_size']} ({row['rows']} rows): "
              f"{row['requests_per_s']:.2f} requests/s, {row['tokens_per_s']:.0f} tokens/s, peak running "
              f"{row['peak_running']:.0f}, {row['vs_first']:.2f}x the --max_batch_size 128 server's requests/s")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
