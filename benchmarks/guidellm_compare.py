"""guidellm against this server, beside this project's own load generator, for the same load (issue 33).

guidellm (the benchmark of llm-d and of Red Hat's inference server) is run as a new user runs it: its
``openai_http`` backend on its default request format (streamed ``/v1/chat/completions`` with
``stream_options.continuous_usage_stats``, ``ignore_eos``, text parts), a ``concurrent`` profile, synthetic text
prompts. For each concurrency (1, 8, 32) the same server then gets the same load from ``loadgen.streamed_loop``: as
many workers, the same prompt and output lengths, as many requests. Both record failed requests, time to first
token, inter-token latency and generated tokens/s; the target is 0 failed requests and throughputs within 10 % of
each other. A warm-up round (unmeasured) comes before each concurrency.

    python benchmarks/guidellm_compare.py                       # tiny Falcon (7b layout), CPU
    python benchmarks/guidellm_compare.py --concurrency 1 8 --requests-per-worker 2 --new-tokens 16
    python benchmarks/guidellm_compare.py --pin                 # server on core 0 (1 thread), clients on core 1

guidellm runs its requests from several worker processes; unpinned on a small machine they take cores from the
server that this project's one-process load generator leaves it, and the two tools measure different servers.
``--pin`` gives both tools the same server: one torch thread on the first core, every client on the others.

Writes ``--out`` (JSON) and a Markdown table beside it. Needs ``pip install guidellm``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from loadgen import start_server, stop_server, streamed_loop
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10  # the issue's target: the two tools' throughputs within 10 %
CORPUS = ("The server answers every request from one running batch, and each sequence joins and leaves it as its "
          "tokens are written; the prefix cache keeps the prompts it has seen. ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("guidellm") is None:
        print("guidellm is not installed: pip install guidellm", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="guidellm-compare-"))
    model_dir = args.model_dir or build_tiny(workdir / "tiny", args.arch)
    prompts = make_prompts(model_dir, args.prompt_tokens, max(args.concurrency))
    server_cpus, client_cpus = split_cores() if args.pin else (None, None)
    server = start_server(model_dir, name="guidellm-compare", dtype=args.dtype, device=args.device,
                          max_batch_size=None, threads=1 if args.pin else None, log_dir=workdir, cwd=ROOT,
                          cpus=server_cpus)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # this process's load generator, and guidellm's, which inherits it
    rows = []
    try:
        for concurrency in args.concurrency:
            asyncio.run(streamed_loop(server.url, server.model_name, prompts, concurrency, args.new_tokens, 1))
            guide = with_cpu(server, lambda: run_guidellm(server.url, model_dir, concurrency, args, workdir))
            ours = with_cpu(server, lambda: asyncio.run(streamed_loop(
                server.url, server.model_name, prompts, concurrency, args.new_tokens, args.requests_per_worker)))
            rows.append(dict(concurrency=concurrency, guidellm=guide, loadgen=ours,
                             throughput_ratio=guide["output_tokens_per_s"] / ours["output_tokens_per_s"]))
            print(row_line(rows[-1]), flush=True)
    finally:
        stop_server(server)
    report = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
                  config=dict(vars(args), model_dir=str(model_dir), guidellm=guidellm_version()), rows=rows,
                  passed=all(r["guidellm"]["failed"] == 0 and r["loadgen"]["failed"] == 0
                             and abs(r["throughput_ratio"] - 1) <= TOLERANCE for r in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    args.out.with_suffix(".md").write_text(table(rows))
    print(table(rows))
    print("PASS" if report["passed"] else "FAIL", f"(0 failed requests; throughputs within {TOLERANCE:.0%})")
    return 0 if report["passed"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=None, help="a checkpoint (default: a tiny Falcon)")
    parser.add_argument("--arch", choices=("7b", "40b"), default="7b", help="the tiny Falcon's layout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt, both tools")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request, both tools")
    parser.add_argument("--requests-per-worker", type=int, default=4,
                        help="requests per concurrent stream: concurrency x this many requests per tool")
    parser.add_argument("--pin", action="store_true",
                        help="the server (one torch thread) on the first core, both tools' clients on the others")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "guidellm-compare.json")
    return parser.parse_args(argv)


def split_cores() -> tuple[set[int], set[int]]:
    """The first core this process may use for the server, the rest for the clients."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs at least two cores")
    return {cores[0]}, set(cores[1:])


