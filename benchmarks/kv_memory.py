"""KV-cache memory: what a token costs for falcon-7b and falcon-40b, and what a server's memory does under load.

1. From the real configs: bytes of keys and values per token, as this server stores them (the K/V groups) and as
   transformers' Falcon attention caches them (every query head), and how many full 2,048-token sequences fit the
   memory the weights leave on one H200 (141 GB) or two 80 GB GPUs.
2. On tiny checkpoints (both layouts, and one shaped like falcon-40b's attention: 32 query heads sharing 2 K/V
   groups): the cache the engine actually allocates, measured from its tensors, against the figure computed from
   the config.
3. A server on the 40b-attention tiny (4 layers, float32) under 24 concurrent /chat requests of 1,000 prompt
   tokens + 400 new ones: its resident memory once ready and at its peak, against the K/V groups of those tokens.
   ``--repo`` runs another checkout's server the same way (the figure before a change, in the same run). The
   peak moves by about 20 MiB from one server start to the next, so each checkout runs ``--rounds`` times, taking
   turns, and its median growth is what compares.

    python benchmarks/kv_memory.py                           # this checkout
    python benchmarks/kv_memory.py --repo /tmp/before       # and another checkout's server, for comparison
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch
from loadgen import start_server, stop_server

REPO = Path(__file__).resolve().parent.parent
CONTEXT = 2048
GB = 10**9
# (layers, hidden, heads, K/V heads, weights in GB at bf16, GPU memory per replica in GB) from FIELD.md
SHAPES = {"falcon-7b": (32, 4544, 71, 1, 13.8, [141]), "falcon-40b": (60, 8192, 128, 8, 82.6, [141, 2 * 80])}


def computed_table() -> list[dict[str, Any]]:
    rows = []
    for name, (layers, hidden, heads, kv_heads, weights_gb, gpus) in SHAPES.items():
        head_dim = hidden // heads
        ours = 2 * layers * kv_heads * head_dim * 2  # keys and values, bf16
        # transformers repeats the K/V groups to every query head for the new decoder architecture
        theirs = 2 * layers * (heads if kv_heads > 1 else 1) * head_dim * 2
        for memory_gb in gpus:
            free = memory_gb * GB - weights_gb * GB
            rows.append(dict(model=name, gpu_memory_gb=memory_gb, bytes_per_token=ours,
                             transformers_bytes_per_token=theirs, sequences=int(free // (ours * CONTEXT)),
                             transformers_sequences=int(free // (theirs * CONTEXT))))
    return rows


def build_grouped(path: Path) -> Path:
    """A tiny Falcon with falcon-40b's attention layout: 32 query heads, 2 K/V groups, 4 layers, float32."""
    from transformers import FalconForCausalLM

    from predictor.tiny import build_tokenizer, tiny_config

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    config = tiny_config("40b")
    config.num_attention_heads, config.num_kv_heads, config.hidden_size, config.num_hidden_layers = 32, 2, 512, 4
    torch.manual_seed(1)
    model = FalconForCausalLM(config)
    model.generation_config.pad_token_id = config.eos_token_id
    model.save_pretrained(path)
    return path


