"""Throughput benchmark: the server over HTTP against the limit of calling ``generate`` directly, in one run.

For each architecture it
1. loads the model the way the server does (``load_engine``) and times transformers' ``generate`` on left-padded
   batches of the benchmark prompts (greedy, a fixed number of new tokens): the *limit*;
2. unloads it, starts ``python -m predictor`` on the same checkpoint, dtype and device, and drives ``POST /chat``
   with closed loops of C client workers, the same prompts and lengths, while a probe times ``GET /health``;
3. prints server/limit ratios against the targets, and writes a JSON file and a Markdown table.

The direct side and the server never run at the same time. Each uses its own default thread count (the direct
side torch's, one per core; the server on a CPU the cores less one) unless ``--threads`` sets one for both. ``loadgen`` drives the server, ``report`` compares and records.

    python benchmarks/bench.py                                    # tiny Falcon, both architectures, CPU
    python benchmarks/bench.py --device cuda --shape falcon-7b    # random weights at the real falcon-7b shape
    python benchmarks/bench.py --compile                          # also the server with --compile, same run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import report
import torch
from loadgen import measure_server, start_server, stop_server, summarize

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
PROMPT_COUNT = 32
FALCON_7B_LAYERS = 32
PROMPT_TOKENS = (16, 64)  # shortest and longest prompt, in tokens
WORDS = ("the", "model", "server", "request", "batch", "token", "value", "list", "string", "return", "default",
         "function", "argument", "object", "file", "path", "name", "type", "error", "data", "class", "method",
         "test", "case", "time", "number", "first", "last", "new", "old", "is", "a", "of", "to", "and", "in", "for",
         "with", "when", "that", "each", "all", "one", "two", "three", "falcon", "fast", "slow", "queue", "wait")


@dataclass(frozen=True)
class BenchConfig:
    archs: tuple[str, ...]
    shape: str  # "tiny", "falcon-7b", or "falcon-7b-<N>-layers" (its widths, fewer layers)
    layers: int  # of the falcon-7b shape
    device: str  # "cpu" or "cuda"
    dtype: str  # as the server's --dtype: auto, bfloat16, float16, float32
    new_tokens: int  # generated per sequence, exactly (min_new_tokens = max_new_tokens)
    concurrency: tuple[int, ...]  # client workers; also the direct batch sizes
    requests_per_worker: int  # fewest measured requests per worker; the direct side times as many batches
    min_seconds: float  # each figure is measured over at least this long
    probe_interval_s: float
    threads: int | None  # torch intra-op threads on both sides; None: each side's default
    compile: bool  # also measure a server started with --compile, after the default one
    workdir: Path  # checkpoints and server logs
    out: Path  # JSON results; the table goes beside it as .md


# -- configuration ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=["7b", "40b", "both"], default=None,
                        help="attention layout; default both for tiny, 7b for falcon-7b")
    parser.add_argument("--shape", choices=["tiny", "falcon-7b"], default="tiny",
                        help="tiny: predictor.tiny's checkpoints; falcon-7b: random weights at the real shape "
                             "(~14 GB in bf16, GPU only unless --layers makes it smaller)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --shape falcon-7b: keep its widths and vocabulary but build only this many of "
                             "its 32 layers (1 layer: 0.5 B parameters), e.g. to try the GPU run on a CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for both sides")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on cuda, float32 on cpu (as the server)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 for tiny, 128 for falcon-7b")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help=f"client workers, and the direct batch sizes (1 to {PROMPT_COUNT})")
    parser.add_argument("--requests-per-worker", type=int, default=4,
                        help="fewest measured requests per worker (and direct batches per batch size)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="workers keep sending (and the direct side keeps timing batches) until this long "
                             "has passed")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="seconds between /health probes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (torch.set_num_threads here, OMP_NUM_THREADS for the "
                             "server); default: each side's own (torch's one per core here, the server's cores "
                             "less one on a CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="after the default server, measure one started with --compile (static KV cache, "
                             "compiled decode step) on the same prompts")
    parser.add_argument("--workdir", type=Path, default=_default_workdir(), help="checkpoints and server logs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (a .md table is written beside it); default "
                             "benchmarks/results/<shape>-<device>.json")
    args = parser.parse_args(argv)
    if args.layers is not None and (args.shape != "falcon-7b" or not 1 <= args.layers <= FALCON_7B_LAYERS):
        parser.error(f"--layers goes with --shape falcon-7b and is 1 to {FALCON_7B_LAYERS}")
    layers = args.layers or FALCON_7B_LAYERS
    if args.shape == "falcon-7b" and args.device != "cuda" and layers == FALCON_7B_LAYERS:
        parser.error("--shape falcon-7b needs --device cuda (the checkpoint is ~14 GB of random bf16 weights), "
                     "or --layers N for a smaller model of its widths")
    if args.shape == "falcon-7b" and args.arch not in (None, "7b"):
        parser.error("--shape falcon-7b has the 7b architecture only")
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if (args.threads is not None and args.threads < 1) or args.min_seconds < 0:
        parser.error("--threads must be at least 1 and --min-seconds at least 0")
    if min(args.concurrency) < 1 or max(args.concurrency) > PROMPT_COUNT or args.requests_per_worker < 1:
        parser.error(f"--concurrency must be in 1..{PROMPT_COUNT} and --requests-per-worker at least 1")
    arch = args.arch or ("both" if args.shape == "tiny" else "7b")
    shape = args.shape if layers == FALCON_7B_LAYERS else f"{args.shape}-{layers}-layers"
    return BenchConfig(
        archs=("7b", "40b") if arch == "both" else (arch,), shape=shape, layers=layers, device=args.device,
        dtype=args.dtype,
        new_tokens=args.new_tokens or (64 if args.shape == "tiny" else 128),
        concurrency=tuple(sorted(set(args.concurrency))), requests_per_worker=args.requests_per_worker,
        min_seconds=args.min_seconds, probe_interval_s=args.probe_interval, threads=args.threads,
        compile=args.compile, workdir=args.workdir,
        out=args.out or REPO / "benchmarks" / "results" / f"{shape}-{args.device}.json")


def _default_workdir() -> Path:
    from predictor.tiny import default_cache_dir

    return default_cache_dir() / "bench"


# -- checkpoints and prompts -----------------------------------------------------------------------------------
def prepare_checkpoint(config: BenchConfig, arch: str) -> Path:
    """The checkpoint to benchmark, built once under the workdir."""
    from predictor.tiny import build_tiny_falcon

    if config.shape == "tiny":
        return build_tiny_falcon(config.workdir / f"tiny-{arch}", arch)
    return build_random_falcon(config.workdir / f"{config.shape}-shape", falcon_7b_config(config.layers),
                               config.device)


def falcon_7b_config(layers: int = FALCON_7B_LAYERS):
    """falcon-7b's real shape (tiiuae/falcon-7b config.json): 6.9 B parameters in 32 layers."""
    from transformers import FalconConfig

    return FalconConfig(vocab_size=65024, hidden_size=4544, num_attention_heads=71, num_hidden_layers=layers,
                        multi_query=True, parallel_attn=True, bias=False, new_decoder_architecture=False,
                        alibi=False, max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)


