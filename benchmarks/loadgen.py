"""The server side of the benchmark: a ``python -m predictor`` process, closed-loop /chat clients, a /health probe."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import aiohttp
import httpx
import numpy as np
import orjson

STARTUP_DEADLINE_S = 900  # a 14 GB checkpoint takes a while to load


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    model_name: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_server(model_dir: Path, *, name: str, dtype: str, device: str, max_batch_size: int | None,
                 threads: int | None, log_dir: Path, cwd: Path, extra_args: Sequence[str] = (),
                 cpus: set[int] | None = None) -> Server:
    """``python -m predictor`` on a free loopback port; returns once it serves.

    ``name`` should be unique: readiness is checked on ``/v1/models/<name>``, which proves that the process answering
    on the port is this one. ``threads`` sets torch's thread count (``OMP_NUM_THREADS``); None keeps its default.
    ``max_batch_size`` None keeps the server's default (as many sequences as its memory holds). ``cpus`` pins the
    process (every thread it starts) to those cores; None leaves it on all of them.
    """
    port = _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{name}.log"
    args = [sys.executable, "-m", "predictor", "--model_dir", str(model_dir), "--model_name", name,
            "--http_port", str(port), "--enable_grpc", "false", "--dtype", dtype, "--device", device,
            *(("--max_batch_size", str(max_batch_size)) if max_batch_size is not None else ()), *extra_args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch takes its thread count from it at start-up
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
    process = subprocess.Popen(args, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=cwd, env=env,
                               preexec_fn=pin)
    server = Server(process, f"http://127.0.0.1:{port}", name, log_path)
    try:
        _wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    return server


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if (httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=2).status_code == 200
                    and httpx.get(f"{server.url}/health", timeout=2).status_code == 200):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {STARTUP_DEADLINE_S}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    """SIGTERM (the server drains, then exits); SIGKILL if it has not exited within a minute."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_server(url: str, prompts: list[str], concurrency_levels: tuple[int, ...], *, new_tokens: int,
                   requests_per_worker: int, min_seconds: float, probe_interval_s: float) -> list[dict[str, Any]]:
    """For each concurrency: an unmeasured warm-up round, then a measured closed loop with /health probed."""
    # This process holds torch and transformers (half a million objects): a full garbage collection here stalls
    # the clients and the probe for 100-200 ms, and would be charged to the server. Frozen objects are not scanned.
    gc.collect()
    gc.freeze()
    rows = []
    try:
        for concurrency in concurrency_levels:
            asyncio.run(closed_loop(url, prompts, concurrency, new_tokens, 1, 0.0))
            probe = HealthProbe(url, probe_interval_s)
            probe.start()
            try:
                load = asyncio.run(closed_loop(url, prompts, concurrency, new_tokens, requests_per_worker,
                                               min_seconds))
            finally:
                probes = probe.stop()
            rows.append(dict(concurrency=concurrency, **load, health_ms=probes))
    finally:
        gc.unfreeze()
    return rows


async def closed_loop(url: str, prompts: list[str], concurrency: int, new_tokens: int, requests_per_worker: int,
                      min_seconds: float) -> dict[str, Any]:
    """``concurrency`` workers, worker i sending prompt i, each starting its next request when one returns, until
    it sent ``requests_per_worker`` and ``min_seconds`` have passed. The time runs until the last answer."""
    latencies: list[float] = []  # seconds
    per_token: list[float] = []  # seconds per generated token, per request
    generated: list[int] = []

    async def worker(session: aiohttp.ClientSession, prompt: str) -> None:
        body = {"prompt": prompt, "return_full_text": False,
                "generate_kwargs": {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
        sent = 0
        while sent < requests_per_worker or time.perf_counter() < deadline:
            sent += 1
            start = time.perf_counter()
            async with session.post("/chat", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"POST /chat answered {response.status}: {(await response.text())[:500]}")
                tokens = sum((await response.json())["details"]["generated_tokens"])
            elapsed = time.perf_counter() - start
            latencies.append(elapsed)
            per_token.append(elapsed / tokens)
            generated.append(tokens)

    # aiohttp rather than httpx: the clients share the cores with the server, and here aiohttp spends about
    # 0.2 ms of CPU per request where httpx.AsyncClient spends 0.8.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        deadline = start + min_seconds
        await asyncio.gather(*(worker(session, prompts[i % len(prompts)]) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    return dict(requests=len(latencies), seconds=seconds, sequences_per_s=len(latencies) / seconds,
                tokens_per_s=sum(generated) / seconds, short_sequences=sum(t != new_tokens for t in generated),
                latency_ms=summarize([s * 1000 for s in latencies]),
                ms_per_token=float(np.median(per_token)) * 1000)


class HealthProbe:
    """GET /health every ``interval_s`` on its own thread and connection; records each probe's latency."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url = url
        self.interval_s = interval_s
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return dict(**summarize(self.latencies_ms), failures=self.failures)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while True:  # at least one probe, however short the load
                start = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.TransportError:
                    ok = False
                elapsed = time.perf_counter() - start
                self.latencies_ms.append(elapsed * 1000)
                self.failures += not ok
                if self._stop.wait(max(0.0, self.interval_s - elapsed)):
                    return


def summarize(values: list[float]) -> dict[str, float]:
    """Count, median, 99th percentile and maximum."""
    if not values:
        return dict(count=0, p50=float("nan"), p99=float("nan"), max=float("nan"))
    return dict(count=len(values), p50=float(np.percentile(values, 50)), p99=float(np.percentile(values, 99)),
                max=float(max(values)))


async def streamed_loop(url: str, model: str, prompts: list[str], concurrency: int, new_tokens: int,
                        requests_per_worker: int) -> dict[str, Any]:
    """``concurrency`` workers streaming ``POST /v1/chat/completions`` (the body guidellm sends by default: text
    parts, ``ignore_eos``, usage on every chunk), each ``requests_per_worker`` times: time to first token, the gaps
    between the chunks that carry text (inter-token latency), and generated tokens/s from the usage the server
    reports. Non-200 answers are counted as failures, not raised, as a benchmark client counts them."""
    ttft: list[float] = []  # ms
    itl: list[float] = []  # ms
    generated = failures = 0

    async def request(session: aiohttp.ClientSession, prompt: str) -> None:
        nonlocal generated, failures
        body = {"model": model, "stream": True, "max_completion_tokens": new_tokens, "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
        start = last = time.perf_counter()
        first = True
        async with session.post("/v1/chat/completions", json=body) as response:
            if response.status != 200:
                failures += 1
                await response.read()
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                now = time.perf_counter()
                if any(choice["delta"].get("content") for choice in chunk["choices"]):
                    (ttft if first else itl).append((now - (start if first else last)) * 1000)
                    first, last = False, now
                if not chunk["choices"]:
                    generated += chunk["usage"]["completion_tokens"]

    async def worker(session: aiohttp.ClientSession, prompt: str) -> None:
        for _ in range(requests_per_worker):
            await request(session, prompt)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session, prompts[i % len(prompts)]) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    return dict(requests=concurrency * requests_per_worker - failures, failed=failures, seconds=seconds,
                ttft_ms=summarize(ttft), itl_ms=summarize(itl), output_tokens_per_s=generated / seconds,
                requests_per_s=(concurrency * requests_per_worker - failures) / seconds)
