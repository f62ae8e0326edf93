"""LoRA adapters under tensor parallelism (gloo, 2 ranks, the 40B-shaped tiny Falcon): per-request adapters beside
base requests in the same steps, and Kaito's mix merged before the split, give one process's greedy tokens; each
rank's cut of an adapter adds up to the whole adapter's delta."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from generation import make_job, run
from lora_adapters import ALL_TARGETS, make_adapter

from predictor.engine.lora.adapter import read_adapter
from predictor.engine.parallel.ranks import ParallelSpec, load_sharded_engine
from predictor.engine.model.runner import Engine
from predictor.engine.model.loading import LoadSpec, load_engine
from predictor.engine.parallel.sharding import SPLIT_BY_OUTPUT, shard_adapter

PROMPTS = ["The quick brown fox", "Return the value of", "Hello"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-adapters")
    base = tiny_dirs["40b"]
    return {"all": make_adapter(base, root / "all", r=8, lora_alpha=16, targets=ALL_TARGETS, use_rslora=True,
                                seed=5),
            "merged": make_adapter(base, root / "merged", r=4, lora_alpha=8, seed=6)}


@pytest.fixture(scope="module")
def engines(tiny_dirs, adapters):
    """One process and two ranks, both with Kaito's "merged" adapter in the weights and "all" served per request."""
    torch.set_num_threads(1)
    spec = LoadSpec(str(tiny_dirs["40b"]), device="cpu", merged_adapters=(("merged", str(adapters["merged"]), 0.5),))
    single = load_engine(spec)
    sharded = load_sharded_engine(spec, ParallelSpec(world=2, collective_timeout_s=20, threads=1))
    for engine in (single, sharded):
        bank = engine.enable_lora(max_loras=2, max_rank=16)
        bank.register(read_adapter("all", adapters["all"], engine.adapter_shapes, 16, bank.dtype))
        engine.reserve(8)
    yield single, sharded
    sharded.close()


def _job(engine: Engine, prompt: str, adapter: str | None):
    job = make_job(engine, prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return dataclasses.replace(job, adapter=adapter)


def _tokens(results) -> list[list[int]]:
    return [list(result.sequences[0].token_ids) for result in results]


def test_adapter_and_base_requests_in_the_same_steps_equal_one_process(engines):
    single, sharded = engines
    jobs = [_job(single, prompt, adapter) for prompt in PROMPTS for adapter in ("all", None)]
    expected = _tokens(run(single, jobs))
    assert expected[0::2] != expected[1::2]  # the adapter changes the tokens: the comparison tests it
    assert _tokens(run(sharded, jobs)) == expected
    assert sharded.lora.running() == []


def test_an_adapter_placed_again_after_its_slot_was_reused_equals_one_process(engines, adapters):
    """More adapters than slots over the run (each rank's slot contents change mid-run): still one process's."""
    single, sharded = engines
    for engine in (single, sharded):
        bank = engine.lora
        for name in ("again", "third"):
            if name not in bank.names():
                bank.register(dataclasses.replace(
                    read_adapter(name, adapters["all"], engine.adapter_shapes, 16, bank.dtype), name=name))
    jobs = [_job(single, PROMPTS[i % len(PROMPTS)], name)
            for i, name in enumerate(("all", "again", "third", None, "all", "third"))]
    assert _tokens(run(sharded, jobs, stagger_s=0.02)) == _tokens(run(single, jobs))


def test_each_ranks_cut_of_an_adapter_adds_up_to_the_whole_delta(tiny_dirs, adapters):
    """Split-output layers: the ranks' rows of ``B @ A`` stacked; split-input layers: their partial products of a
    split input summed (what the layer's all-reduce adds)."""
    engine = load_engine(LoadSpec(str(tiny_dirs["40b"]), device="cpu"))
    whole = read_adapter("all", adapters["all"], engine.adapter_shapes, 16)
    cuts = [shard_adapter(whole, rank, 2) for rank in range(2)]
    for key, (a, b) in whole.weights.items():
        x = torch.randn(3, a.shape[1])
        expected = x @ a.T @ b.T
        parts = [cut.weights[key] for cut in cuts]
        if SPLIT_BY_OUTPUT[key[1]]:
            got = torch.cat([x @ pa.T @ pb.T for pa, pb in parts], dim=1)
        else:
            xs = x.chunk(2, dim=1)
            got = sum(xr @ pa.T @ pb.T for xr, (pa, pb) in zip(xs, parts))
        assert torch.allclose(got, expected, atol=1e-5), key
