"""The benchmark's verdict and records: server/direct comparison, the issue's targets, the table, machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# Targets from the issue: server/direct ratio per concurrency and health p99 on the CPU with a tiny Falcon;
# absolute figures on a GPU at the falcon-7b shape.
TINY_RATIO_TARGETS = {1: 0.9, 8: 0.7, 32: 0.6}
HEALTH_P99_TARGET_MS = 50.0
GPU_DECODE_MS_TARGET = 7.0  # single-stream, per token (the H100 bandwidth floor is ~4.6 ms)
GPU_TOKENS_PER_S_TARGET = (32, 1500.0)  # concurrency, generated tokens/s


def compare(direct_rows: list[dict[str, Any]], server_rows: list[dict[str, Any]],
            shape: str) -> list[dict[str, Any]]:
    """One row per concurrency: direct and server figures side by side, with the ratio and its target."""
    by_batch = {row["batch"]: row for row in direct_rows}
    rows = []
    for load in server_rows:
        limit = by_batch[load["concurrency"]]
        target = TINY_RATIO_TARGETS.get(load["concurrency"]) if shape == "tiny" else None
        rows.append(dict(concurrency=load["concurrency"], direct_sequences_per_s=limit["sequences_per_s"],
                         server_sequences_per_s=load["sequences_per_s"], direct_tokens_per_s=limit["tokens_per_s"],
                         server_tokens_per_s=load["tokens_per_s"],
                         ratio=load["sequences_per_s"] / limit["sequences_per_s"], ratio_target=target,
                         latency_p50_ms=load["latency_ms"]["p50"], latency_p99_ms=load["latency_ms"]["p99"],
                         health_p99_ms=load["health_ms"]["p99"]))
    return rows


def check_targets(rows: list[dict[str, Any]], server_rows: list[dict[str, Any]], shape: str,
                  device: str) -> list[dict[str, Any]]:
    """The issue's targets that apply to this run's shape and device, each with its value and verdict."""
    checks = []

    def check(name: str, value: float, limit: float, at_least: bool) -> None:
        passed = value >= limit if at_least else value <= limit
        checks.append(dict(name=name, value=value, limit=limit, at_least=at_least, passed=bool(passed)))

    for row in rows:
        if row["ratio_target"] is not None:
            check(f"server/direct at concurrency {row['concurrency']}", row["ratio"], row["ratio_target"], True)
    by_concurrency = {load["concurrency"]: load for load in server_rows}
    if shape == "tiny":
        worst = max(load["health_ms"]["p99"] for load in server_rows)
        check("health p99 under load (ms)", worst, HEALTH_P99_TARGET_MS, False)
    elif device == "cuda" and shape == "falcon-7b":  # the real shape, all 32 layers
        if 1 in by_concurrency:
            check("single-stream ms/token (server)", by_concurrency[1]["ms_per_token"], GPU_DECODE_MS_TARGET, False)
        concurrency, tokens_per_s = GPU_TOKENS_PER_S_TARGET
        if concurrency in by_concurrency:
            check(f"generated tokens/s at concurrency {concurrency} (server)",
                  by_concurrency[concurrency]["tokens_per_s"], tokens_per_s, True)
    return checks


def format_run(run: dict[str, Any]) -> str:
    """Markdown for one architecture: per server mode, a table, single-stream figures and PASS/FAIL per target."""
    single = run["direct"]["single_stream"]
    lines = [f"### {run['arch']} ({run['shape']}, {run['device']}, {run['dtype']}): {run['new_tokens']} new tokens, "
             f"prompts {min(run['prompt_tokens'])}-{max(run['prompt_tokens'])} tokens",
             "",
             f"Direct single stream: {single['ms_per_token']:.2f} ms/token (decode alone "
             f"{single['decode_ms_per_token']:.2f} ms/token, prefill {single['prefill_ms']:.1f} ms)"]
    for server in run["servers"]:
        flags = " ".join(server["flags"]) or "default flags"
        lines += ["", f"Server ({server['mode']}: {flags}; ready {server['startup_seconds']:.0f} s after start):",
                  "",
                  "| concurrency | direct seq/s | server seq/s | ratio | target | direct tok/s | server tok/s "
                  "| p50 ms | p99 ms | health p99 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in server["comparison"]:
            target = f"≥ {row['ratio_target']:.1f}" if row["ratio_target"] is not None else "-"
            lines.append(f"| {row['concurrency']} | {row['direct_sequences_per_s']:.2f} | "
                         f"{row['server_sequences_per_s']:.2f} | {row['ratio']:.2f} | {target} | "
                         f"{row['direct_tokens_per_s']:.0f} | {row['server_tokens_per_s']:.0f} | "
                         f"{row['latency_p50_ms']:.1f} | {row['latency_p99_ms']:.1f} | {row['health_p99_ms']:.1f} |")
        single_load = next((load for load in server["server"] if load["concurrency"] == 1), None)
        if single_load:
            lines += ["", f"Server single stream: {single_load['ms_per_token']:.2f} ms/token"]
        lines.append("")
        for check in server["targets"]:
            relation = "≥" if check["at_least"] else "≤"
            lines.append(f"- {'PASS' if check['passed'] else 'FAIL'}: {check['name']} = {check['value']:.2f} "
                         f"(target {relation} {check['limit']:g})")
    return "\n".join(lines)


def format_header(results: dict[str, Any]) -> str:
    machine, load = results["machine"], results["load_average"]
    return (f"Machine: {machine['device_name']}, {machine['usable_cpus']} CPUs, torch {machine['torch']} "
            f"({machine['torch_threads']} threads); load average before/after {load['before'][0]:.2f}/"
            f"{load['after'][0]:.2f}")


def machine_info(device: str, repo: Path) -> dict[str, Any]:
    """Where the figures come from: platform, CPU, accelerator, library versions and the code's git commit."""
    from importlib.metadata import version

    info = dict(platform=platform.platform(), python=platform.python_version(), hostname=platform.node(),
                cpu=_cpu_model(), cpu_count=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)),
                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=version("transformers"), kserve=version("kserve"), git_commit=_git_commit(repo))
    info["device_name"] = torch.cuda.get_device_name(0) if device == "cuda" else info["cpu"]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit(repo: Path) -> str | None:
    try:
        # the commit, with "-dirty" when the working tree has changes: the figures may come from uncommitted code
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=repo,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_results(results: dict[str, Any], table: str, out: Path) -> None:
    """The JSON and the Markdown table, each written whole (a .tmp file renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(results, indent=2) + "\n"), (out.with_suffix(".md"), table + "\n")):
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(text)
        staging.replace(path)


def package_at(revision: str, into: Path) -> Path:
    """The ``predictor`` package as it was at git ``revision``, extracted under ``into``: the engine "before" that a
    benchmark runs beside the working tree's, in turns."""
    into.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", revision, "predictor"], cwd=repo, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into
