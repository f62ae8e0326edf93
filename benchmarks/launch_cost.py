"""The forward's own launch cost: the CPU time of one decode step on narrow Falcons at real depth, eager and compiled.

A Falcon with hidden size 64 does almost no arithmetic per layer, so the CPU time of its forward is nearly all Python
and operator dispatch: what a GPU's host spends launching the same step of falcon-7b (32 layers, multi-query) or
falcon-40b (60 layers, grouped K/V heads). Random weights from a config (``predictor.tiny.tiny_config`` with the real
layer count), one thread; ``Engine.step`` over 1 and 256 running rows, eager and with ``--compile``
(``Engine.reserve(compile=True)``, then compiled on the shapes measured; a server's ``warm_up`` records every shape
up front, minutes on this CPU). Reported per step and per layer; no target (issue 30, point 5).

    python benchmarks/launch_cost.py                        # 32 and 60 layers, 1 and 256 rows, eager (a minute)
    python benchmarks/launch_cost.py --compile-layers 32    # and compiled at 32 layers (about 10 minutes here)

Figures on a shared machine are noisy: compare the columns of one run, never figures of two runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {32: "7b", 60: "40b"}  # falcon-7b's depth in its layout, falcon-40b's in its own
CONTEXT = 256  # tokens per row: enough for the steps measured, and 256 rows of 60 layers stay near 1 GiB


def measure(tokenizer_dir: str, layers: int, rows: int, compiled: bool, steps: int) -> list[float]:
    """CPU seconds of each of ``steps`` decode steps over ``rows`` running rows (run in a child process)."""
    import torch
    from transformers import AutoTokenizer, FalconForCausalLM

    from predictor.engine.model.runner import Engine
    from predictor.tiny import tiny_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = tiny_config(LAYOUTS[layers])
    config.num_hidden_layers, config.max_position_embeddings = layers, CONTEXT
    engine = Engine(FalconForCausalLM(config).eval(), AutoTokenizer.from_pretrained(tokenizer_dir))
    engine.reserve(rows + 1, compile=compiled)  # and the scratch row a compiled step pads with
    prompt = engine.encode("Once upon a time, in a land far away")
    logits = engine.step([], [(row, prompt, 1) for row in range(rows)])  # [rows, vocab]
    decode = [(row, int(token)) for row, token in enumerate(logits.argmax(-1).tolist())]
    for _ in range(3):  # compiles the shape measured, and warms the allocator either way
        engine.step(decode)
    times = []
    for _ in range(steps):
        started = time.process_time()
        engine.step(decode)
        times.append(time.process_time() - started)
    return times


def run_child(tokenizer_dir: str, layers: int, rows: int, compiled: bool, steps: int) -> list[float]:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(1, {str(REPO / 'benchmarks')!r});"
            f"import launch_cost; print(launch_cost.measure({tokenizer_dir!r}, {layers}, {rows}, {compiled}, "
            f"{steps}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measuring {layers} layers x {rows} rows failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 60], choices=sorted(LAYOUTS),
                        help="depths measured (32: falcon-7b's, 60: falcon-40b's)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 256], help="running rows per step")
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed per measurement")
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[], choices=sorted(LAYOUTS),
                        help="depths also measured compiled (each shape compiles for about 4 minutes on a shared CPU "
                             "at 32 layers, so none by default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "launch-cost"),
                        help="where the figures go (.json and .md)")
    args = parser.parse_args()

    from predictor.tiny import build_tiny_falcon

    rows_out = []
    with tempfile.TemporaryDirectory(prefix="launch-cost-") as tmp:
        tokenizer_dir = str(build_tiny_falcon(Path(tmp) / "tiny", "7b"))
        for layers in args.layers:
            for rows in args.rows:
                for compiled in [False, True] if layers in args.compile_layers else [False]:
                    started = time.monotonic()
                    median = statistics.median(run_child(tokenizer_dir, layers, rows, compiled, args.steps))
                    rows_out.append({"layers": layers, "layout": LAYOUTS[layers], "rows": rows,
                                     "mode": "compiled" if compiled else "eager", "step_cpu_ms": median * 1e3,
                                     "per_layer_cpu_ms": median * 1e3 / layers,
                                     "wall_s": round(time.monotonic() - started, 1)})
                    print(rows_out[-1], flush=True)
    header = "| layers | rows | mode | CPU ms per step | CPU ms per layer |\n|---:|---:|---|---:|---:|\n"
    table = header + "".join(f"| {r['layers']} | {r['rows']} | {r['mode']} | {r['step_cpu_ms']:.2f} | "
                             f"{r['per_layer_cpu_ms']:.3f} |\n" for r in rows_out)
    print(table)
    out = Path(args.out)
    result = {"steps": args.steps, "context": CONTEXT, "torch_threads": 1, "hidden_size": 64, "medians": rows_out}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("# The forward's launch cost (CPU time of one decode step, median)\n\n"
                                      f"Hidden size 64, random weights, 1 thread, {args.steps} steps each.\n\n"
                                      + table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
