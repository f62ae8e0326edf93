"""The batcher's time per decode step, this checkout's engine against an earlier commit's, in one run.

What the per-step work of supervision and isolation costs (a heartbeat, the fault hook's calls, the guards around
each stage): both engines decode the same greedy batches on the same checkpoint, in child processes that take turns
(before, after, before, ...), and the medians are compared. A step here is one token for every running sequence.

    python benchmarks/step_time.py                          # against the commit before supervision, tiny Falcon
    python benchmarks/step_time.py --before HEAD~3 --batch 1 8 32 --tokens 64 --rounds 5

Figures on a shared machine are noisy: compare the two columns of one run, never figures of two runs.
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

import report

REPO = Path(__file__).resolve().parent.parent
BEFORE = "16f6302"  # the engine before per-request isolation and worker supervision
PROMPT = "Once upon a time, in a land far away, the falcon"


def measure(model_dir: str, batch: int, tokens: int) -> float:
    """Seconds per step for ``batch`` greedy sequences of ``tokens`` tokens each (run in a child process)."""
    import asyncio

    import torch

    try:
        from predictor.api.chat.mapping import to_generation_job
        from predictor.api.chat.schema import parse_chat_request
    except ImportError:  # the tree before the API was grouped by protocol
        from predictor.api.mapping import to_generation_job
        from predictor.api.schema import parse_chat_request
    from predictor.engine.scheduling.batcher import Batcher
    from predictor.engine.options import Limits
    try:
        from predictor.engine.model.loading import LoadSpec, load_engine
    except ImportError:  # an engine from before the loading functions left ``runner`` (--before)
        from predictor.engine.model.runner import LoadSpec, load_engine

    torch.set_num_threads(1)
    engine = load_engine(LoadSpec(model_dir))
    engine.reserve(batch)
    request = parse_chat_request({"prompt": PROMPT, "generate_kwargs": {
        "do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}})
    job = to_generation_job(request, engine.encode(PROMPT), engine.info, Limits())

    async def main() -> float:
        batcher = Batcher(engine, max_batch_size=batch, prefix_caching=False)
        batcher.start()
        await asyncio.gather(*(batcher.submit(job).result() for _ in range(batch)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(job).result() for _ in range(batch)))
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed / tokens

    return asyncio.run(main())


def run_child(source: Path, model_dir: str, batch: int, tokens: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(source)!r}); sys.path.insert(1, {str(REPO / 'benchmarks')!r});"
            f"import step_time; print(step_time.measure({model_dir!r}, {batch}, {tokens}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the git commit whose engine is the baseline")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="sequences decoded together")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence (steps per measurement)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per engine and batch size")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step-time.json"))
    args = parser.parse_args()

    from predictor.tiny import build_tiny_falcon

    with tempfile.TemporaryDirectory(prefix="step-time-") as tmp:
        model_dir = str(build_tiny_falcon(Path(tmp) / "tiny-falcon-7b", "7b"))
        before = report.package_at(args.before, Path(tmp) / "before")
        sources = {"before": before, "after": REPO}
        figures: dict[str, dict[str, list[float]]] = {name: {} for name in sources}
        for batch in args.batch:
            for _ in range(args.rounds):
                for name, source in sources.items():  # taking turns: drifts in the machine's load hit both
                    figures[name].setdefault(str(batch), []).append(run_child(source, model_dir, batch, args.tokens))
    rows = []
    print(f"{'batch':>5} {'before ms/step':>15} {'after ms/step':>14} {'after/before':>13}")
    for batch in args.batch:
        b, a = (statistics.median(figures[name][str(batch)]) for name in ("before", "after"))
        rows.append({"batch": batch, "before_ms": b * 1e3, "after_ms": a * 1e3, "ratio": a / b})
        print(f"{batch:>5} {b * 1e3:>15.3f} {a * 1e3:>14.3f} {a / b:>13.3f}")
    result = {"before": args.before, "tokens": args.tokens, "rounds": args.rounds, "medians": rows,
              "samples": figures, "torch_threads": 1}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
