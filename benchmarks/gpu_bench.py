"""The GPU measurements of issue 17 in one time-boxed run: ``benchmarks/gpu.sh`` (``--dry-run``: tiny, on a CPU).

Stages, each a child process with its own time box, in this order (the compiled server last: its warm-up is the
least predictable, and whatever time the others leave goes to it):

1. ``gpu-tests``: ``python -m pytest -m gpu``;
2. ``falcon-7b-direct``: transformers' ``generate`` in this process: the KV cache's size, single-stream ms/token,
   time to first token at 128, 512 and 2,000 prompt tokens, tokens/s at batch 1, 8, 32 and 64;
3. ``falcon-7b-server``: ``python -m predictor`` over HTTP with its default batch (as many sequences as the
   memory holds, up to 1,024 on an H200), the same figures at concurrency 1, 8, 32 and 64, then 128 and 256;
4. ``falcon-40b-direct`` and 5. ``falcon-40b-server``: the KV cache, single stream, tokens/s at 16 (the server at
   64 too);
5b. ``falcon-40b-server-tp``: the same server with ``--tensor_parallel_size 2``, when 2 GPUs are visible (else its
   status says how many are: skipped); the dry run runs it on the CPU over gloo;
6. ``falcon-7b-server-compile``: the server with ``--compile``: its warm-up, memory, single stream and tokens/s.

Every stage writes its figures into the results JSON (and the Markdown beside it) as it measures them, so a stage
that runs out of time leaves what it had. The models have random weights at the real shapes: a checkpoint here is
``config.json``, a tokenizer and a weights file holding one tensor. transformers initialises every weight missing
from a checkpoint on the device it places it on, so the server's own loader (``--model_dir``) and the direct side
build 14 GB or 83 GB of bfloat16 weights on the GPU in seconds, with nothing written to disk and nothing patched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from xml.etree import ElementTree

import gpu_measure as measure
import gpu_report
import report

REPO = Path(__file__).resolve().parent.parent
SEED = 1234


@dataclass(frozen=True)
class ModelPlan:
    """One model shape and what is measured on it."""

    name: str  # "falcon-7b"
    config: dict[str, Any]  # FalconConfig arguments
    new_tokens: int  # generated per sequence, exactly
    concurrency: tuple[int, ...]  # server workers, and the direct batch sizes
    ttft_prompt_tokens: tuple[int, ...] = ()  # prompt lengths for time to first token; () measures none
    # more workers for the default server (started without --max_batch_size: as many rows as its memory holds)
    server_concurrency: tuple[int, ...] = ()
    # --max_batch_size of the --compile server, which compiles a step per batch bucket: the server's default
    compile_max_batch_size: int = 32
    server_flags: tuple[str, ...] = ()  # more flags for both servers


@dataclass(frozen=True)
class Plan:
    dry_run: bool
    device: str  # "cuda", or "cpu" for the dry run
    dtype: str  # as the server's --dtype
    models: dict[str, ModelPlan]
    repeats: int  # timings per single-stream and first-token figure (the median is kept)
    requests_per_worker: int  # measured requests per client worker; the direct side times one batch
    budgets_s: dict[str, float]  # per stage; a stage not named gets whatever is left of total_s
    total_s: float
    workdir: Path
    out: Path


FALCON_7B = dict(vocab_size=65024, hidden_size=4544, num_attention_heads=71, num_hidden_layers=32, multi_query=True,
                 parallel_attn=True, bias=False, new_decoder_architecture=False, alibi=False,
                 max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)  # tiiuae/falcon-7b
FALCON_40B = dict(vocab_size=65024, hidden_size=8192, num_attention_heads=128, num_kv_heads=8, num_hidden_layers=60,
                  parallel_attn=True, bias=False, new_decoder_architecture=True, alibi=False,
                  max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)  # tiiuae/falcon-40b
# The dry run: both attention layouts at predictor.tiny's widths, with a 256-token context so that the compiled
# server warms up few shapes on a CPU.
TINY = dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, parallel_attn=True,
            bias=False, alibi=False, max_position_embeddings=256, bos_token_id=11, eos_token_id=11)
TINY_7B = dict(TINY, multi_query=True, new_decoder_architecture=False)
TINY_40B = dict(TINY, num_kv_heads=2, new_decoder_architecture=True)

STAGES = ("gpu-tests", "falcon-7b-direct", "falcon-7b-server", "falcon-40b-direct", "falcon-40b-server",
          "falcon-40b-server-tp", "falcon-7b-server-compile")
# Seconds per stage on the H200, estimated from the expected figures (benchmarks/README.md); the compiled server
# gets the rest of GPU_TOTAL_S: at least 145 s on one GPU, where the tensor-parallel stage skips at once, and 65 s
# with two GPUs. The device allows 600 s per command: gpu.sh kills everything at 580.
GPU_BUDGETS_S = {"gpu-tests": 60, "falcon-7b-direct": 60, "falcon-7b-server": 125, "falcon-40b-direct": 55,
                 "falcon-40b-server": 85, "falcon-40b-server-tp": 80}
GPU_TOTAL_S = 530
DRY_BUDGETS_S = {name: 60 for name in STAGES}
DRY_TOTAL_S = 240


def build_plan(dry_run: bool, workdir: Path, out: Path | None) -> Plan:
    if dry_run:
        # One return sequence per request keeps the compiled server's cache to max_batch_size rows (else 8).
        # 16 new tokens: decode alone is t(16) - t(1) over 15, which a noisy shared machine cannot make negative.
        models = {"falcon-7b": ModelPlan("falcon-7b", TINY_7B, 16, (1, 2, 4), (16, 32, 64), compile_max_batch_size=1,
                                         server_flags=("--max_num_return_sequences", "1"), server_concurrency=(8,)),
                  "falcon-40b": ModelPlan("falcon-40b", TINY_40B, 16, (2,), server_concurrency=(4,))}
        return Plan(True, "cpu", "float32", models, repeats=2, requests_per_worker=1, budgets_s=DRY_BUDGETS_S,
                    total_s=DRY_TOTAL_S, workdir=workdir, out=out or workdir / "gpu-dry-run.json")
    models = {"falcon-7b": ModelPlan("falcon-7b", FALCON_7B, 128, (1, 8, 32, 64), (128, 512, 2000),
                                     server_concurrency=(128, 256)),
              "falcon-40b": ModelPlan("falcon-40b", FALCON_40B, 64, (16,), server_concurrency=(64,))}
    return Plan(False, "cuda", "bfloat16", models, repeats=3, requests_per_worker=2, budgets_s=GPU_BUDGETS_S,
                total_s=GPU_TOTAL_S, workdir=workdir,
                out=out or REPO / "benchmarks" / "results" / "gpu-h200.json")


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, str | None, float | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage at tiny shapes on the CPU, in about a minute (nothing to read in its "
                             "figures: it shows the script works)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints and server logs; default ~/.cache/falcon-predictor/gpu-bench")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON, with a .md beside it; default benchmarks/results/gpu-h200.json "
                             "(dry run: <workdir>/gpu-dry-run.json)")
    parser.add_argument("--stage", choices=STAGES, default=None, help="run only this stage, in this process")
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)  # set for --stage children
    args = parser.parse_args(argv)
    if args.workdir is None:
        from predictor.tiny import default_cache_dir

        args.workdir = default_cache_dir() / ("gpu-bench-dry" if args.dry_run else "gpu-bench")
    return build_plan(args.dry_run, args.workdir, args.out), args.stage, args.budget


# -- the record: the results file, rewritten whole at every figure -----------------------------------------------
def load_results(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text())


def save_results(results: dict[str, Any], out: Path) -> None:
    report.write_results(results, gpu_report.format_results(results), out)


class StageRecord:
    """One stage's entry in the results file; each figure set here is written out at once."""

    def __init__(self, out: Path, stage: str) -> None:
        self.out, self.stage = out, stage

    def __setitem__(self, key: str, value: Any) -> None:
        results = load_results(self.out)
        results["stages"].setdefault(self.stage, {})[key] = value
        save_results(results, self.out)


