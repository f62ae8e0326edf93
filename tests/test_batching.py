"""Batched generation gives each request what it would get alone (in-process, on the tiny Falcons)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from generation import generated, hf_greedy, make_job, reserved_engine, run

from predictor.engine.scheduling import health
from predictor.engine.scheduling.batcher import Batcher
from predictor.errors import Draining, GenerationFailed, Overloaded

PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt, with many more tokens than the others have",
           "Return the list of", "x"]


@pytest.fixture(scope="module", params=["7b", "40b"])
def engine(request, tiny_dirs):
    return reserved_engine(tiny_dirs[request.param])


GREEDY_OPTIONS = [
    {},
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 2},
    {"bad_words_ids": [[435], [359, 141]]},
    {"min_new_tokens": 12},
]


@pytest.mark.parametrize("options", GREEDY_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_batched_greedy_equals_alone_and_transformers(engine, options):
    jobs = [make_job(engine, p, do_sample=False, max_new_tokens=12, **options) for p in PROMPTS]
    batched = [generated(r)[0] for r in run(engine, jobs)]
    alone = [generated(run(engine, [job])[0])[0] for job in jobs]
    assert batched == alone
    reference = [hf_greedy(engine.model, engine.encode(p), max_new_tokens=12, eos_token_id=11, **options)
                 for p in PROMPTS]
    # transformers pads finished rows with eos; ours stop at eos: compare up to our length
    assert [ref[: len(ours)] for ref, ours in zip(reference, alone)] == alone


def test_requests_joining_a_running_batch_get_the_same_tokens(engine):
    jobs = [make_job(engine, p, do_sample=False, max_new_tokens=30, min_new_tokens=30) for p in PROMPTS]
    staggered = [generated(r)[0] for r in run(engine, jobs, stagger_s=0.02)]
    alone = [generated(run(engine, [job])[0])[0] for job in jobs]
    assert staggered == alone


def test_a_seeded_sample_does_not_depend_on_its_batch(engine):
    seeded = make_job(engine, "Hello", seed=7, max_new_tokens=16, top_k=50)
    alone = generated(run(engine, [seeded])[0])
    crowd = [make_job(engine, p, max_new_tokens=16, temperature=0.7, top_p=0.9) for p in PROMPTS]
    in_batch = generated(run(engine, crowd[:2] + [seeded] + crowd[2:])[2])
    assert alone == in_batch
    other_seed = generated(run(engine, [make_job(engine, "Hello", seed=8, max_new_tokens=16, top_k=50)])[0])
    assert other_seed != alone


def test_each_sequence_keeps_its_own_limits(engine):
    jobs = [make_job(engine, "Hello", do_sample=False, max_new_tokens=n, min_new_tokens=n) for n in (3, 9, 5)]
    assert [len(generated(r)[0]) for r in run(engine, jobs)] == [3, 9, 5]


def test_several_sequences_per_request_finishing_at_different_steps(engine):
    job = make_job(engine, "Hello", seed=1, max_new_tokens=20, num_return_sequences=4, top_k=50)
    result = run(engine, [job])[0]
    assert len(result.sequences) == 4
    assert all(seq.finish_reason in ("stop", "length") for seq in result.sequences)


def test_batch_size_limit_queues_the_rest(engine):
    jobs = [make_job(engine, p, do_sample=False, max_new_tokens=6) for p in PROMPTS]
    limited = [generated(r)[0] for r in run(engine, jobs, max_batch_size=2)]
    assert limited == [generated(run(engine, [job])[0])[0] for job in jobs]


def test_cancel_and_time_budget_stop_generation(engine):
    async def main():
        batcher = Batcher(engine, time_budget_s=0.05)
        batcher.start()
        slow = batcher.submit(make_job(engine, "Hello", do_sample=False, max_new_tokens=1500, min_new_tokens=1500))
        result = await slow.result()
        assert result.sequences[0].finish_reason == "time_limit"
        assert len(result.sequences[0].token_ids) < 1500

        batcher.time_budget_s = 300
        cancelled = batcher.submit(make_job(engine, "Hello", do_sample=False, max_new_tokens=1500,
                                            min_new_tokens=1500))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        result = await cancelled.result()
        assert result.sequences[0].finish_reason == "cancelled"
        assert len(result.sequences[0].token_ids) < 1500
        batcher.close()
    asyncio.run(main())


def test_a_cancelled_request_frees_its_row_within_a_step_or_two(engine):
    """One step ahead, a cancelled row still rides in the step already launched; it must leave at the next settle,
    not linger. Another request keeps the batch stepping, and the worker's step count (the step-time histogram)
    says how many steps the cancelled row outlived its cancel by."""
    from prometheus_client import REGISTRY

    def steps() -> float:
        return REGISTRY.get_sample_value("falcon_step_host_seconds_count") or 0.0

    async def main():
        batcher = Batcher(engine)
        batcher.start()
        long = dict(do_sample=False, max_new_tokens=1500, min_new_tokens=1500)
        keeper = batcher.submit(make_job(engine, "Hello", **long))
        doomed = batcher.submit(make_job(engine, "The quick brown fox", **long), stream=True)
        events = doomed.events()
        for _ in range(3):  # both rows are decoding
            await anext(events)
        assert batcher.running_sequences == 2
        doomed.cancel()
        cancelled_at = steps()
        while batcher.running_sequences == 2:
            await asyncio.sleep(0.0005)
        # the step running when cancel() came (it may have checked the row already), the step launched one ahead
        # with the row in it, and the one that settles it
        assert steps() - cancelled_at <= 3
        assert (await doomed.result()).sequences[0].finish_reason == "cancelled"
        keeper.cancel()
        await keeper.result()
        batcher.close()
    asyncio.run(main())


def test_queue_bound_and_drain(engine):
    async def main():
        batcher = Batcher(engine, max_queue=1)  # not started: nothing leaves the queue
        batcher.submit(make_job(engine, "Hello", max_new_tokens=2))
        with pytest.raises(Overloaded) as caught:
            batcher.submit(make_job(engine, "Hello", max_new_tokens=2))
        assert caught.value.status == 429 and caught.value.headers["Retry-After"]
        batcher.close()
        with pytest.raises(Draining):
            batcher.submit(make_job(engine, "Hello", max_new_tokens=2))
    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_the_worker_goes_on(engine, monkeypatch):
    real_step, real_probe = engine.step, engine.probe
    poison = engine.encode("poison")
    device_lost = False

    def step(decode, chunks=()):
        if device_lost or any(list(tokens) == poison for _, tokens, _ in chunks):
            raise RuntimeError("injected fault")
        return real_step(decode, chunks)

    def probe():
        if device_lost:
            raise RuntimeError("injected fault")
        return real_probe()

    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(engine, "probe", probe)
    monkeypatch.setattr(health, "SELF_CHECK_INTERVAL_S", 0.05)

    async def main():
        nonlocal device_lost
        batcher = Batcher(engine)
        batcher.start()
        for _ in range(2):
            with pytest.raises(GenerationFailed):
                await batcher.submit(make_job(engine, "poison", max_new_tokens=4)).result()
        assert batcher.healthy
        ok = await batcher.submit(make_job(engine, "Hello", do_sample=False, max_new_tokens=4)).result()
        assert len(ok.sequences[0].token_ids) >= 1 and batcher.healthy

        device_lost = True  # every step fails now, the idle self-check included
        for _ in range(3):
            with pytest.raises(GenerationFailed):
                await batcher.submit(make_job(engine, "Hello", max_new_tokens=4)).result()
        await asyncio.sleep(0.3)
        assert not batcher.healthy  # three failures in a row and a failing self-check: the device is presumed lost
        first = batcher.unhealthy_for
        await asyncio.sleep(0.2)
        assert batcher.unhealthy_for > first > 0  # grows while the self-check keeps failing: liveness reads it

        device_lost = False  # the fault was transient: the next self-check finds the engine working
        for _ in range(50):
            if batcher.healthy:
                break
            await asyncio.sleep(0.05)
        assert batcher.healthy and batcher.unhealthy_for == 0
        batcher.close()
    asyncio.run(main())


def test_a_request_failing_to_start_does_not_fail_the_running_batch(engine, monkeypatch):
    real_step = engine.step
    poison = engine.encode("poison")

    def step(decode, chunks=()):
        if any(list(tokens) == poison for _, tokens, _ in chunks):
            raise RuntimeError("injected fault")
        return real_step(decode, chunks)

    monkeypatch.setattr(engine, "step", step)

    async def main():
        batcher = Batcher(engine)
        batcher.start()
        running = batcher.submit(make_job(engine, "Hello", do_sample=False, max_new_tokens=40, min_new_tokens=40))
        await asyncio.sleep(0.05)
        with pytest.raises(GenerationFailed):
            await batcher.submit(make_job(engine, "poison", max_new_tokens=4)).result()
        result = await running.result()
        assert len(result.sequences[0].token_ids) == 40
        batcher.close()
    asyncio.run(main())


@pytest.mark.gpu
def test_on_a_gpu_the_engine_runs_bfloat16_with_sdpa_and_generates(tiny_dirs):
    engine = reserved_engine(tiny_dirs["7b"], device="cuda")
    assert engine.device.type == "cuda" and engine.model.dtype == torch.bfloat16
    assert engine.model.config._attn_implementation == "sdpa"
    job = make_job(engine, "Hello", do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert len(generated(run(engine, [job])[0])[0]) == 8


def test_attention_is_pytorch_sdpa(engine):
    assert engine.model.config._attn_implementation == "sdpa"
