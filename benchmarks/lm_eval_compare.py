"""lm-evaluation-harness against the server, checked against lm-eval's own ``hf`` backend on the same checkpoint.

lm-eval (``pip install -e '.[eval]'``) runs the tasks of ``benchmarks/lm_eval_tasks/`` (32 questions: multiple
choice by log-likelihood, greedy answers, rolling perplexity) five ways, all in this process:

- ``hf``: lm-eval's transformers backend on the checkpoint itself, the reference;
- ``local-completions`` on its defaults: token-id prompts, one per request;
- ``local-completions`` with ``batch_size=8``: eight token-id prompts per request;
- ``local-completions`` with ``tokenized_requests=False``: text prompts;
- ``local-chat-completions`` with the chat template applied (the greedy task only: chat has no log-likelihoods),
  against ``hf`` with the server's conversation format as the tokenizer's chat template.

and checks that each served run has the reference's scores, per-sample log-likelihoods within 1e-3 and the same
greedy texts. It prints a table and writes every figure to ``--out`` (JSON)::

    python benchmarks/lm_eval_compare.py                       # the tiny Falcon, on a server it starts
    python benchmarks/lm_eval_compare.py --model_dir DIR --url http://localhost:8080 --model_name falcon-7b

The server must serve ``--model_dir``'s checkpoint with the same dtype as the reference (float32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASKS_DIR = HERE / "lm_eval_tasks"
TASKS = ("falcon_tiny_choice", "falcon_tiny_answer", "falcon_tiny_perplexity")
CHAT_TASKS = ("falcon_tiny_answer",)
LOGLIKELIHOOD_TOLERANCE = 1e-3
SCORE_REL_TOLERANCE = 1e-4  # perplexities exponentiate summed log-likelihoods: float noise shows in the 5th digit
OUT = HERE / "results" / "lm-eval-tiny.json"


def task_configs(names: Sequence[str]) -> list[dict[str, Any]]:
    """The task YAMLs as lm-eval configs, their data files made absolute (the YAMLs name them from the repo root)."""
    configs = []
    for name in names:
        config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(REPO / path) for split, path in files.items()}
        configs.append(config)
    return configs


def chat_checkpoint(model_dir: Path, workdir: Path) -> Path:
    """The checkpoint with the server's conversation format as its tokenizer's chat template, for the ``hf``
    reference of the chat run (the server applies that format whatever the checkpoint carries)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from predictor.api.chat_format import FALCON_CHAT_TEMPLATE

    target = workdir / "chat-checkpoint"
    target.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if not (target / path.name).exists():
            (target / path.name).symlink_to(path.resolve())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = FALCON_CHAT_TEMPLATE
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (target / name).is_symlink():
            (target / name).unlink()
    tokenizer.save_pretrained(target)
    return target


def evaluate(model: str, model_args: dict[str, Any], tasks: Sequence[str], chat: bool = False) -> dict[str, Any]:
    """One lm-eval run: its scores per task and each sample's responses, and how long it took."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=task_configs(tasks),
                                      task_manager=TaskManager(include_defaults=False), log_samples=True,
                                      apply_chat_template=chat, device="cpu" if model == "hf" else None)
    seconds = time.perf_counter() - started
    scores = {task: {metric.split(",")[0]: value for metric, value in figures.items()
                     if isinstance(value, (int, float)) and "stderr" not in metric and metric != "alias"}
              for task, figures in results["results"].items()}
    samples = {task: sorted(results["samples"][task], key=lambda sample: sample["doc_id"]) for task in tasks}
    return {"model": model, "scores": scores, "samples": samples, "seconds": round(seconds, 2)}


def responses(sample: dict[str, Any]) -> tuple[list[float], list[bool], list[str]]:
    """A sample's log-likelihoods, greedy flags and generated texts, whatever its task's kind."""
    likelihoods, greedy, texts = [], [], []
    for response in sample["resps"]:
        value = response[0]
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, (tuple, list)):
            likelihoods.append(float(value[0]))
            greedy.append(bool(value[1]))
        else:
            likelihoods.append(float(value))
    return likelihoods, greedy, texts


def compare(reference: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """Scores, per-sample log-likelihoods and greedy texts of a served run against the reference's."""
    largest, texts_same, texts, flags_same, flags = 0.0, 0, 0, 0, 0
    for task, samples in served["samples"].items():
        for ours, theirs in zip(samples, reference["samples"][task], strict=True):
            (ll, greedy, text), (ref_ll, ref_greedy, ref_text) = responses(ours), responses(theirs)
            largest = max([largest, *(abs(a - b) for a, b in zip(ll, ref_ll, strict=True))])
            flags_same += sum(a == b for a, b in zip(greedy, ref_greedy, strict=True))
            flags += len(greedy)
            texts_same += sum(a == b for a, b in zip(text, ref_text, strict=True))
            texts += len(text)
    scores_equal = all(math.isclose(value, reference["scores"][task][metric], rel_tol=SCORE_REL_TOLERANCE)
                       for task, figures in served["scores"].items() for metric, value in figures.items())
    return {"scores_equal": scores_equal, "max_loglikelihood_diff": largest,
            "greedy_flags_equal": f"{flags_same}/{flags}", "texts_identical": f"{texts_same}/{texts}",
            "passed": scores_equal and largest <= LOGLIKELIHOOD_TOLERANCE and flags_same == flags
            and texts_same == texts}


