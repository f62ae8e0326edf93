"""Step time of tensor parallelism on the CPU: 2 ranks over gloo against one process, and the share in collectives.

    python benchmarks/tensor_parallel.py            -> benchmarks/results/tensor-parallel-cpu.{json,md}

The model is a 40B-shaped Falcon (new decoder architecture, grouped K/V heads) with random weights, wide enough
that a step reads real amounts of weights (about 340 MB in float32), built on this machine. Each side decodes the
same batch for the same steps through the engine (``Engine.step``), timed per step on rank 0: one process on one
thread, one process on two threads (the cores the two ranks use together), and two ranks on one thread each.
Rank 0's time inside the per-layer all-reduce is reported as the collectives' share; it includes waiting for the
other rank to arrive. The CPU has no NVLink: these figures show the mechanism's cost, not a GPU's speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from predictor.engine.parallel.ranks import ParallelSpec, load_sharded_engine  # noqa: E402
from predictor.engine.model.runner import Engine  # noqa: E402
from predictor.engine.model.loading import LoadSpec, load_engine  # noqa: E402
from predictor.tiny import build_tokenizer  # noqa: E402

SHAPE = dict(vocab_size=1024, hidden_size=1024, num_attention_heads=16, num_kv_heads=4, num_hidden_layers=8,
             new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
             max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)
PROMPT_TOKENS = 64


def build_checkpoint(directory: Path) -> Path:
    from transformers import FalconConfig, FalconForCausalLM

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(1234)
    FalconForCausalLM(FalconConfig(**SHAPE)).save_pretrained(directory)
    build_tokenizer(directory)
    return directory


def time_steps(engine: Engine, batch: int, steps: int, warm_up: int = 3) -> list[float]:
    """Prefill ``batch`` rows, then decode them together: each decode step's seconds."""
    prompt = [(13 * i) % 1000 + 12 for i in range(PROMPT_TOKENS)]
    with torch.inference_mode():
        logits = engine.step([], [(row, prompt, 1) for row in range(batch)])
        tokens = logits.argmax(-1).tolist()
        seconds = []
        for step in range(warm_up + steps):
            started = time.perf_counter()
            logits = engine.step(list(zip(range(batch), tokens)))
            tokens = logits.argmax(-1).tolist()
            if step >= warm_up:
                seconds.append(time.perf_counter() - started)
    for row in range(batch):
        engine.cache.release(row)
    engine.cache.clear()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "falcon-predictor" / "tp-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tensor-parallel-cpu.json")
    args = parser.parse_args()
    source = str(build_checkpoint(args.workdir / "falcon-40b-shaped"))
    spec = LoadSpec(source, device="cpu", dtype="float32")

    single = load_engine(spec)
    single.reserve(args.batch)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[f"one process, {threads} thread(s)"] = time_steps(single, args.batch, args.steps)
    weights = sum(p.numel() * p.element_size() for p in single.model.parameters())
    del single

    sharded = load_sharded_engine(spec, ParallelSpec(world=2, threads=1))
    sharded.reserve(args.batch)
    in_collectives = []
    reduce = sharded.shape.reduce

    def timed_reduce(partial: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = reduce(partial)
        in_collectives.append(time.perf_counter() - started)
        return out

    sharded.shape.reduce = timed_reduce
    tp = time_steps(sharded, args.batch, args.steps)
    measured_collectives = in_collectives[-args.steps * SHAPE["num_hidden_layers"]:]
    sharded.close()
    results["2 ranks (gloo), 1 thread each"] = tp

    base = statistics.median(results["one process, 1 thread(s)"])
    rows = [dict(side=side, median_ms=1000 * statistics.median(s), min_ms=1000 * min(s),
                 vs_one_thread=statistics.median(s) / base) for side, s in results.items()]
    collective_share = sum(measured_collectives) / sum(tp)
    report = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__, shape=SHAPE,
                  weights_bytes=weights, batch=args.batch, steps=args.steps, rows=rows,
                  all_reduces_per_step=SHAPE["num_hidden_layers"],
                  all_reduce_ms_median=1000 * statistics.median(measured_collectives),
                  collective_share_of_tp_step=collective_share)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Tensor parallelism on the CPU: decode step time, batch {args.batch}, {args.steps} steps",
             "", f"40B-shaped Falcon, {weights / 1e6:.0f} MB of float32 weights, {SHAPE['num_hidden_layers']} layers "
             f"(one all-reduce each per step); torch {torch.__version__}.", "",
             "| side | median ms/step | min ms/step | vs one process, 1 thread |", "|---|---:|---:|---:|"]
    lines += [f"| {r['side']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['vs_one_thread']:.2f} |" for r in rows]
    lines += ["", f"Rank 0's time in all-reduce (waiting for rank 1 included): {100 * collective_share:.1f}% of the "
              f"TP step, {report['all_reduce_ms_median']:.3f} ms median per all-reduce."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
