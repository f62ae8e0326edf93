"""Tensor parallelism on the CPU (gloo, 2 ranks) on the 40B-shaped tiny Falcon: the same tokens and
log-probabilities as one process, through the batcher's joins, chunked prefill and prefix reuse; the sharding
arithmetic itself; and the checkpoints and sizes that are refused."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from generation import generated, make_job, reserved_engine, run

from predictor.engine.model.falcon import FalconShape, _layer
from predictor.engine.parallel.ranks import ParallelSpec, load_sharded_engine
from predictor.engine.model.loading import LoadSpec, load_engine
from predictor.engine.parallel.sharding import SPLIT_BY_OUTPUT, shard_model, tensor_parallel_refusal
from predictor.tiny import tiny_config

PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt, with many more tokens than the others have",
           "Return the list of", "x"]
# A prompt longer than a few prefix blocks (16 tokens each), shared by requests that differ after it.
SHARED = ("Return a new list containing the items of the iterable, sorted by the key function given, and keep "
          "equal items in their original order when the sort is stable. ")


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    """One process and two ranks over the same checkpoint, each with its KV cache reserved."""
    torch.set_num_threads(1)
    single = reserved_engine(tiny_dirs["40b"], rows=8, device="cpu")
    sharded = load_sharded_engine(LoadSpec(str(tiny_dirs["40b"]), device="cpu"),
                                  ParallelSpec(world=2, collective_timeout_s=20, threads=1))
    sharded.reserve(8)
    yield single, sharded
    sharded.close()


def test_each_rank_caches_only_its_kv_groups(engines):
    single, sharded = engines
    assert single.cache_shape.kv_heads == 2 and sharded.cache_shape.kv_heads == 1
    assert sharded.cache.nbytes * 2 == single.cache.nbytes
    assert sharded.rows_that_fit(2**30) == 2 * single.rows_that_fit(2**30)


def test_greedy_tokens_and_logprobs_equal_one_process(engines):
    single, sharded = engines
    jobs = [make_job(single, p, do_sample=False, max_new_tokens=12, output_scores=True,
                     return_dict_in_generate=True) for p in PROMPTS]
    ones, tps = run(single, jobs), run(sharded, jobs)
    assert [generated(r) for r in tps] == [generated(r) for r in ones]
    for one, tp in zip(ones, tps):
        expected = [t.logprob for t in one.sequences[0].logprobs]
        assert [t.logprob for t in tp.sequences[0].logprobs] == pytest.approx(expected, abs=1e-4)


def test_requests_joining_mid_flight_equal_one_process(engines):
    single, sharded = engines
    jobs = [make_job(single, p, do_sample=False, max_new_tokens=24, min_new_tokens=24) for p in PROMPTS]
    alone = [generated(run(single, [job])[0]) for job in jobs]
    assert [generated(r) for r in run(sharded, jobs, stagger_s=0.05)] == alone


def test_chunked_prefill_equals_one_process(engines):
    single, sharded = engines
    jobs = [make_job(single, SHARED + p, do_sample=False, max_new_tokens=10) for p in PROMPTS[:3]]
    whole = [generated(r) for r in run(single, jobs)]
    assert [generated(r) for r in run(sharded, jobs, max_prefill_tokens=7)] == whole


def test_prefix_reuse_copies_rows_on_every_rank(engines, monkeypatch):
    """Concurrent requests sharing a prefix (one row copies another's columns) and several sequences per request
    (each copies its leader's prompt): a rank that missed a copy would attend over a stale row."""
    single, sharded = engines
    jobs = [make_job(single, SHARED + p, do_sample=False, max_new_tokens=16, min_new_tokens=16) for p in PROMPTS[:3]]
    jobs.append(make_job(single, SHARED, max_new_tokens=8, num_return_sequences=3,
                         do_sample=True, top_k=1, seed=3))
    expected = [generated(run(single, [job], prefix_caching=False)[0]) for job in jobs]
    copies, copy = [], sharded.cache.copy_columns
    monkeypatch.setattr(sharded.cache, "copy_columns", lambda *args: copies.append(args) or copy(*args))
    assert [generated(r) for r in run(sharded, jobs, stagger_s=0.05)] == expected
    assert copies, "no row was copied: the test did not exercise prefix reuse"


def test_speculative_decoding_equals_one_process(engines):
    """Verified drafts are part of the step every rank runs: right and wrong drafts alike give one process's tokens."""
    from predictor.engine.options import SpeculativeConfig
    from predictor.engine.scheduling.speculating import Speculator

    single, sharded = engines
    jobs = [make_job(single, p, do_sample=False, max_new_tokens=12, output_scores=True,
                     return_dict_in_generate=True) for p in PROMPTS]
    ones = run(single, jobs)
    truth = {tuple(job.prompt_ids): generated(r)[0] for job, r in zip(jobs, ones)}

    def partly_right(seq, k):  # the first two drafts right, the others wrong
        known = truth[tuple(seq.tokens[:seq.prompt_len])][len(seq.generated):][:k]
        return known[:2] + [token + 1 for token in known[2:]]
    tps = run(sharded, jobs, speculator=Speculator(SpeculativeConfig(num_speculative_tokens=4), partly_right))
    assert [generated(r) for r in tps] == [generated(r) for r in ones]
    for one, tp in zip(ones, tps):
        expected = [t.logprob for t in one.sequences[0].logprobs]
        assert [t.logprob for t in tp.sequences[0].logprobs] == pytest.approx(expected, abs=1e-4)


def test_a_sharded_layer_sums_to_the_whole_layer(tiny_dirs):
    """Both ranks' partial outputs of one decoder layer add up to the unsharded layer's (no processes)."""
    whole = load_engine(LoadSpec(str(tiny_dirs["40b"]), device="cpu"))
    tokens = torch.tensor(whole.encode("Hello there, falcon"))
    hidden = whole.model.transformer.word_embeddings(tokens)
    expected = _one_layer(whole, hidden)
    partials = []
    for rank in range(2):
        engine = load_engine(LoadSpec(str(tiny_dirs["40b"]), device="cpu"))
        residual_free = _one_layer(engine, hidden, zero_residual=True, shard=(rank, 2))
        partials.append(residual_free)
    assert torch.allclose(partials[0] + partials[1] + hidden, expected, atol=1e-4)


def test_each_rank_reads_only_its_slices_and_keeps_what_a_whole_load_keeps(tiny_dirs, monkeypatch, tmp_path):
    """A rank loading a safetensors directory reads its rows or columns of each split layer from the file, not the
    whole tensor, and ends with the very tensors that loading everything and cutting gives."""
    from predictor.engine.model import layerwise
    from predictor.engine.parallel import sharding

    read: list[int] = []
    preadv = os.preadv
    monkeypatch.setattr(layerwise.os, "preadv", lambda *args: read.append(preadv(*args)) or read[-1])
    spec = LoadSpec(str(tiny_dirs["40b"]), device="cpu")
    assert sharding.reads_slices(spec)
    partial = tmp_path / "partial"  # a checkpoint lacking weights loads whole, initialised as from_pretrained does
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_dirs["40b"] / "config.json").read_bytes())
    save_file({"transformer.ln_f.weight": torch.ones(64)}, str(partial / "model.safetensors"))
    assert not sharding.reads_slices(LoadSpec(str(partial), device="cpu"))
    stored = {name: tensor for path in sorted(tiny_dirs["40b"].glob("*.safetensors"))
              for name, tensor in layerwise.stored_tensors(path).items()}
    size = {name: tensor.end - tensor.start for name, tensor in stored.items()}
    split = {name for name in stored if name.split(".")[-2] in SPLIT_BY_OUTPUT}
    first_rank_only = {name for name in split if name.endswith(".bias") and not SPLIT_BY_OUTPUT[name.split(".")[-2]]}
    for rank in range(2):
        read.clear()
        model, _, shape, whole_shapes = sharding._read_shard(spec, rank, 2)
        halves = sum(size[name] for name in split - first_rank_only) // 2
        rest = sum(size[name] for name in stored if name not in split or (rank == 0 and name in first_rank_only))
        assert sum(read) == halves + rest
        expected = load_engine(spec)
        assert whole_shapes == expected.adapter_shapes
        assert shape.kv_heads == shard_model(expected.model, expected.shape, rank, 2).kv_heads
        kept, cut = model.state_dict(), expected.model.state_dict()
        assert kept.keys() == cut.keys() and all(torch.equal(kept[name], cut[name]) for name in kept)


