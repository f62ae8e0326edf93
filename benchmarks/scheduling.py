"""Scheduling under mixed load, over HTTP on the tiny 7B-shaped Falcon (issue 13), in one run:

1. **A long prompt beside running streams**: 8 greedy ``"stream": true`` requests decode; a request with a
   1,900-token prompt arrives. Printed per ``--max_prefill_tokens`` budget: the streams' median gap between tokens
   before it, their worst gap while it is prefilled, the ratio, and the long request's time to first token.
2. **A prompt that repeats an earlier one**: time to first token of a 1,800-token prompt that begins with the
   previous request's prompt, against a cold prompt of the same length; with prefix caching on and off.
3. **A flood of beam-search requests**: 150 clients send ``num_beams: 2`` requests in closed loops while one client
   sends ordinary sampling requests; the share of that client's requests answered with 200.

Scenarios 1 and 2 are also measured in this process, on the engine without HTTP (``engine_level``): on a model this
small, HTTP, JSON and tokenizing a 1,900-token prompt take longer than computing it, and show in the figures above.

``--before DIR`` also runs the scenarios against another checkout's server (flags it lacks are left out), so both
figures come from one run. Every loop is bounded in time and runs on loopback only.

    python benchmarks/scheduling.py
    python benchmarks/scheduling.py --before /tmp/before --budgets 128 256 512 2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from loadgen import start_server, stop_server

REPO = Path(__file__).resolve().parent.parent
STREAMS = 8


def words(count: int, salt: str) -> str:
    return " ".join(f"{salt}{i % 89}" for i in range(count))


def prompt_of_tokens(tokenizer, tokens: int, salt: str) -> str:
    """A prompt of about ``tokens`` tokens (never more)."""
    low, high = 1, tokens
    while low < high:  # the most words whose encoding fits
        mid = (low + high + 1) // 2
        if len(tokenizer(words(mid, salt))["input_ids"]) <= tokens:
            low = mid
        else:
            high = mid - 1
    return words(low, salt)


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 times: list[float] | None = None) -> list[float]:
    """Send a streaming /chat request; the arrival time of each token event (appended to ``times`` as they come)."""
    times = [] if times is None else times
    async with session.post(f"{url}/chat", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {\"index\""):
                times.append(time.monotonic())
    return times


async def long_prompt_beside_streams(url: str, long_prompt: str) -> dict[str, float]:
    decode = {"prompt": "Once upon a time", "generate_kwargs": {"do_sample": False, "max_new_tokens": 2000,
                                                                 "min_new_tokens": 2000}}
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        streams = [asyncio.ensure_future(stream(session, url, decode, times)) for times in arrivals]
        await asyncio.sleep(1.5)  # the streams are decoding
        sent = time.monotonic()
        long = await stream(session, url, {"prompt": long_prompt,
                                           "generate_kwargs": {"do_sample": False, "max_new_tokens": 4}})
        first = long[0]
        await asyncio.sleep(0.5)  # a few gaps after it
        for task in streams:  # closing the connections cancels the streams' generation
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    before, during = [], []
    for times in arrivals:
        for a, b in zip(times, times[1:]):
            if b < sent:
                before.append(b - a)
            elif a <= first and b >= sent:  # a gap that overlaps the long prompt's prefill
                during.append(b - a)
    if not before or not during:
        raise RuntimeError("the streams were not decoding while the long prompt was read")
    median = statistics.median(before)
    worst = max(during)
    return dict(median_gap_ms=median * 1000, worst_gap_ms=worst * 1000, ratio=worst / median,
                long_ttft_ms=(first - sent) * 1000)


async def time_to_first_token(url: str, prompt: str) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        sent = time.monotonic()
        times = await stream(session, url, {"prompt": prompt, "generate_kwargs": {"do_sample": False,
                                                                                   "max_new_tokens": 2}})
    return (times[0] - sent) * 1000


async def repeated_prompt(url: str, tokenizer, salt: str) -> dict[str, float]:
    first = prompt_of_tokens(tokenizer, 1700, salt + "a")
    await time_to_first_token(url, first)  # the earlier turn
    follow_up = first + " " + words(60, "more")
    cold = prompt_of_tokens(tokenizer, len(tokenizer(follow_up)["input_ids"]), salt + "b")
    cold_ms = await time_to_first_token(url, cold)
    warm_ms = await time_to_first_token(url, follow_up)
    return dict(prompt_tokens=len(tokenizer(follow_up)["input_ids"]), cold_ttft_ms=cold_ms, warm_ttft_ms=warm_ms,
                ratio=warm_ms / cold_ms)


async def beam_flood(url: str, seconds: float, clients: int = 150) -> dict[str, Any]:
    beam = {"prompt": "Hello", "generate_kwargs": {"num_beams": 2, "do_sample": False, "max_new_tokens": 16}}
    sample = {"prompt": "Hello", "generate_kwargs": {"do_sample": True, "max_new_tokens": 8}}
    deadline = time.monotonic() + seconds
    statuses: dict[int, int] = {}
    limits = aiohttp.TCPConnector(limit=clients + 10)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def flood() -> None:
            while time.monotonic() < deadline:
                async with session.post(f"{url}/chat", json=beam) as response:
                    await response.read()
                    if response.status == 429:
                        await asyncio.sleep(0.05)

        async def lone() -> None:
            while time.monotonic() < deadline:
                async with session.post(f"{url}/chat", json=sample) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(flood() for _ in range(clients)), lone())
    total = sum(statuses.values())
    return dict(lone_requests=total, answered_200=statuses.get(200, 0), statuses=statuses,
                share_200=statuses.get(200, 0) / total if total else 0.0)


def engine_level(model_dir: Path, budgets: list[int]) -> dict[str, Any]:
    """Scenarios 1 and 2 on the engine in this process: the decode steps' worst gap while the long prompt is
    computed, against their median before it; and a repeated prompt's time to first token, warm against cold."""
    sys.path.insert(0, str(REPO / "tests"))
    from generation import make_job, reserved_engine

    from predictor.engine.scheduling.batcher import Batcher

    engine = reserved_engine(model_dir, rows=16)
    tokenizer = engine.tokenizer
    long_job = make_job(engine, prompt_of_tokens(tokenizer, 1900, "engine"), do_sample=False, max_new_tokens=4)
    stream_jobs = [make_job(engine, "Once upon a time", do_sample=False, max_new_tokens=600, min_new_tokens=600)
                   for _ in range(STREAMS)]
    steps: list[float] = []
    real_step = engine.step

    def timed_step(decode, chunks=()):
        logits = real_step(decode, chunks)
        steps.append(time.monotonic())
        return logits

    engine.step = timed_step

    async def long_prompt(budget: int) -> dict[str, float]:
        batcher = Batcher(engine, max_prefill_tokens=budget, prefix_caching=False)
        batcher.start()
        steps.clear()
        streams = [batcher.submit(job) for job in stream_jobs]
        await asyncio.sleep(0.5)
        sent = time.monotonic()
        ticket = batcher.submit(long_job)
        await ticket.result()
        first = ticket.first_token_at
        for stream_ticket in streams:
            stream_ticket.cancel()
        await asyncio.gather(*(t.result() for t in streams))
        batcher.close()
        gaps_before = [b - a for a, b in zip(steps, steps[1:]) if b < sent]
        gaps_during = [b - a for a, b in zip(steps, steps[1:]) if b >= sent and a <= first]
        median = statistics.median(gaps_before)
        return dict(median_step_ms=median * 1000, worst_step_ms=max(gaps_during) * 1000,
                    ratio=max(gaps_during) / median, long_ttft_ms=(first - sent) * 1000)

    async def ttft(batcher: Batcher, prompt: str) -> float:
        ticket = batcher.submit(make_job(engine, prompt, do_sample=False, max_new_tokens=2))
        await ticket.result()
        return (ticket.first_token_at - ticket.submitted_at) * 1000

    async def repeated() -> dict[str, float]:
        batcher = Batcher(engine, max_prefill_tokens=2048)
        batcher.start()
        first = prompt_of_tokens(tokenizer, 1700, "enginea")
        await ttft(batcher, first)
        follow_up = first + " " + words(60, "more")
        cold_ms = await ttft(batcher, prompt_of_tokens(tokenizer, len(tokenizer(follow_up)["input_ids"]), "engb"))
        warm_ms = await ttft(batcher, follow_up)
        batcher.close()
        return dict(cold_ttft_ms=cold_ms, warm_ttft_ms=warm_ms, ratio=warm_ms / cold_ms)

    return dict(long_prompt={str(b): asyncio.run(long_prompt(b)) for b in budgets},
                repeated_prompt=asyncio.run(repeated()))


