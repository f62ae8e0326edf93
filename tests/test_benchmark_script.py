"""benchmarks/bench.py runs end to end at a minimal size and writes the figures it promises (no timing thresholds)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py imported as ``python benchmarks/bench.py`` sees it: its folder first on the path."""
    sys.path.insert(0, str(BENCHMARKS))
    import bench

    yield bench
    sys.path.remove(str(BENCHMARKS))
    for name in ("bench", "loadgen", "report"):
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_minimal_run_writes_json_and_table(bench, tiny_dirs, tmp_path):
    (tmp_path / "tiny-7b").symlink_to(tiny_dirs["7b"])  # reuse the session's checkpoint instead of building one
    out = tmp_path / "results" / "smoke.json"
    bench.main(["--arch", "7b", "--new-tokens", "2", "--requests-per-worker", "1", "--min-seconds", "0",
                "--concurrency", "1", "2", "--compile", "--workdir", str(tmp_path), "--out", str(out)])

    results = json.loads(out.read_text())
    assert {"machine", "config", "runs", "passed", "load_average", "wall_seconds"} <= results.keys()
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]
    (run,) = results["runs"]
    assert run["arch"] == "7b" and run["parameters"] > 0 and len(run["prompt_tokens"]) == bench.PROMPT_COUNT
    assert [row["batch"] for row in run["direct"]["rows"]] == [1, 2]
    for row in run["direct"]["rows"]:
        assert row["sequences_per_s"] > 0 and row["tokens_per_s"] > 0
    single = run["direct"]["single_stream"]
    assert single["ms_per_token"] > 0 and single["prefill_ms"] > 0
    assert [(server["mode"], server["flags"]) for server in run["servers"]] == [("eager", []),
                                                                                ("compiled", ["--compile"])]
    for server in run["servers"]:
        assert server["startup_seconds"] > 0
        assert [load["concurrency"] for load in server["server"]] == [1, 2]
        for load in server["server"]:
            assert load["requests"] == load["concurrency"] and load["short_sequences"] == 0
            assert load["sequences_per_s"] > 0 and load["tokens_per_s"] > 0 and load["ms_per_token"] > 0
            assert 0 < load["latency_ms"]["p50"] <= load["latency_ms"]["p99"]
            assert load["health_ms"]["count"] >= 1 and load["health_ms"]["failures"] == 0
        for row in server["comparison"]:
            assert row["ratio"] > 0
        names = [check["name"] for check in server["targets"]]
        assert names == ["server/direct at concurrency 1", "health p99 under load (ms)"]  # no target at 2
    assert "Compiled the decode step" in (tmp_path / f"server-bench-7b-compiled-{os.getpid()}.log").read_text()
    table = out.with_suffix(".md").read_text()
    assert table.count("| concurrency |") == 2 and "compiled: --compile" in table


def test_prompts_are_deterministic_and_spread_over_the_lengths(bench):
    encode = str.split  # one token per word is enough to check the spread
    prompts = bench.make_prompts(encode)
    assert prompts == bench.make_prompts(encode)
    lengths = sorted(len(encode(p)) for p in prompts)
    assert lengths[0] == bench.PROMPT_TOKENS[0] and lengths[-1] == bench.PROMPT_TOKENS[1]
    assert len(set(lengths)) > len(prompts) // 2
    first_eight = [len(encode(p)) for p in prompts[:8]]
    assert max(first_eight) - min(first_eight) > 16  # a batch of 8 mixes short and long prompts


def test_gpu_targets_apply_to_the_falcon_7b_shape(bench, tmp_path):
    config = bench.parse_args(["--shape", "falcon-7b", "--device", "cuda", "--workdir", str(tmp_path)])
    assert config.archs == ("7b",) and config.new_tokens == 128
    load = dict(ms_per_token=6.0, tokens_per_s=1400.0, health_ms=dict(p99=5.0))
    server = [dict(load, concurrency=1), dict(load, concurrency=32)]
    checks = bench.report.check_targets([], server, config.shape, config.device)
    assert [(c["name"], c["passed"]) for c in checks] == [
        ("single-stream ms/token (server)", True), ("generated tokens/s at concurrency 32 (server)", False)]
    for wrong in (["--device", "cpu"], ["--device", "cuda", "--arch", "40b"], ["--device", "cpu", "--layers", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--shape", "falcon-7b", *wrong])
    with pytest.raises(SystemExit):
        bench.parse_args(["--layers", "2"])  # tiny has its own layers


def test_fewer_layers_of_the_falcon_7b_shape_run_on_a_cpu_without_the_gpu_targets(bench, tmp_path):
    config = bench.parse_args(["--shape", "falcon-7b", "--device", "cpu", "--layers", "2", "--workdir",
                               str(tmp_path)])
    assert config.shape == "falcon-7b-2-layers" and config.layers == 2
    assert config.out.name == "falcon-7b-2-layers-cpu.json"
    model_config = bench.falcon_7b_config(config.layers)
    assert (model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size) == (2, 4544, 65024)
    load = dict(ms_per_token=6.0, tokens_per_s=1600.0, health_ms=dict(p99=5.0), concurrency=1)
    assert bench.report.check_targets([], [load], config.shape, "cuda") == []