def _one_layer(engine, hidden, zero_residual=False, shard=None):
    shape = engine.shape
    if shard is not None:
        shape = shard_model(engine.model, shape, *shard)
    engine.shape = shape
    engine.reserve(1)
    step = engine._decode_tensors([], 0, 0, [(0, list(range(hidden.shape[0])), 1)])
    cos, sin = _rotary_for(engine, step)
    with torch.inference_mode():
        out = _layer(engine.model.transformer.h[0], shape, engine.cache, 0, hidden, cos, sin, step)
    return out - hidden if zero_residual else out


def _rotary_for(engine, step):
    from predictor.engine.model.falcon import _rotary

    return _rotary(engine.model.transformer.rotary_emb, step.positions, torch.float32)


@pytest.mark.parametrize(("architecture", "world", "device", "gpus", "words"), [
    ("7b", 2, "cpu", 0, "multi-query attention"),
    ("40b", 4, "cpu", 0, "does not divide the model's 2 K/V groups"),
    ("40b", 2, "cuda", 1, "needs 2 GPUs, one per rank, and 1 are visible"),
    ("40b", 0, "cpu", 0, "must be at least 1"),
])
def test_sizes_that_cannot_split_are_refused_in_one_line(architecture, world, device, gpus, words):
    refusal = tensor_parallel_refusal(tiny_config(architecture), world, device, gpus)
    assert words in refusal and "\n" not in refusal


def test_sizes_that_split_are_served():
    assert tensor_parallel_refusal(tiny_config("40b"), 2, "cpu", 0) is None
    assert tensor_parallel_refusal(tiny_config("7b"), 1, "cpu", 0) is None


def test_falcon_7b_is_told_to_scale_by_replicas():
    from transformers import FalconConfig

    falcon_7b = FalconConfig(hidden_size=4544, num_attention_heads=71, multi_query=True, parallel_attn=True,
                             new_decoder_architecture=False, alibi=False)
    assert "replicas" in tensor_parallel_refusal(falcon_7b, 2, "cuda", 2)
    falcon_40b = FalconConfig(hidden_size=8192, num_attention_heads=128, num_kv_heads=8,
                              new_decoder_architecture=True, alibi=False)
    assert [n for n in (1, 2, 4, 8, 16) if tensor_parallel_refusal(falcon_40b, n, "cuda", 16) is None] == [1, 2, 4, 8]
    assert FalconShape(falcon_40b).kv_heads == 8