def build_random_falcon(save_dir: Path, model_config, device: str) -> Path:
    """Random bf16 weights for ``model_config`` with the tiny tokenizer (its 1024 ids fit any Falcon vocab)."""
    from transformers import FalconForCausalLM

    from predictor.tiny import build_tokenizer

    marker = save_dir / "random-falcon.json"
    if marker.exists():
        return save_dir
    staging = save_dir.with_name(save_dir.name + ".partial")  # renamed into place once complete
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build_tokenizer(staging)
    torch.manual_seed(SEED)
    with torch.device(device):  # initialising 6.9 B parameters on the CPU takes minutes; on a GPU, seconds
        model = FalconForCausalLM._from_config(model_config, dtype=torch.bfloat16).eval()
    model.generation_config.pad_token_id = model_config.eos_token_id
    model.save_pretrained(staging)
    del model
    (staging / "random-falcon.json").write_text(json.dumps({"seed": SEED}))
    staging.rename(save_dir)
    return save_dir


def make_prompts(encode, count: int = PROMPT_COUNT, lengths: tuple[int, int] = PROMPT_TOKENS) -> list[str]:
    """Deterministic prompts whose token counts spread over ``lengths``, shuffled so any prefix mixes them."""
    rng = random.Random(SEED)
    shortest, longest = lengths
    targets = [shortest + round((longest - shortest) * i / (count - 1)) for i in range(count)]
    rng.shuffle(targets)
    prompts = []
    for target in targets:
        words: list[str] = []
        while len(encode(" ".join(words))) < target:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words))
    return prompts


# -- the limit: generate() in this process ---------------------------------------------------------------------
def measure_direct(engine, prompts: list[str], config: BenchConfig) -> dict[str, Any]:
    """generate() on batches of the first B prompts, for each B in the concurrency levels."""
    rows = []
    for size in config.concurrency:
        ids, mask = left_pad([engine.encode(p) for p in prompts[:size]], pad_id=engine.info.eos_token_id)
        timed_generate(engine, ids, mask, config.new_tokens)  # warm-up
        seconds: list[float] = []
        while len(seconds) < config.requests_per_worker or sum(seconds) < config.min_seconds:
            seconds.append(timed_generate(engine, ids, mask, config.new_tokens))
        total = sum(seconds)
        rows.append(dict(batch=size, batches=len(seconds), seconds=total,
                         sequences_per_s=size * len(seconds) / total,
                         tokens_per_s=size * len(seconds) * config.new_tokens / total,
                         batch_ms=summarize([s * 1000 for s in seconds])))
    return dict(rows=rows, single_stream=measure_single_stream(engine, prompts[0], config))