# -- stages ------------------------------------------------------------------------------------------------------
def run_gpu_tests(plan: Plan, record: StageRecord, deadline: float) -> None:
    """The ``gpu``-marked tests (they skip themselves without CUDA); counts from pytest's JUnit XML."""
    junit = plan.workdir / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    # One process (-n 0): the suite's two workers would share the one GPU. Only the files that mark a test gpu are
    # collected: collecting the whole suite imports every test module, a quarter of a minute of device time.
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=max(1.0, deadline - time.monotonic()))
    record["exit_code"] = done.returncode
    record["output_tail"] = (done.stdout + done.stderr)[-3000:]
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    for key, value in counts.items():
        record[key] = value
    record["not_passed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]


def run_direct(name: str) -> Callable[[Plan, StageRecord, float], None]:
    return lambda plan, record, deadline: measure.direct(plan, plan.models[name], checkpoint(plan, name), record,
                                                         deadline)


def run_server(name: str, compile: bool) -> Callable[[Plan, StageRecord, float], None]:
    return lambda plan, record, deadline: measure.server(plan, plan.models[name], checkpoint(plan, name), record,
                                                         deadline, compile)


def run_tensor_parallel_server(name: str) -> Callable[[Plan, StageRecord, float], None]:
    """The server over ``gpu_report.TP_RANKS`` GPUs, one rank each; skipped (saying why) with fewer visible."""
    def run(plan: Plan, record: StageRecord, deadline: float) -> None:
        import torch

        ranks, gpus = gpu_report.TP_RANKS, torch.cuda.device_count()
        if plan.device == "cuda" and gpus < ranks:
            record["skipped_because"] = f"{gpus} GPU(s) visible: --tensor_parallel_size {ranks} needs {ranks}"
            return
        measure.server(plan, plan.models[name], checkpoint(plan, name), record, deadline, False, ranks=ranks)
    return run


STAGE_FUNCTIONS: dict[str, Callable[[Plan, StageRecord, float], None]] = {
    "gpu-tests": run_gpu_tests,
    "falcon-7b-direct": run_direct("falcon-7b"),
    "falcon-7b-server": run_server("falcon-7b", compile=False),
    "falcon-40b-direct": run_direct("falcon-40b"),
    "falcon-40b-server": run_server("falcon-40b", compile=False),
    "falcon-40b-server-tp": run_tensor_parallel_server("falcon-40b"),
    "falcon-7b-server-compile": run_server("falcon-7b", compile=True),
}


def checkpoint(plan: Plan, name: str) -> Path:
    """A random-weights checkpoint of the model's config: config, tokenizer, and a weights file of one tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import FalconConfig, GenerationConfig

    from predictor.tiny import build_tokenizer

    model_dir = plan.workdir / f"{name}-random"
    if (model_dir / "random-weights.json").exists():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    config = FalconConfig(**plan.models[name].config)
    config.save_pretrained(model_dir)
    eos = config.eos_token_id
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos).save_pretrained(model_dir)
    build_tokenizer(model_dir)  # the tiny tokenizer: its 1,024 ids fit any Falcon vocabulary
    # One real tensor so that the file is a checkpoint; every other weight is missing and initialised at load.
    save_file({"transformer.ln_f.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16)},
              str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "random-weights.json").write_text(json.dumps({"seed": SEED, "config": plan.models[name].config}))
    return model_dir


def run_stage(plan: Plan, stage: str, budget_s: float) -> None:
    """One stage in this process, its status recorded whatever happens."""
    import torch

    torch.manual_seed(SEED)
    record = StageRecord(plan.out, stage)
    started = time.monotonic()
    record["status"] = "running"
    try:
        STAGE_FUNCTIONS[stage](plan, record, started + budget_s)
    except BaseException as exc:
        record["status"] = f"failed: {type(exc).__name__}: {exc}"[:500]
        record["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        record["seconds"] = time.monotonic() - started
    status = load_results(plan.out)["stages"][stage]
    record["status"] = ("partial: out of time" if status.get("skipped_for_time") else
                        f"skipped: {status['skipped_because']}" if status.get("skipped_because") else "ok")


# -- the whole run -----------------------------------------------------------------------------------------------
def run_all(plan: Plan) -> dict[str, Any]:
    """Every stage as a child process in its own session, killed with its servers when its time box ends."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = dict(plan=json.loads(json.dumps(asdict(plan), default=str)),
                   machine=report.machine_info(plan.device, REPO),
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), stages={})
    save_results(results, plan.out)
    for stage in STAGES:
        left = plan.total_s - (time.monotonic() - started)
        budget = min(plan.budgets_s.get(stage, left), left)
        if budget < 10:
            _update(plan.out, stage, status="not run: no time left")
            continue
        _log(f"== {stage} ({budget:.0f} s at most)")
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--budget", str(budget),
                   "--workdir", str(plan.workdir), "--out", str(plan.out)] + (["--dry-run"] if plan.dry_run else [])
        stage_started = time.monotonic()
        child = subprocess.Popen(command, cwd=REPO, start_new_session=True)
        try:
            child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill_session(child)
        outcome = dict(wall_seconds=time.monotonic() - stage_started)
        status = load_results(plan.out)["stages"].get(stage, {}).get("status", "")
        if time.monotonic() - stage_started >= budget:
            outcome["status"] = f"timed out after {budget:.0f} s (figures so far kept)"
        elif child.returncode != 0 and not status.startswith("failed"):
            outcome["status"] = f"failed: exit code {child.returncode}"
        _update(plan.out, stage, **outcome)
    results = load_results(plan.out)
    results["wall_seconds"] = time.monotonic() - started
    results["summary"] = gpu_report.summarize(results)
    save_results(results, plan.out)
    return results


def _update(out: Path, stage: str, **values: Any) -> None:
    results = load_results(out)
    results["stages"].setdefault(stage, {}).update(values)
    save_results(results, out)


def _kill_session(child: subprocess.Popen) -> None:
    """SIGTERM to the stage's whole session (its server, compile workers), SIGKILL to what is left after 5 s."""
    deadline = time.monotonic() + 5
    try:
        os.killpg(child.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            child.poll()  # reaps the stage, so that it leaves the group once it exits
            time.sleep(0.1)
            os.killpg(child.pid, 0)  # raises once nothing of the session is left
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    plan, stage, budget = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if stage is not None:
        run_stage(plan, stage, budget if budget is not None else plan.budgets_s.get(stage, plan.total_s))
        return
    results = run_all(plan)
    print(gpu_report.format_results(results))
    print(f"\nWrote {plan.out} and {plan.out.with_suffix('.md')} in {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    main()
