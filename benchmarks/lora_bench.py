"""LoRA benchmark: requests/s with per-request adapters, and with Kaito's merged mix, against the base model alone,
in one run on one machine.

1. **base**: ``python -m predictor`` on the checkpoint with no adapters; 32 closed-loop clients on ``POST /chat``,
   measured right before each case below (all servers run at once; each ratio is a pair's, the median reported);
2. **per-request adapters**, for each rank (8 and 64): a server with 16 adapters of that rank targeting all four of
   Falcon's linear layers (``--lora_modules``, ``--max_loras 16``), the 32 clients spread over 0 (all on the base
   model, through the adapter-enabled engine), 1, 4 and 16 adapters by /chat's ``model``;
3. **Kaito's mix**: a server whose ``--adapter_dir`` holds two rank-8 ``query_key_value`` adapters (Kaito's
   fine-tuning default) at strengths 1.0 and 0.5, merged into the weights at load.

Each figure is the requests/s of a closed loop (each client sends its next request when one returns) after an
unmeasured warm-up round. The adapters are random PEFT-format
files written here (no PEFT needed). Writes ``--out`` (JSON) and a Markdown table beside it.

    python benchmarks/lora_bench.py                           # tiny Falcon (7b layout), CPU
    python benchmarks/lora_bench.py --arch 40b --new-tokens 8 --min-seconds 2
    python benchmarks/lora_bench.py --model_dir /mnt/models --device cuda --out benchmarks/results/lora-h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import aiohttp
import torch
from loadgen import start_server, stop_server
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from predictor.engine.lora.adapter import TARGETS  # noqa: E402
from predictor.tiny import build_tiny_falcon  # noqa: E402

PROMPTS = ["Return the value of the first argument", "The server takes each request in turn and",
           "Create a new list of the", "When the queue is full the batch"]
TARGET_AT_4 = 0.8  # requests/s with 4 adapters over the base model's


def write_adapter(folder: Path, shapes: list[dict[str, tuple[int, int]]], rank: int, targets: Sequence[str],
                  seed: int) -> Path:
    """A random LoRA adapter in PEFT's format (what ``save_pretrained`` writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, layer_shapes in enumerate(shapes):
        for target in targets:
            out_features, in_features = layer_shapes[target]
            key = f"base_model.model.transformer.h.{layer}.{TARGETS[target]}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets), "bias": "none",
              "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def model_shapes(model_dir: Path) -> list[dict[str, tuple[int, int]]]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    qkv = (heads + 2 * kv) * head_dim
    ffn = config.ffn_hidden_size
    return [{"query_key_value": (qkv, hidden), "dense": (hidden, hidden), "dense_h_to_4h": (ffn, hidden),
             "dense_4h_to_h": (hidden, ffn)}] * config.num_hidden_layers


async def closed_loop(url: str, models: list[str | None], clients: int, new_tokens: int, rounds: int,
                      min_seconds: float) -> dict[str, float]:
    """``clients`` workers, worker i asking for ``models[i % len(models)]`` (None: the base model)."""
    done = 0

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal done
        body: dict[str, Any] = {"prompt": PROMPTS[index % len(PROMPTS)], "return_full_text": False,
                                "generate_kwargs": {"do_sample": False, "max_new_tokens": new_tokens,
                                                    "min_new_tokens": new_tokens}}
        if models[index % len(models)] is not None:
            body["model"] = models[index % len(models)]
        sent = 0
        while sent < rounds or time.perf_counter() < deadline:
            sent += 1
            async with session.post("/chat", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"POST /chat answered {response.status}: {(await response.text())[:300]}")
                await response.read()
            done += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        start = time.perf_counter()
        deadline = start + min_seconds
        await asyncio.gather(*(worker(session, i) for i in range(clients)))
        seconds = time.perf_counter() - start
    return {"requests": done, "seconds": round(seconds, 3), "requests_per_s": done / seconds}


