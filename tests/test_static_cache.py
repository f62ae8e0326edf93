"""The static KV cache and the compiled decode step (``--compile``) give the tokens the growing cache gives.

In-process tests run scripted schedules and the batcher on the tiny Falcons with a small cache, so that every way the
cache rearranges itself happens; an HTTP test starts a real ``--compile`` server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random

import httpx
import pytest
import torch
from test_batching import generated, make_job, run

from predictor.engine.batcher import Batcher
from predictor.engine.runner import LoadSpec, load_engine
from predictor.engine.static_cache import SlotCache, buckets_for, column_tiers
from predictor.errors import Draining, GenerationFailed


def test_buckets_and_tiers_cover_every_size():
    assert buckets_for(1) == [1]
    assert buckets_for(32) == [1, 2, 4, 8, 16, 32]
    assert buckets_for(40) == [1, 2, 4, 8, 16, 32, 40]
    assert column_tiers(2048) == [128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert column_tiers(100, smallest=16) == [16, 24, 32, 48, 64, 96, 100]
    assert column_tiers(64) == [64]


def schedule(engine, prompts, lengths, *, joins_every=4, joins=2):
    """Greedy decoding where ``joins`` prompts join every ``joins_every`` steps and each leaves after its own
    length: sequences join and leave a running batch, as under load. Returns each prompt's tokens, and the steps."""
    running, kv, out = [], None, {}
    pending, step = list(range(len(prompts))), 0
    while pending or running:
        logits = []
        if running:
            logits.append(engine.decode_step(kv, [out[i][-1] for i in running]))
        if pending and step % joins_every == 0:
            taken, pending = pending[:joins], pending[joins:]
            joining, first = engine.prefill([prompts[i] for i in taken])
            kv = engine.join(kv, joining)
            logits.append(first)
            running += taken
            out.update({i: [] for i in taken})
        for i, token in zip(running, torch.cat(logits).argmax(-1).tolist()):
            out[i].append(token)
        keep = [j for j, i in enumerate(running) if len(out[i]) < lengths[i]]
        running = [running[j] for j in keep]
        kv = engine.select(kv, keep)
        step += 1
    return out, step


# (prompts, capacity, narrowest tier, length of sequence i, (which sequence is long, its length)): each scenario
# makes the cache move its columns left in one of its two ways (joining moves them right in both).
SCENARIOS = {
    # one tier, 64 columns: the shared end reaches the last column, and the used columns move left
    "end-reaches-capacity": (14, 64, 64, lambda i: 8 + (i * 37) % 24, (-1, 30)),
    # tiers from 16 columns: an early, long sequence leaves, the rest fit a narrower tier, and they move left
    "long-sequence-leaves": (20, 96, 16, lambda i: 8 + (i * 37) % 16, (0, 50)),
}