def build_tiny(path: Path, arch: str) -> Path:
    from predictor.tiny import build_tiny_falcon

    return build_tiny_falcon(path, arch)


def make_prompts(model_dir: Path, tokens: int, count: int) -> list[str]:
    """``count`` different prompts of about ``tokens`` tokens each (guidellm's synthetic prompts are that long)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(CORPUS * (tokens // 8 + count), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i:i + tokens]) for i in range(count)]


def run_guidellm(url: str, model_dir: Path, concurrency: int, args: argparse.Namespace, workdir: Path
                 ) -> dict[str, Any]:
    """One guidellm run on its defaults at ``concurrency`` streams; its figures from its JSON report."""
    out = workdir / f"guidellm-{concurrency}.json"
    command = ["guidellm", "run", "--backend", f"kind=openai_http,target={url}",
               "--profile", f"kind=concurrent,streams={concurrency}",
               "--constraint", f"kind=max_requests,count={concurrency * args.requests_per_worker}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.new_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return guidellm_figures(json.loads(out.read_text())["benchmarks"][0])


def guidellm_figures(benchmark: dict[str, Any]) -> dict[str, Any]:
    """Its counts and latencies as it reports them; tokens/s over the time from the first request sent to the last
    answer, as ``streamed_loop`` counts it (guidellm's own duration includes its start-up)."""
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]
    done = benchmark["requests"]["successful"]
    seconds = (max(r["request_end_time"] for r in done) - min(r["request_start_time"] for r in done)) if done else 0.0
    generated = sum(r["output_tokens"] or 0 for r in done)

    def spread(name: str) -> dict[str, float]:
        values = metrics[name]["successful"]
        return dict(count=values["count"], p50=values["median"], p99=values["percentiles"]["p99"],
                    max=values["max"])

    return dict(requests=totals["successful"], failed=totals["errored"] + totals["incomplete"], seconds=seconds,
                ttft_ms=spread("time_to_first_token_ms"), itl_ms=spread("inter_token_latency_ms"),
                output_tokens_per_s=generated / seconds if seconds else 0.0,
                requests_per_s=len(done) / seconds if seconds else 0.0)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds so far of this process with its waited-for children (a tool's clients), and of process ``pid``
    (the server, every thread)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, server


def with_cpu(server, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run``'s figures with the CPU milliseconds per generated token that its clients and the server spent: when
    the server's is the same under both tools and the clients' is not, the tools differ in what they measure with,
    not in what they measure."""
    client_before, server_before = cpu_seconds(server.process.pid)
    figures = run()
    client_after, server_after = cpu_seconds(server.process.pid)
    tokens = figures["output_tokens_per_s"] * figures["seconds"]
    return {**figures, "client_cpu_ms_per_token": 1000 * (client_after - client_before) / tokens if tokens else None,
            "server_cpu_ms_per_token": 1000 * (server_after - server_before) / tokens if tokens else None}


def guidellm_version() -> str:
    from importlib.metadata import version

    return version("guidellm")


def row_line(row: dict[str, Any]) -> str:
    g, o = row["guidellm"], row["loadgen"]
    return (f"concurrency {row['concurrency']}: guidellm {g['output_tokens_per_s']:.1f} tok/s ({g['failed']} failed), "
            f"loadgen {o['output_tokens_per_s']:.1f} tok/s ({o['failed']} failed), ratio {row['throughput_ratio']:.2f}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| concurrency | tool | requests (failed) | TTFT p50 / p99 ms | ITL p50 / p99 ms | generated tok/s | "
             "guidellm / loadgen | CPU ms per token: clients / server |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for tool in ("guidellm", "loadgen"):
            f = row[tool]
            ratio = f"{row['throughput_ratio']:.2f}" if tool == "guidellm" else ""
            lines.append(f"| {row['concurrency']} | {tool} | {f['requests']} ({f['failed']}) | "
                         f"{f['ttft_ms']['p50']:.0f} / {f['ttft_ms']['p99']:.0f} | "
                         f"{f['itl_ms']['p50']:.1f} / {f['itl_ms']['p99']:.1f} | {f['output_tokens_per_s']:.1f} | "
                         f"{ratio} | {f['client_cpu_ms_per_token']:.2f} / {f['server_cpu_ms_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