def measure(server, models: list[str | None], args: argparse.Namespace) -> dict[str, float]:
    asyncio.run(closed_loop(server.url, models, args.clients, args.new_tokens, 1, 0.0))  # warm-up
    return asyncio.run(closed_loop(server.url, models, args.clients, args.new_tokens, args.rounds,
                                   args.min_seconds))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start every server at once, then measure each case right after the base model, ``--repeats`` times: on a
    shared machine the load of the moment moves both figures of a pair alike, so each ratio is a pair's, and the
    reported one their median."""
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    model_dir = Path(args.model_dir) if args.model_dir else build_tiny_falcon(work / f"tiny-{args.arch}", args.arch)
    shapes = model_shapes(model_dir)
    empty = work / "no-adapters"
    servers = {"base": serve(model_dir, work, args, "base", ["--adapter_dir", str(empty)])}
    try:
        for rank in args.ranks:
            folders = [write_adapter(work / f"r{rank}" / f"a{i}", shapes, rank, list(TARGETS), seed=i)
                       for i in range(16)]
            servers[f"r{rank}"] = serve(model_dir, work, args, f"lora-r{rank}", [
                "--adapter_dir", str(empty), "--max_loras", "16", "--max_lora_rank", str(rank), "--lora_modules",
                *(f"a{i}={folder}" for i, folder in enumerate(folders))])
        kaito = work / "adapter"
        for i in range(2):
            write_adapter(kaito / f"kaito{i}", shapes, 8, ["query_key_value"], seed=100 + i)
        servers["kaito"] = serve(model_dir, work, args, "kaito", ["--adapter_dir", str(kaito)],
                                 {"kaito0": "1.0", "kaito1": "0.5"})
        cases = [("per-request", rank, count, f"r{rank}") for rank in args.ranks for count in (0, 1, 4, 16)]
        cases.append(("kaito-merged", 8, 2, "kaito"))
        pairs: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(cases))}
        for repeat in range(args.repeats):
            for i, (kind, rank, count, server) in enumerate(cases):
                models = ([f"a{j}" for j in range(count)] or [None]) if kind == "per-request" else [None]
                base = measure(servers["base"], [None], args)["requests_per_s"]
                case = measure(servers[server], models, args)["requests_per_s"]
                pairs[i].append((base, case))
                _log(f"[{repeat + 1}/{args.repeats}] {kind}, rank {rank}, {count:2d} adapters: {case:.2f} "
                     f"requests/s, base {base:.2f}: {case / base:.2f} x base")
    finally:
        for server in servers.values():
            stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    runs = []
    for i, (kind, rank, count, _) in enumerate(cases):
        ratios = [case / base for base, case in pairs[i]]
        runs.append({"kind": kind, "rank": rank, "adapters": count,
                     "requests_per_s": statistics.median(case for _, case in pairs[i]),
                     "base_requests_per_s": statistics.median(base for base, _ in pairs[i]),
                     "ratio_to_base": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios]})
    return {"machine": platform.platform(), "torch": torch.__version__, "device": args.device,
            "model": str(args.model_dir or f"tiny-{args.arch}"), "clients": args.clients,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "runs": runs}


def serve(model_dir: Path, work: Path, args: argparse.Namespace, name: str, extra: Sequence[str],
          environment: dict[str, str] | None = None):
    """A server process; ``environment`` (Kaito's strengths) is set for its start only."""
    saved = {key: os.environ.get(key) for key in environment or {}}
    os.environ.update(environment or {})
    try:
        return start_server(model_dir, name=name, dtype=args.dtype, device=args.device, max_batch_size=args.clients,
                            threads=None, log_dir=work / "logs", cwd=REPO, extra_args=extra)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"LoRA on {results['model']} ({results['device']}), {results['clients']} clients, "
             f"{results['new_tokens']} new tokens; medians of {results['repeats']} pairs (base, then the case)", "",
             "| served | rank | adapters in use | requests/s | base requests/s | x base (median of pairs) |",
             "|---|---|---|---|---|---|"]
    for run_ in results["runs"]:
        kind = "per-request (all four targets)" if run_["kind"] == "per-request" else "Kaito's mix, merged"
        lines.append(f"| {kind} | {run_['rank']} | {run_['adapters']} | {run_['requests_per_s']:.2f} | "
                     f"{run_['base_requests_per_s']:.2f} | {run_['ratio_to_base']:.2f} |")
    at_4 = [r["ratio_to_base"] for r in results["runs"] if r["kind"] == "per-request" and r["adapters"] == 4]
    lines += ["", f"Target: at least {TARGET_AT_4} x base with 4 adapters: "
              + ", ".join("PASS" if r >= TARGET_AT_4 else "FAIL" for r in at_4)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _log(message: str) -> None:
    print(f"[lora-bench] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="7b", choices=("7b", "40b"), help="tiny Falcon layout (no --model_dir)")
    parser.add_argument("--model_dir", default=None, help="a Falcon checkpoint instead of the tiny one")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="fewest requests per client in a measured loop")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3, help="pairs measured per case")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lora-cpu.json"))
    args = parser.parse_args(argv)
    results = run(args)
    write(results, Path(args.out))
    return results


if __name__ == "__main__":
    main()