@pytest.mark.parametrize("arch", ["7b", "40b"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_static_cache_gives_the_dynamic_cache_tokens(arch, scenario, tiny_dirs, monkeypatch):
    count, capacity, smallest_tier, length, (index, long) = SCENARIOS[scenario]
    engine = load_engine(LoadSpec(str(tiny_dirs[arch])))
    rng = random.Random(7)
    prompts = [[rng.randrange(12, 1000) for _ in range(rng.randrange(2, 28))] for _ in range(count)]
    lengths = [length(i) for i in range(count)]
    lengths[index] = long
    expected, _ = schedule(engine, prompts, lengths)

    moves = []
    move = SlotCache._move_columns
    monkeypatch.setattr(SlotCache, "_move_columns", lambda cache, new_end: moves.append((cache.end, new_end))
                        or move(cache, new_end=new_end))
    engine.use_static_cache(slots=16, capacity=capacity, compile=False, smallest_tier=smallest_tier)
    got, _ = schedule(engine, prompts, lengths)

    assert got == expected
    assert any(new_end > end for end, new_end in moves), "a joining batch wider than the cache's end"
    if scenario == "end-reaches-capacity":
        assert any(end == capacity > new_end for end, new_end in moves)
    else:
        assert any(new_end < end < capacity for end, new_end in moves)


@pytest.mark.parametrize("arch", ["7b", "40b"])
def test_compiled_batcher_gives_each_request_its_tokens(arch, tiny_dirs):
    """Greedy and seeded sampled requests, joining one by one, through the batcher on a compiled engine."""
    prompts = ["The quick brown fox", "Hello", "A longer prompt, with more tokens than the others", "x",
               "Return the list of", "def main():"]
    options = [dict(do_sample=False, max_new_tokens=20 + 3 * i) for i in range(len(prompts))]
    options[1] = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=25, seed=3)
    options[4] = dict(do_sample=True, temperature=1.3, max_new_tokens=30, seed=11)

    eager = load_engine(LoadSpec(str(tiny_dirs[arch])))
    expected = run(eager, [make_job(eager, p, **dict(o)) for p, o in zip(prompts, options)], stagger_s=0.02)

    compiled = load_engine(LoadSpec(str(tiny_dirs[arch])))
    jobs = [make_job(compiled, p, **dict(o)) for p, o in zip(prompts, options)]
    # compiled on the decode thread, as the server does
    got = run(compiled, jobs, max_batch_size=4, stagger_s=0.02,
              prepare=lambda: compiled.use_static_cache(slots=4, capacity=64, compile=True, smallest_tier=16))

    assert compiled.slots is not None and compiled.slots.compiled
    assert [generated(r) for r in got] == [generated(r) for r in expected]
    assert sum(len(seq) for r in got for seq in generated(r)) > 60


def test_after_a_failed_step_the_static_cache_serves_new_requests_alone(tiny_dirs, monkeypatch):
    """A step that fails fails the requests in it; the next requests start from an empty cache."""
    engine = load_engine(LoadSpec(str(tiny_dirs["7b"])))
    prompts = ["The quick brown fox", "Hello", "Return the list of"]
    expected = run(engine, [make_job(engine, p, do_sample=False, max_new_tokens=12) for p in prompts])

    engine.use_static_cache(slots=4, capacity=64, compile=False, smallest_tier=16)
    real_step, steps = SlotCache.step, []

    def step(cache, tokens):
        steps.append(len(tokens))
        if len(steps) == 3:
            raise RuntimeError("injected fault")
        return real_step(cache, tokens)

    monkeypatch.setattr(SlotCache, "step", step)

    async def main():
        batcher = Batcher(engine, max_batch_size=4)
        batcher.start()
        doomed = [batcher.submit(make_job(engine, p, do_sample=False, max_new_tokens=30)) for p in prompts]
        failures = await asyncio.gather(*(t.result() for t in doomed), return_exceptions=True)
        later = [batcher.submit(make_job(engine, p, do_sample=False, max_new_tokens=12)) for p in prompts]
        results = await asyncio.gather(*(t.result() for t in later))
        batcher.close()
        return failures, results

    failures, results = asyncio.run(main())
    assert all(isinstance(f, GenerationFailed) for f in failures)
    assert [generated(r) for r in results] == [generated(r) for r in expected]


def test_a_cache_that_does_not_fit_is_refused_with_its_size(tiny_dirs):
    engine = load_engine(LoadSpec(str(tiny_dirs["7b"])))
    with pytest.raises(RuntimeError, match=r"needs 16384\.0 GiB \(65536 rows x 1048576 columns x 256 bytes per "
                                           r"token\).*lower --max_batch_size"):
        engine.use_static_cache(slots=2**16, capacity=2**20, compile=False)


def test_a_failed_preparation_fails_the_start(tiny_dirs):
    engine = load_engine(LoadSpec(str(tiny_dirs["7b"])))

    def prepare():
        raise RuntimeError("no room for the cache")

    batcher = Batcher(engine, prepare=prepare)
    with pytest.raises(RuntimeError, match="no room for the cache"):
        batcher.start()
    with pytest.raises(Draining):
        asyncio.run(_submit(batcher, make_job(engine, "Hello")))


async def _submit(batcher, job):
    return batcher.submit(job)


def test_compile_flag_serves_the_same_text_over_http(start_server, tiny_dirs, tiny_server):
    server = start_server(tiny_dirs["7b"], "--compile", "--max_batch_size", "4")
    assert "Compiled the decode step" in server.log()

    bodies = [{"prompt": prompt, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12 + i}}
              for i, prompt in enumerate(["Hello", "The quick brown fox", "x", "Return the list of", "a b c d e"])]
    bodies.append({"prompt": "Once", "seed": 5, "generate_kwargs": {"do_sample": True, "max_new_tokens": 16}})

    def answers(url):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: httpx.post(f"{url}/chat", json=body, timeout=60), bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    assert answers(server.url) == answers(tiny_server.url)


@pytest.mark.gpu
def test_on_a_gpu_the_compiled_step_gives_the_same_tokens(tiny_dirs):
    """In bf16 the growing and static caches can round differently, so greedy tokens are compared in float32."""
    prompts = ["The quick brown fox", "Hello", "A longer prompt, with more tokens than the others", "x"]
    options = [dict(do_sample=False, max_new_tokens=24 + 4 * i) for i in range(len(prompts))]
    eager = load_engine(LoadSpec(str(tiny_dirs["7b"]), device="cuda", dtype="float32"))
    expected = run(eager, [make_job(eager, p, **o) for p, o in zip(prompts, options)], stagger_s=0.02)

    compiled = load_engine(LoadSpec(str(tiny_dirs["7b"]), device="cuda", dtype="float32"))
    got = run(compiled, [make_job(compiled, p, **o) for p, o in zip(prompts, options)], max_batch_size=4,
              stagger_s=0.02, prepare=lambda: compiled.use_static_cache(slots=4, capacity=256, compile=True))
    assert compiled.slots.compiled and compiled.slots.device.type == "cuda"
    assert [generated(r) for r in got] == [generated(r) for r in expected]