def run_all(url: str, model_name: str, model_dir: Path, workdir: Path) -> dict[str, Any]:
    """Every run and every comparison, as the JSON report holds them."""
    completions = {"base_url": f"{url}/v1/completions", "model": model_name, "tokenizer": str(model_dir)}
    chat = {"base_url": f"{url}/v1/chat/completions", "model": model_name}
    reference = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32"}, TASKS)
    chat_reference = evaluate("hf", {"pretrained": str(chat_checkpoint(model_dir, workdir)), "dtype": "float32"},
                              CHAT_TASKS, chat=True)
    served = {
        "local-completions (defaults)": (evaluate("local-completions", completions, TASKS), reference),
        "local-completions batch_size=8": (evaluate("local-completions", {**completions, "batch_size": 8}, TASKS),
                                           reference),
        "local-completions tokenized_requests=False": (
            evaluate("local-completions", {**completions, "tokenized_requests": False}, TASKS), reference),
        "local-chat-completions": (evaluate("local-chat-completions", chat, CHAT_TASKS, chat=True), chat_reference),
    }
    runs = {"hf": reference, "hf (chat template)": chat_reference, **{name: run for name, (run, _) in served.items()}}
    return {
        "checkpoint": str(model_dir), "url": url, "lm_eval_version": _version("lm_eval"),
        "runs": {name: {"model": run["model"], "scores": run["scores"], "seconds": run["seconds"]}
                 for name, run in runs.items()},
        "comparisons": {name: compare(ref, run) for name, (run, ref) in served.items()},
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{'run':45} {'scores equal':>12} {'max |dLL|':>10} {'greedy flags':>12} {'texts':>7} {'seconds':>8}")
    for name, run in report["runs"].items():
        check = report["comparisons"].get(name)
        if check is None:
            print(f"{name:45} {'reference':>12} {'':>10} {'':>12} {'':>7} {run['seconds']:>8}")
        else:
            print(f"{name:45} {str(check['scores_equal']):>12} {check['max_loglikelihood_diff']:>10.2e} "
                  f"{check['greedy_flags_equal']:>12} {check['texts_identical']:>7} {run['seconds']:>8}")
    for name, run in report["runs"].items():
        print(f"{name}: {json.dumps(run['scores'])}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, help="the checkpoint (default: the tiny Falcon, built here)")
    parser.add_argument("--url", help="a server already serving it (default: start one)")
    parser.add_argument("--model_name", default="tiny-falcon", help="the name the server serves it under")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON report goes")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tasks' data and the checkpoint are local
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(HERE))
    import loadgen

    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            sys.path.insert(0, str(REPO))
            from predictor.tiny import build_tiny_falcon, default_cache_dir

            model_dir = build_tiny_falcon(default_cache_dir() / "tiny-falcon-7b", "7b")
        server = None
        if args.url is None:
            server = loadgen.start_server(model_dir, name=args.model_name, dtype="float32", device="cpu",
                                          max_batch_size=32, threads=None, log_dir=workdir, cwd=REPO)
        try:
            report = run_all(args.url or server.url, args.model_name, model_dir, workdir)
        finally:
            if server is not None:
                loadgen.stop_server(server)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if all(check["passed"] for check in main()["comparisons"].values()) else 1)