def measured_on_tiny(workdir: Path) -> list[dict[str, Any]]:
    from predictor.engine.model.loading import LoadSpec, load_engine
    from predictor.tiny import build_tiny_falcon

    dirs = {"7b": build_tiny_falcon(workdir / "tiny-7b", "7b"), "40b": build_tiny_falcon(workdir / "tiny-40b", "40b"),
            "40b-attention": build_grouped(workdir / "tiny-grouped")}
    rows = []
    for name, path in dirs.items():
        engine = load_engine(LoadSpec(str(path), device="cpu"))
        cache = engine.reserve(8)
        allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        rows.append(dict(checkpoint=name, kv_heads=engine.shape.kv_heads, heads=engine.shape.heads,
                         bytes_per_token=engine.cache_shape.bytes_per_token, rows=8,
                         computed_bytes=cache.nbytes, allocated_bytes=allocated,
                         scratch_row_bytes=allocated - cache.nbytes))
    return rows


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _load(url: str, prompt: str, clients: int, new_tokens: int) -> list[int]:
    body = {"prompt": prompt, "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async def one(i: int) -> int:
            payload = {**body, "prompt": f"{i} {prompt}"}
            async with session.post(f"{url}/chat", json=payload) as response:
                response.raise_for_status()
                return sum((await response.json())["details"]["generated_tokens"])
        return await asyncio.gather(*(one(i) for i in range(clients)))


def server_growth(repo: Path, model_dir: Path, workdir: Path, clients: int, prompt_tokens: int,
                  new_tokens: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words, prompt = [], ""
    while len(tokenizer(prompt)["input_ids"]) < prompt_tokens - 2:
        words.append(f"word{len(words) % 97}")
        prompt = " ".join(words)
    server = start_server(model_dir, name=f"kvmem-{os.getpid()}", dtype="float32", device="cpu",
                          max_batch_size=32, threads=None, log_dir=workdir, cwd=repo)
    try:
        pid = server.process.pid
        ready = rss_mib(pid)
        peak, done = ready, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        generated = asyncio.run(_load(server.url, prompt, clients, new_tokens))
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        after = rss_mib(pid)
    finally:
        stop_server(server)
    tokens = clients * (len(tokenizer(prompt)["input_ids"]) + 2 + new_tokens)
    per_token = 2 * 4 * 2 * 16 * 4  # 4 layers x 2 K/V groups x head size 16, float32, keys and values
    return dict(repo=str(repo), clients=clients, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                generated_tokens=sum(generated), seconds=seconds, rss_ready_mib=ready, rss_peak_mib=peak,
                rss_after_mib=after, growth_mib=peak - ready, kv_groups_mib=tokens * per_token / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="another checkout whose server to measure the same way (repeatable)")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="servers started per checkout, taking turns")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kv-memory.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(tempfile.mkdtemp(prefix="kv-memory-"))
    results: dict[str, Any] = dict(computed=computed_table(), tiny=measured_on_tiny(workdir))
    model_dir = build_grouped(workdir / "tiny-grouped")
    repos = [REPO, *(repo.resolve() for repo in args.repo)]
    results["servers"] = [server_growth(repo, model_dir, workdir, args.clients, args.prompt_tokens, args.new_tokens)
                           for _ in range(args.rounds) for repo in repos]
    results["median_growth_mib"] = {str(repo): statistics.median(row["growth_mib"] for row in results["servers"]
                                                                 if row["repo"] == str(repo)) for repo in repos}
    args.out.write_text(json.dumps(results, indent=2))
    for row in results["computed"]:
        print(f"{row['model']:<11} {row['gpu_memory_gb']:>4} GB: {row['bytes_per_token'] / 1024:>6.1f} KiB/token, "
              f"{row['sequences']:>5} full sequences (transformers' cache: "
              f"{row['transformers_bytes_per_token'] / 1024:.1f} KiB, {row['transformers_sequences']})")
    for row in results["tiny"]:
        print(f"tiny {row['checkpoint']:<14} {row['heads']:>2} heads / {row['kv_heads']} K/V: "
              f"{row['bytes_per_token']} B/token; 8 rows computed {row['computed_bytes']:,} B, allocated "
              f"{row['allocated_bytes']:,} B (+ scratch row {row['scratch_row_bytes']:,} B)")
    for row in results["servers"]:
        print(f"server {row['repo']}: ready {row['rss_ready_mib']:.0f} MiB, peak {row['rss_peak_mib']:.0f} MiB "
              f"(+{row['growth_mib']:.0f} MiB) for K/V groups of {row['kv_groups_mib']:.0f} MiB; "
              f"{row['generated_tokens']} tokens in {row['seconds']:.0f} s")
    for repo, growth in results["median_growth_mib"].items():
        print(f"server {repo}: median growth over {args.rounds} starts +{growth:.0f} MiB")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