def measure_single_stream(engine, prompt: str, config: BenchConfig) -> dict[str, float]:
    """Batch-1 time per generated token, and decode alone: (t(N tokens) - t(1 token)) / (N - 1)."""
    ids, mask = left_pad([engine.encode(prompt)], pad_id=engine.info.eos_token_id)
    repeats = max(3, config.requests_per_worker)
    full = float(np.median([timed_generate(engine, ids, mask, config.new_tokens) for _ in range(repeats)]))
    first = float(np.median([timed_generate(engine, ids, mask, 1) for _ in range(repeats)]))
    return dict(ms_per_token=full * 1000 / config.new_tokens, prefill_ms=first * 1000,
                decode_ms_per_token=(full - first) * 1000 / (config.new_tokens - 1))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [batch, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [batch, width]
    return ids, mask


@torch.inference_mode()
def timed_generate(engine, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy generate() of exactly ``new_tokens`` tokens per row."""
    ids, mask = ids.to(engine.device), mask.to(engine.device)
    _synchronize(engine.device)
    start = time.perf_counter()
    out = engine.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=engine.info.eos_token_id)
    _synchronize(engine.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one architecture, end to end ------------------------------------------------------------------------------
def bench_arch(config: BenchConfig, arch: str) -> dict[str, Any]:
    from predictor.engine.model.loading import LoadSpec, load_engine

    model_dir = prepare_checkpoint(config, arch)
    _log(f"[{arch}] direct generate() on {model_dir}")
    engine = load_engine(LoadSpec(source=str(model_dir), dtype=config.dtype, device=config.device))
    prompts = make_prompts(engine.encode)
    prompt_tokens = [len(engine.encode(p)) for p in prompts]
    parameters = sum(p.numel() for p in engine.model.parameters())
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    direct = measure_direct(engine, prompts, config)
    del engine  # the server gets the machine to itself
    gc.collect()
    if config.device == "cuda":
        torch.cuda.empty_cache()

    modes = [("eager", ())] + ([("compiled", ("--compile",))] if config.compile else [])
    servers = [measure_server_mode(config, model_dir, arch, mode, flags, prompts, direct["rows"])
               for mode, flags in modes]
    return dict(arch=arch, shape=config.shape, device=config.device, dtype=dtype, parameters=parameters,
                new_tokens=config.new_tokens, prompt_tokens=prompt_tokens, direct=direct, servers=servers)


def measure_server_mode(config: BenchConfig, model_dir: Path, arch: str, mode: str, flags: Sequence[str],
                        prompts: list[str], direct_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The server started with ``flags``, driven at each concurrency and compared with the direct rows."""
    _log(f"[{arch}] server over HTTP ({mode})")
    started = time.monotonic()
    server = start_server(model_dir, name=f"bench-{arch}-{mode}-{os.getpid()}", dtype=config.dtype,
                          device=config.device, max_batch_size=max(32, *config.concurrency), threads=config.threads,
                          log_dir=config.workdir, cwd=REPO, extra_args=flags)
    startup_seconds = time.monotonic() - started
    try:
        loads = measure_server(server.url, prompts, config.concurrency,
                               new_tokens=config.new_tokens, requests_per_worker=config.requests_per_worker,
                               min_seconds=config.min_seconds, probe_interval_s=config.probe_interval_s)
    finally:
        stop_server(server)
    comparison = report.compare(direct_rows, loads, config.shape)
    return dict(mode=mode, flags=list(flags), startup_seconds=startup_seconds, server=loads, comparison=comparison,
                targets=report.check_targets(comparison, loads, config.shape, config.device))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    load_before = os.getloadavg()
    started = time.time()
    runs = [bench_arch(config, arch) for arch in config.archs]
    results = dict(machine=report.machine_info(config.device, REPO),
                   config={**asdict(config), "workdir": str(config.workdir), "out": str(config.out)},
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                   wall_seconds=time.time() - started, load_average=dict(before=load_before, after=os.getloadavg()),
                   runs=runs, passed=all(check["passed"] for run in runs for server in run["servers"]
                                          for check in server["targets"]))
    table = "\n\n".join([report.format_header(results)] + [report.format_run(run) for run in runs])
    report.write_results(results, table, config.out)
    print(table)
    print(f"\nWrote {config.out} and {config.out.with_suffix('.md')} in {results['wall_seconds']:.0f} s")
    return results


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    main()
