"""benchmarks/gpu.sh: its dry run goes through every stage on the CPU and records every figure; the GPU plan is the
real shapes within the device's time (no timing thresholds: the dry run's figures mean nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODULES = ("gpu_bench", "gpu_measure", "gpu_report", "bench", "loadgen", "report")


@pytest.fixture(scope="module")
def gpu_bench():
    """benchmarks/gpu_bench.py imported as ``python benchmarks/gpu_bench.py`` sees it: its folder first."""
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_bench

    yield gpu_bench
    sys.path.remove(str(BENCHMARKS))
    for name in MODULES:
        sys.modules.pop(name, None)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@pytest.mark.slow
@pytest.mark.timeout(600)  # a minute on a quiet 2-core machine; several when it is shared
def test_dry_run_writes_every_stage_with_numbers(gpu_bench, tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([str(BENCHMARKS / "gpu.sh"), "--dry-run", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, check=False, timeout=580,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    stages = results["stages"]
    assert list(stages) == list(gpu_bench.STAGES)
    assert {name: stage["status"] for name, stage in stages.items()} == {name: "ok" for name in gpu_bench.STAGES}

    tests = stages["gpu-tests"]
    assert tests["tests"] == tests["passed"] + tests["skipped"] >= 1 and tests["failures"] == tests["errors"] == 0

    plan = gpu_bench.build_plan(True, tmp_path, out)
    for model in ("falcon-7b", "falcon-40b"):
        model_plan = plan.models[model]
        direct = stages[f"{model}-direct"]
        assert direct["weights"]["parameters"] > 0 and direct["weights"]["devices"] == ["cpu"]
        assert all(_number(value) for key, value in direct["kv_cache"].items() if key != "free_memory_kind")
        assert [row["batch"] for row in direct["throughput"]] == list(model_plan.concurrency)
        # the default server (no --max_batch_size) also at its own, higher concurrency
        servers = [(f"{model}-server", model_plan.concurrency + model_plan.server_concurrency)]
        assert "--max_batch_size" not in stages[f"{model}-server"]["flags"]
        assert stages[f"{model}-server"]["max_running_sequences"] == 256  # the CPU's cap
        if model == "falcon-7b":
            servers.append(("falcon-7b-server-compile", (1,)))
            assert stages["falcon-7b-server-compile"]["compile"]["shapes"] >= 1
        else:  # the dry run splits the 40B-shaped tiny over two CPU ranks, with the default batch too
            servers.append(("falcon-40b-server-tp", model_plan.concurrency + model_plan.server_concurrency))
            assert "--tensor_parallel_size" in stages["falcon-40b-server-tp"]["flags"]
            assert "--max_batch_size" not in stages["falcon-40b-server-tp"]["flags"]
        for name, concurrency in [(f"{model}-direct", model_plan.concurrency), *servers]:
            stage = stages[name]
            assert all(_number(value) for value in stage["single_stream"].values()), name
            assert all(_number(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in stage["throughput"])
            if name.endswith(("-server", "-compile", "-tp")):
                assert [row["concurrency"] for row in stage["throughput"]] == list(concurrency)
                assert _number(stage["ready_seconds"]) and stage["memory_after_ready"]["bytes"] > 0
                assert all(row["short_sequences"] == 0 for row in stage["throughput"])
    for name in ("falcon-7b-direct", "falcon-7b-server"):
        ttft, targets = stages[name]["ttft"], plan.models["falcon-7b"].ttft_prompt_tokens
        assert len(ttft) == len(targets) and all(row["prompt_tokens"] >= n for row, n in zip(ttft, targets))
        assert all(_number(row["ms"]) for row in ttft)
    kv_40b = stages["falcon-40b-direct"]["kv_cache"]
    assert kv_40b["bytes_per_token_stored"] == 2 * kv_40b["bytes_per_token_kv_heads"]  # transformers keeps 4 of 2

    summary = results["summary"]
    assert {row["side"] for row in summary} == {"direct", "server", "server --compile",
                                                "server --tensor_parallel_size 2"}
    assert all(_number(row["value"]) for row in summary)
    assert all(row["floor"] > 0 for row in summary if "ms/token" in row["figure"] or "tokens/s" in row["figure"])
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} | ok |" in table for name in gpu_bench.STAGES) and "### falcon-40b" in table


def test_the_gpu_plan_builds_the_real_shapes_and_fits_the_device_time(gpu_bench, tmp_path):
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    plan = gpu_bench.build_plan(False, tmp_path, None)
    assert (plan.device, plan.dtype, plan.out.name) == ("cuda", "bfloat16", "gpu-h200.json")
    parameters = {}
    for name, model_plan in plan.models.items():
        with torch.device("meta"):  # shapes only: no memory
            model = FalconForCausalLM(FalconConfig(**model_plan.config))
        parameters[name] = sum(p.numel() for p in model.parameters())
    assert round(parameters["falcon-7b"] / 1e9, 1) == 6.9 and round(parameters["falcon-40b"] / 1e9, 1) == 41.3
    assert plan.models["falcon-7b"].concurrency == (1, 8, 32, 64) and plan.models["falcon-40b"].concurrency == (16,)
    assert plan.models["falcon-7b"].ttft_prompt_tokens == (128, 512, 2000)
    assert set(plan.budgets_s) < set(gpu_bench.STAGES) and sum(plan.budgets_s.values()) < plan.total_s <= 540
    assert "timeout -k 10 580" in (BENCHMARKS / "gpu.sh").read_text()  # under the device's 600 s per command


def test_floors_are_the_weights_read_once_at_the_h200_bandwidth(gpu_bench):
    floors = gpu_bench.gpu_report.Floors
    assert floors(6_921_720_704, 13_843_441_408).decode_ms == pytest.approx(2.88, abs=0.01)
    assert floors(41_303_293_952, 82_606_587_904).decode_ms == pytest.approx(17.2, abs=0.1)
    falcon_7b = floors(6_921_720_704, 13_843_441_408)
    assert falcon_7b.tokens_per_s(1) == pytest.approx(1000 / falcon_7b.decode_ms)
    assert falcon_7b.prefill_ms(2000) > falcon_7b.prefill_ms(1) == falcon_7b.decode_ms  # long prompts: compute