def run_scenarios(repo: Path, model_dir: Path, workdir: Path, budgets: list[int], flood_s: float,
                  supports_new_flags: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    long_prompt = prompt_of_tokens(tokenizer, 1900, "long")

    def server(*flags: str):
        return start_server(model_dir, name=f"sched-{os.getpid()}-{time.monotonic_ns()}", dtype="float32",
                            device="cpu", max_batch_size=32, threads=None, log_dir=workdir, cwd=repo,
                            extra_args=flags)

    results: dict[str, Any] = dict(repo=str(repo), long_prompt_tokens=len(tokenizer(long_prompt)["input_ids"]))
    chunking = {}
    for budget in budgets if supports_new_flags else [None]:
        process = server(*(["--max_prefill_tokens", str(budget)] if budget else []))
        try:
            chunking[str(budget or "unchunked")] = asyncio.run(long_prompt_beside_streams(process.url, long_prompt))
        finally:
            stop_server(process)
    results["long_prompt"] = chunking

    reuse = {}
    for mode, flags in ((("on", ()), ("off", ("--no-prefix_caching",))) if supports_new_flags else (("on", ()),)):
        process = server(*flags)
        try:
            reuse[mode] = asyncio.run(repeated_prompt(process.url, tokenizer, mode))
        finally:
            stop_server(process)
    results["repeated_prompt"] = reuse

    process = server()
    try:
        results["beam_flood"] = asyncio.run(beam_flood(process.url, flood_s))
    finally:
        stop_server(process)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="another checkout to measure the same way")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 2048],
                        help="--max_prefill_tokens values for scenario 1 (2048: the whole prompt in one step)")
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scheduling.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from predictor.tiny import build_tiny_falcon

    workdir = Path(tempfile.mkdtemp(prefix="scheduling-"))
    model_dir = build_tiny_falcon(workdir / "tiny-7b", "7b")
    engine = engine_level(model_dir, args.budgets)
    runs = [run_scenarios(REPO, model_dir, workdir, args.budgets, args.flood_seconds, True)]
    if args.before is not None:
        runs.append(run_scenarios(args.before.resolve(), model_dir, workdir, args.budgets, args.flood_seconds,
                                  False))
    args.out.write_text(json.dumps(dict(load_average=os.getloadavg(), engine=engine, runs=runs), indent=2))
    print("== the engine in this process, no HTTP")
    for budget, row in engine["long_prompt"].items():
        print(f"  max_prefill_tokens {budget:>5}: decode step median {row['median_step_ms']:.2f} ms, worst while the "
              f"long prompt is computed {row['worst_step_ms']:.1f} ms ({row['ratio']:.1f}x); its first token "
              f"{row['long_ttft_ms']:.0f} ms")
    row = engine["repeated_prompt"]
    print(f"  repeated prompt: first token {row['warm_ttft_ms']:.1f} ms vs cold {row['cold_ttft_ms']:.1f} ms "
          f"({row['ratio']:.2f})")
    for run in runs:
        print(f"== {run['repo']} (long prompt: {run['long_prompt_tokens']} tokens)")
        for budget, row in run["long_prompt"].items():
            print(f"  max_prefill_tokens {budget:>9}: stream gap median {row['median_gap_ms']:.1f} ms, worst "
                  f"{row['worst_gap_ms']:.0f} ms ({row['ratio']:.1f}x); long prompt's first token "
                  f"{row['long_ttft_ms']:.0f} ms")
        for mode, row in run["repeated_prompt"].items():
            print(f"  prefix caching {mode:>3}: {row['prompt_tokens']}-token follow-up, first token "
                  f"{row['warm_ttft_ms']:.0f} ms vs cold {row['cold_ttft_ms']:.0f} ms ({row['ratio']:.2f})")
        flood = run["beam_flood"]
        print(f"  beam flood: the lone sampling client got {flood['answered_200']} of {flood['lone_requests']} "
              f"answered ({flood['share_200']:.0%}); statuses {flood['statuses']}")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
