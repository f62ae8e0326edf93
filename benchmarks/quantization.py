"""Quantized weights and the fp8 KV cache on the CPU, on a random Falcon of falcon-7b's width (4,544 wide, 71 query
heads sharing one K/V head, a 65,024-token vocabulary) with a few layers, so that a decode step reads memory the way
a real one does. One run measures, each configuration in a process of its own:

- the weights' bytes as held, and the peak resident memory while loading (over the process's memory before it);
- decode ms per step at batch 1 and 32 (every row 64 tokens into its sequence), the median of ``--steps`` steps;

for float32, bfloat16, and int8 weights over each (``--quantization int8``); and the rows a KV cache budget holds
with ``--kv_cache_dtype fp8`` against bfloat16, for this model and for the real falcon-7b and falcon-40b shapes.

    python benchmarks/quantization.py [--layers 2] [--steps 10] [--dir DIR]
    python benchmarks/quantization.py --layers 16 --steps 0 --configs bfloat16 "int8 (bfloat16 model)"  # bytes only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = {  # name: (--dtype, --quantization)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8 (float32 model)": ("float32", "int8"),
    "int8 (bfloat16 model)": ("bfloat16", "int8"),
}
BATCHES = (1, 32)
PROMPT_TOKENS = 64


def build_checkpoint(path: Path, layers: int) -> Path:
    """A random Falcon of falcon-7b's width with ``layers`` layers, saved in bfloat16 as the real one is, with the
    tiny tokenizer (its ids are a subset of the vocabulary)."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    from predictor.tiny import build_tokenizer

    if (path / "config.json").exists():
        return path
    config = FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=layers, num_attention_heads=71,
                          multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                          alibi=False, max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = FalconForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: that survives ``exec`` and so starts at
    the parent's peak, which building the checkpoint makes as large as the model."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def measure(model_dir: str, dtype: str, quantization: str | None, steps: int) -> dict:
    """One configuration, in this process: load, then time decode steps."""
    import torch

    from predictor.engine.model.loading import LoadSpec, load_engine
    from predictor.engine.quantization.linear import weight_bytes

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    before = rss_bytes()
    started = time.monotonic()
    engine = load_engine(LoadSpec(model_dir, dtype=dtype, device="cpu", quantization=quantization))
    load_s = time.monotonic() - started
    peak = peak_rss_bytes()  # the process's peak so far: the load's
    weights = weight_bytes(engine.model)
    engine.reserve(max(BATCHES))
    prompt = list(range(100, 100 + PROMPT_TOKENS))
    step_ms = {}
    for batch in BATCHES if steps else ():
        engine.cache.clear()
        for row in range(batch):
            engine.step([], [(row, prompt, 1)])
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            engine.step([(row, 500) for row in range(batch)])
            times.append((time.perf_counter() - began) * 1000)
        step_ms[batch] = statistics.median(times)
    return dict(weight_bytes=weights, load_peak_bytes=peak - before, load_s=round(load_s, 2),
                step_ms={str(b): round(ms, 1) for b, ms in step_ms.items()},
                ms_per_token={str(b): round(ms / b, 2) for b, ms in step_ms.items()})


def kv_rows(model_dir: str) -> dict:
    """Rows a 1 GiB budget holds with the cache in bfloat16 and in fp8, on this model and the real shapes."""
    from predictor.engine.model.loading import LoadSpec, load_engine
    from predictor.variants import VARIANTS

    rows = {}
    for kv in ("auto", "fp8"):
        engine = load_engine(LoadSpec(model_dir, dtype="bfloat16", device="cpu", quantization="int8",
                                      kv_cache_dtype=kv))
        rows[kv] = dict(bytes_per_token=engine.cache_shape.bytes_per_token, rows_per_gib=engine.rows_that_fit(2**30))
    real = {name: dict(bf16=VARIANTS[name].rows_on(1, 80, "fp8"), fp8=VARIANTS[name].rows_on(1, 80, "fp8", "fp8"))
            for name in ("falcon-7b", "falcon-40b")}
    return dict(this_model=dict(bfloat16=rows["auto"], fp8=rows["fp8"],
                                ratio=round(rows["fp8"]["rows_per_gib"] / rows["auto"]["rows_per_gib"], 3)),
                one_80gb_gpu_fp8_weights=real)


def table(results: dict) -> str:
    runs = results["configs"]
    bf16 = runs["bfloat16"]["weight_bytes"]
    lines = [f"Random Falcon, falcon-7b's width, {results['layers']} layers; CPU, {results['threads']} threads.", "",
             "| weights | bytes (MiB) | of bf16 | load peak / bytes | decode ms/step, batch 1 | batch 32 "
             "| ms/token at 32 |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['weight_bytes'] / 2**20:,.0f} | {run['weight_bytes'] / bf16:.2f} "
                     f"| {run['load_peak_bytes'] / run['weight_bytes']:.2f} | {run['step_ms'].get('1', '-')} "
                     f"| {run['step_ms'].get('32', '-')} | {run['ms_per_token'].get('32', '-')} |")
    kv = results["kv_cache"]
    lines += ["", f"KV cache rows per GiB on this model: bf16 {kv['this_model']['bfloat16']['rows_per_gib']}, fp8 "
              f"{kv['this_model']['fp8']['rows_per_gib']} ({kv['this_model']['ratio']}x)."]
    for name, rows in kv["one_80gb_gpu_fp8_weights"].items():
        lines.append(f"{name} on one 80 GB GPU, fp8 weights: {rows['bf16']} rows with a bf16 cache, {rows['fp8']} "
                     f"with fp8 ({rows['fp8'] / rows['bf16']:.2f}x).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one configuration, in a child
    parser.add_argument("--dir", default=None, help="where the random checkpoint is kept (default: a temporary folder)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="the configurations to measure (bfloat16 among them: the others are compared to it)")
    args = parser.parse_args()
    if "bfloat16" not in args.configs:
        parser.error("--configs must include bfloat16")
    if args.measure is not None:
        dtype, quantization = CONFIGS[args.measure]
        print(json.dumps(measure(args.dir, dtype, quantization, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_checkpoint(Path(args.dir or tmp) / f"falcon-7b-width-{args.layers}", args.layers))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        configs = {}
        for name in args.configs:
            out = subprocess.run([sys.executable, __file__, "--measure", name, "--dir", model_dir, "--steps",
                                  str(args.steps)], capture_output=True, text=True, env=env, check=True).stdout
            configs[name] = json.loads(out.strip().splitlines()[-1])
            print(name, configs[name], flush=True)
        results = dict(layers=args.layers, threads=int(os.environ.get("BENCH_THREADS", "2")), configs=configs,
                       kv_cache=kv_rows(model_dir))
    RESULTS.mkdir(exist_ok=True)
    name = "quantization-cpu" if args.layers == 2 else f"quantization-cpu-{args.layers}-layers"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
