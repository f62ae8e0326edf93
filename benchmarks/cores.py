"""Where the server's cores go under /chat load, and what the engine does without HTTP (issue 30, point 4).

Two measurements on the tiny Falcon (7b layout, CPU), greedy, 32 new tokens, ``bench.py``'s prompts:

1. **The server.** ``python -m predictor`` with 1 and with 2 operator threads (``OMP_NUM_THREADS``), in turns,
   driven by ``loadgen``'s closed loops of non-streamed ``POST /chat`` at each concurrency. Around each round, every
   server thread's CPU seconds from ``/proc``: the process's cores in use, the decode thread's share of the wall
   time (it runs the forward itself with one operator thread), and the event loop's CPU per request.
2. **The engine alone.** The same engine and ``Batcher`` in this process, a closed loop of C coroutines submitting
   the same jobs (no HTTP, no JSON), against transformers' ``generate`` on batches of C prompts, in turns, with the
   same operator threads.

    python benchmarks/cores.py                      -> benchmarks/results/cores.{json,md}
    python benchmarks/cores.py --rounds 3 --concurrency 8 32

Both alternate their configurations round by round: on a shared machine compare within a round, and medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gil_cost import thread_cpu  # noqa: E402
from loadgen import measure_server, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 32


def server_round(model_dir: Path, prompts: list[str], threads: int, concurrency: list[int], workdir: Path
                 ) -> list[dict]:
    server = start_server(model_dir, name=f"cores-{threads}", dtype="auto", device="cpu", max_batch_size=None,
                          threads=threads, log_dir=workdir, cwd=ROOT)
    rows = []
    try:
        for clients in concurrency:
            before, started = thread_cpu(server.process.pid), time.perf_counter()
            load = measure_server(server.url, prompts, (clients,), new_tokens=NEW_TOKENS, requests_per_worker=4,
                                  min_seconds=6.0, probe_interval_s=0.05)[0]
            wall, after = time.perf_counter() - started, thread_cpu(server.process.pid)
            used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            loop = used.pop(server.process.pid, 0.0)  # the main thread runs the event loop
            decode = max(used.values())
            rows.append(dict(threads=threads, concurrency=clients, sequences_per_s=load["sequences_per_s"],
                             cores=(loop + sum(used.values())) / wall, decode_thread_share=decode / wall,
                             event_loop_ms_per_request=loop / load["requests"] * 1e3, requests=load["requests"]))
    finally:
        stop_server(server)
    return rows


def engine_round(model_dir: Path, threads: int, concurrency: list[int]) -> list[dict]:
    """In a child process, so that its operator threads are its own from the start."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            f"import cores; print(json.dumps(cores.engine_alone({str(model_dir)!r}, {concurrency!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return [dict(threads=threads, **row) for row in json.loads(out.stdout.strip().splitlines()[-1])]


def engine_alone(model_dir: str, concurrency: list[int], seconds: float = 4.0) -> list[dict]:
    """The batcher with no HTTP, and generate() on the same prompts, sequences per second at each concurrency."""
    import bench

    from predictor.api.chat.mapping import to_generation_job
    from predictor.api.chat.schema import parse_chat_request
    from predictor.engine.model.loading import LoadSpec, load_engine
    from predictor.engine.options import Limits
    from predictor.engine.scheduling.batcher import Batcher

    engine = load_engine(LoadSpec(model_dir))
    engine.reserve(2 * max(concurrency))
    gc.collect()  # as the server does once loaded: later full collections skip the model's and libraries' objects
    gc.freeze()
    prompts = bench.make_prompts(engine.encode)
    jobs = [to_generation_job(parse_chat_request({"prompt": p, "generate_kwargs": {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}}), engine.encode(p), engine.info, Limits())
        for p in prompts]

    async def closed_loop(clients: int, seconds: float) -> float:
        batcher = Batcher(engine, max_batch_size=clients, max_queue=4 * clients, prefix_caching=True)
        batcher.start()
        done, stop = 0, time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await batcher.submit(jobs[i % len(jobs)]).result()
                done, i = done + 1, i + clients

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        batcher.close()
        return done / elapsed

    rows = []
    for clients in concurrency:
        ids, mask = bench.left_pad([engine.encode(p) for p in prompts[:clients]], engine.info.eos_token_id)
        bench.timed_generate(engine, ids, mask, NEW_TOKENS)  # warm-up
        asyncio.run(closed_loop(clients, 1.0))
        batches = []
        while sum(batches) < seconds:
            batches.append(bench.timed_generate(engine, ids, mask, NEW_TOKENS))
        direct = clients * len(batches) / sum(batches)
        alone = asyncio.run(closed_loop(clients, seconds))
        rows.append(dict(concurrency=clients, direct_sequences_per_s=direct, engine_sequences_per_s=alone,
                         ratio=alone / direct))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="operator threads to compare")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import bench
    from predictor.engine.model.loading import LoadSpec, load_engine
    from predictor.tiny import build_tiny_falcon

    workdir = Path(tempfile.mkdtemp(prefix="cores-"))
    model_dir = build_tiny_falcon(workdir / "tiny", "7b")
    prompts = bench.make_prompts(load_engine(LoadSpec(str(model_dir))).encode)
    server, alone = [], []
    for round_ in range(args.rounds):
        for threads in args.threads:
            server += [dict(round=round_, **row) for row in server_round(model_dir, prompts, threads,
                                                                         args.concurrency, workdir)]
            alone += [dict(round=round_, **row) for row in engine_round(model_dir, threads, args.concurrency)]
            print(server[-1], alone[-1], flush=True)

    def median(rows: list[dict], threads: int, clients: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["threads"] == threads and r["concurrency"] == clients)

    lines = ["| operator threads | clients | server seq/s | cores in use | decode thread ran | event loop ms/request "
             "| engine alone seq/s | generate seq/s | engine alone / generate |", "|---|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        for clients in args.concurrency:
            lines.append(
                f"| {threads} | {clients} | {median(server, threads, clients, 'sequences_per_s'):.0f} | "
                f"{median(server, threads, clients, 'cores'):.2f} | "
                f"{median(server, threads, clients, 'decode_thread_share'):.2f} | "
                f"{median(server, threads, clients, 'event_loop_ms_per_request'):.2f} | "
                f"{median(alone, threads, clients, 'engine_sequences_per_s'):.0f} | "
                f"{median(alone, threads, clients, 'direct_sequences_per_s'):.0f} | "
                f"{median(alone, threads, clients, 'ratio'):.2f} |")
    out = ROOT / "benchmarks" / "results" / "cores"
    out.with_suffix(".json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
        rounds=args.rounds, new_tokens=NEW_TOKENS, server=server, engine_alone=alone), indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Medians of {args.rounds} rounds.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
