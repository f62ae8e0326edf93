"""The KV cache and the project's Falcon forward: only the K/V heads are stored, reserved once; a sequence joining or
leaving moves nobody else's keys; chunked, prefix-reusing and compiled steps give transformers' own tokens.

Model-free tests cover the cache's bookkeeping; in-process tests run the engine and the batcher on the tiny Falcons
(both attention layouts, and one with 32 query heads per 2 K/V groups, like falcon-40b); HTTP tests start real
servers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import httpx
import pytest
import torch
from generation import generated, hf_greedy, make_job, reserved_engine, run
from transformers import FalconForCausalLM

from predictor.engine.scheduling.batcher import Batcher
from predictor.engine.model.falcon import DECODE_BLOCK
from predictor.engine.model.kv_cache import BLOCK_SIZE, CacheShape, KVCache, column_tiers, default_row_cap, row_buckets
from predictor.errors import Draining, GenerationFailed, Overloaded
from predictor.tiny import build_tokenizer, tiny_config

PROMPTS = ["The quick brown fox", "Hello", "A longer prompt, with more tokens than the others", "x",
           "Return the list of", "def main():"]


@pytest.fixture(scope="session")
def grouped_dir(tmp_path_factory):
    """A tiny Falcon shaped like falcon-40b's attention: 32 query heads sharing 2 K/V groups."""
    path = tmp_path_factory.mktemp("tiny-falcon-grouped")
    build_tokenizer(path)
    config = tiny_config("40b")
    config.num_attention_heads, config.num_kv_heads, config.hidden_size = 32, 2, 256
    torch.manual_seed(5)
    FalconForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["7b", "40b", "grouped"])
def model_dir(request, tiny_dirs, grouped_dir):
    return grouped_dir if request.param == "grouped" else tiny_dirs[request.param]


def cache_of(rows=4, capacity=64) -> KVCache:
    return KVCache(CacheShape(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32), rows, capacity,
                   [torch.device("cpu")] * 2)


# -- bookkeeping, no model -----------------------------------------------------------------------------------------
def test_a_token_costs_its_kv_heads_only():
    falcon_7b = CacheShape(layers=32, kv_heads=1, head_dim=64, dtype=torch.bfloat16)
    falcon_40b = CacheShape(layers=60, kv_heads=8, head_dim=64, dtype=torch.bfloat16)
    assert falcon_7b.bytes_per_token == 8 * 1024
    assert falcon_40b.bytes_per_token == 120 * 1024  # transformers caches all 128 heads: 1.9 MiB
    cache = cache_of(rows=4, capacity=64)
    assert cache.nbytes == 4 * 64 * 2 * 2 * 1 * 4 * 4
    assert cache.keys[0].shape == (5, 1, 64, 4)  # a scratch row beyond the four


def test_rows_go_low_first_and_a_freed_row_keeps_its_prefix():
    cache = cache_of()
    first, second = cache.allocate(0), cache.allocate(1)
    assert (first, second) == (0, 1)
    prompt = list(range(100, 100 + 3 * BLOCK_SIZE + 5))
    cache.extend(first, prompt)
    assert cache.usage == pytest.approx(len(prompt) / (4 * 64))
    cache.release(first)
    assert cache.usage == 0 and cache.free_rows == 3

    hit = cache.find_prefix(prompt + [7, 8])
    assert hit.row == first and hit.tokens == 3 * BLOCK_SIZE
    assert cache.find_prefix(prompt[: 3 * BLOCK_SIZE]).tokens == 2 * BLOCK_SIZE  # the last token is computed
    assert cache.find_prefix([1] + prompt) is None
    assert cache.find_prefix(prompt[:5]) is None


def test_a_row_released_without_keeping_holds_nothing_and_moves_nothing_when_taken_again():
    cache = cache_of()
    kept, dropped = cache.allocate(0), cache.allocate(1)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    cache.extend(kept, prompt)
    cache.extend(dropped, [7] + prompt)
    cache.release(kept)
    cache.release(dropped, keep=False)  # a batch without prefix caching
    assert cache.usage == 0 and cache.length(dropped) == 0 and cache.find_prefix([7] + prompt + [1]) is None
    assert cache.find_prefix(prompt + [1]).row == kept
    assert cache.allocate(0) == kept and cache.length(2) == len(prompt)  # the kept prefix moved up
    assert cache.allocate(1) == dropped and cache.length(3) == 0  # nothing to move


def test_a_copy_shares_a_prefix_and_a_taken_row_moves_its_prefix_up():
    cache = cache_of()
    row = cache.allocate(0)
    prompt = list(range(2 * BLOCK_SIZE + 1))
    cache.keys[0][row, :, : len(prompt)] = 1.0
    cache.extend(row, prompt)
    other = cache.allocate(1)
    cache.copy_prefix(row, other, 2 * BLOCK_SIZE)
    assert torch.equal(cache.keys[0][other, :, : 2 * BLOCK_SIZE], cache.keys[0][row, :, : 2 * BLOCK_SIZE])
    assert cache.length(other) == 2 * BLOCK_SIZE
    cache.release(row)
    cache.release(other)

    again = cache.allocate(0)  # the lowest row, for a compact batch; what it held moves to an empty row above
    assert again == row and cache.length(row) == 0
    assert cache.length(2) == len(prompt) and torch.equal(cache.keys[0][2, :, : len(prompt)],
                                                           torch.ones(1, len(prompt), 4))
    assert cache.allocate(1) == other and cache.length(3) == 2 * BLOCK_SIZE  # moved up too
    assert cache.find_prefix(prompt + [1]).tokens == 2 * BLOCK_SIZE

    assert cache.allocate(2) == 2  # no free row above the four a step computes: its prefix is evicted
    assert cache.find_prefix(prompt + [1]).row == 3


def test_the_prefix_being_taken_is_never_the_row_a_taken_row_moves_into():
    """Every row holds a finished prompt; the least recently used one is asked for again (replaying the same
    prompts in order does exactly this). Taking the lowest row moves its contents up into the least recently used
    free row, which must not be the one about to be copied from."""
    cache = cache_of(rows=4)
    prompts = [[1000 * (i + 1) + t for t in range(BLOCK_SIZE + 1)] for i in range(4)]
    for running, prompt in enumerate(prompts):
        row = cache.allocate(running)
        cache.keys[0][row, :, : len(prompt)] = float(running + 1)  # each prompt's keys are its own
        cache.extend(row, prompt)
    for row in range(4):
        cache.release(row)

    # Released 0..3, so row 0 is the oldest; once it is taken and freed again, row 1 is.
    cache.release(cache.allocate(0, cache.find_prefix(prompts[0] + [7])))  # row 0 taken and freed: 1 is the oldest
    hit = cache.find_prefix(prompts[1] + [7])
    row = cache.allocate(0, hit)
    assert cache._tokens[row][:BLOCK_SIZE] == prompts[1][:BLOCK_SIZE]
    assert torch.equal(cache.keys[0][row, :, :BLOCK_SIZE], torch.full((1, BLOCK_SIZE, 4), 2.0))


def test_buckets_and_tiers_cover_every_size():
    assert row_buckets(1) == [1]
    assert row_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert row_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert column_tiers(2048) == [128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert column_tiers(100, smallest=16) == [16, 24, 32, 48, 64, 96, 100]


def test_a_cache_that_does_not_fit_is_refused_with_its_size():
    shape = CacheShape(layers=2, kv_heads=1, head_dim=16, dtype=torch.float32)
    with pytest.raises(MemoryError, match=r"needs 16384\.00 GiB \(65536 rows x 1048576 tokens x 256 bytes\)"):
        KVCache(shape, 2**16, 2**20, [torch.device("cpu")] * 2)


# -- the forward pass ------------------------------------------------------------------------------------------------
def test_the_cache_holds_the_checkpoints_kv_heads(model_dir):
    engine = reserved_engine(model_dir, rows=2)
    config = engine.model.config
    kv_heads = config.num_kv_heads if config.new_decoder_architecture else 1
    assert engine.cache.keys[0].shape == (3, kv_heads, config.max_position_embeddings,
                                          config.hidden_size // config.num_attention_heads)
    assert len(engine.cache.keys) == config.num_hidden_layers


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_chunked_prefill_and_decode_give_transformers_tokens(model_dir, chunk):
    engine = reserved_engine(model_dir, rows=2)
    prompt = engine.encode("A longer prompt, with more tokens than the others have, and then some more")
    expected = hf_greedy(engine.model, prompt, max_new_tokens=16)
    for start in range(0, len(prompt), chunk):
        last = start + chunk >= len(prompt)
        logits = engine.step([], [(1, prompt[start:start + chunk], last)])
    tokens = [int(logits.argmax(-1)[0])]
    while len(tokens) < len(expected) and tokens[-1] != 11:  # until transformers' length, or eos
        tokens.append(int(engine.step([(1, tokens[-1])]).argmax(-1)[0]))
    assert tokens == expected[:len(tokens)] and len(tokens) > 5


def test_joining_and_leaving_move_nobody_elses_keys(model_dir):
    engine = reserved_engine(model_dir, rows=4)
    cache = engine.cache
    buffers = [buffer.data_ptr() for buffer in cache.keys + cache.values]
    running = engine.encode("The quick brown fox")
    token = int(engine.step([], [(0, running, True)]).argmax(-1)[0])
    for _ in range(3):
        token = int(engine.step([(0, token)]).argmax(-1)[0])
    before = [layer[0, :, : cache.length(0)].clone() for layer in cache.keys + cache.values]

    newcomer = engine.encode("Hello there, newcomer")
    logits = engine.step([(0, token)], [(2, newcomer, True)])  # joins in row 2 while row 0 decodes
    engine.step([(0, int(logits[0].argmax())), (2, int(logits[1].argmax()))])
    cache.release(2)  # and leaves

    after = [layer[0, :, : len(running) + 3] for layer in cache.keys + cache.values]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert [buffer.data_ptr() for buffer in cache.keys + cache.values] == buffers  # never reallocated


# -- through the batcher ---------------------------------------------------------------------------------------------
def test_mixed_batches_joining_mid_flight_give_transformers_tokens(model_dir):
    engine = reserved_engine(model_dir, rows=4)
    jobs = [make_job(engine, p, do_sample=False, max_new_tokens=10 + 3 * i, min_new_tokens=10 + 3 * i)
            for i, p in enumerate(PROMPTS)]
    results = run(engine, jobs, max_batch_size=4, stagger_s=0.01, max_prefill_tokens=8)
    expected = [hf_greedy(engine.model, list(job.prompt_ids), max_new_tokens=len(generated(r)[0]),
                          min_new_tokens=len(generated(r)[0])) for job, r in zip(jobs, results)]
    assert [generated(r)[0] for r in results] == expected


@pytest.mark.parametrize("arch", ["7b", "40b"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_reused_prefix_gives_the_same_tokens_and_skips_its_computation(tiny_dirs, arch, prefix_caching):
    engine = reserved_engine(tiny_dirs[arch], rows=4)
    base = "The quick brown fox jumps over the lazy dog. " * 6
    first = make_job(engine, base, do_sample=False, max_new_tokens=8)
    longer = [make_job(engine, base + "And then", do_sample=False, max_new_tokens=8),
              make_job(engine, base + "And then", seed=3, max_new_tokens=8, top_k=50)]
    cold = [generated(r) for r in run(reserved_engine(tiny_dirs[arch], rows=4), longer)]

    computed = []
    real_step = engine.step
    engine.step = lambda decode, chunks=(): computed.append(sum(len(t) for _, t, _ in chunks)) or real_step(
        decode, chunks)
    run(engine, [first], prefix_caching=prefix_caching)
    computed.clear()
    warm = [generated(r) for r in run(engine, longer, prefix_caching=prefix_caching)]
    assert warm == cold
    prompt = len(longer[0].prompt_ids)
    if prefix_caching:  # the shared prefix was copied, not computed, for both
        assert sum(computed) < prompt
    else:
        assert sum(computed) == 2 * prompt


def test_several_sequences_share_their_prompts_prefill(tiny_dirs):
    engine = reserved_engine(tiny_dirs["40b"], rows=8)
    computed = []
    real_step = engine.step
    engine.step = lambda decode, chunks=(): computed.append(sum(len(t) for _, t, _ in chunks)) or real_step(
        decode, chunks)
    job = make_job(engine, "Hello, this is a prompt of a few tokens", seed=4, max_new_tokens=12,
                   num_return_sequences=4, top_k=50)
    result = run(engine, [job])[0]
    assert sum(computed) == len(job.prompt_ids)
    assert len({tuple(seq) for seq in generated(result)}) > 1


def test_beam_requests_have_a_queue_of_their_own(tiny_dirs):
    engine = reserved_engine(tiny_dirs["7b"], rows=2)

    async def main():
        batcher = Batcher(engine, max_queue=3, max_beam_queue=1)  # not started: nothing leaves the queues
        batcher.submit(make_job(engine, "Hello", num_beams=2, do_sample=False, max_new_tokens=2))
        with pytest.raises(Overloaded, match="1 beam-search requests waiting"):
            batcher.submit(make_job(engine, "Hello", num_beams=2, do_sample=False, max_new_tokens=2))
        for _ in range(3):  # ordinary requests still find room
            batcher.submit(make_job(engine, "Hello", max_new_tokens=2))
        with pytest.raises(Overloaded):
            batcher.submit(make_job(engine, "Hello", max_new_tokens=2))

    asyncio.run(main())


def test_requests_wait_for_free_rows(tiny_dirs):
    engine = reserved_engine(tiny_dirs["7b"], rows=2)
    jobs = [make_job(engine, p, do_sample=False, max_new_tokens=6) for p in PROMPTS]
    crowded = [generated(r) for r in run(engine, jobs, max_batch_size=32)]
    assert crowded == [generated(run(engine, [job])[0]) for job in jobs]


def test_seeded_sampling_is_the_same_alone_batched_and_chunked(tiny_dirs):
    engine = reserved_engine(tiny_dirs["40b"], rows=8)
    seeded = make_job(engine, PROMPTS[2], seed=7, max_new_tokens=16, top_k=50)
    alone = generated(run(engine, [seeded])[0])
    crowd = [make_job(engine, p, max_new_tokens=16, temperature=0.7) for p in PROMPTS]
    assert generated(run(engine, crowd[:2] + [seeded] + crowd[2:], max_prefill_tokens=3)[2]) == alone


def test_after_a_failed_step_the_cache_serves_new_requests(tiny_dirs):
    engine = reserved_engine(tiny_dirs["7b"], rows=4)
    expected = run(engine, [make_job(engine, p, do_sample=False, max_new_tokens=12) for p in PROMPTS[:3]])
    real_step, broken = engine.step, [True]

    def step(decode, chunks=()):
        # Every decode step fails while broken, that of each request alone included: a device fault fails them all.
        if broken and decode and not chunks:
            raise RuntimeError("injected fault")
        return real_step(decode, chunks)

    engine.step = step

    async def main():
        batcher = Batcher(engine, max_batch_size=4)
        batcher.start()
        doomed = [batcher.submit(make_job(engine, p, do_sample=False, max_new_tokens=30)) for p in PROMPTS[:3]]
        failures = await asyncio.gather(*(t.result() for t in doomed), return_exceptions=True)
        broken.clear()
        later = [batcher.submit(make_job(engine, p, do_sample=False, max_new_tokens=12)) for p in PROMPTS[:3]]
        results = await asyncio.gather(*(t.result() for t in later))
        batcher.close()
        return failures, results

    failures, results = asyncio.run(main())
    assert all(isinstance(f, GenerationFailed) for f in failures)
    assert [generated(r) for r in results] == [generated(r) for r in expected]
    assert engine.cache.free_rows == 4


def test_a_failed_preparation_fails_the_start(tiny_dirs):
    engine = reserved_engine(tiny_dirs["7b"], rows=2)

    def prepare():
        raise RuntimeError("no room for the graphs")

    batcher = Batcher(engine, prepare=prepare)
    with pytest.raises(RuntimeError, match="no room for the graphs"):
        batcher.start()

    async def submit():
        return batcher.submit(make_job(engine, "Hello"))

    with pytest.raises(Draining):
        asyncio.run(submit())


# -- compiled ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # compiles the decode step
@pytest.mark.parametrize("arch", ["7b", "40b"])
def test_compiled_steps_give_each_request_the_eager_tokens(arch, tiny_dirs):
    """Greedy and seeded sampled requests, joining one by one, through the batcher on a compiled engine."""
    options = [dict(do_sample=False, max_new_tokens=20 + 3 * i) for i in range(len(PROMPTS))]
    options[1] = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=25, seed=3)
    options[4] = dict(do_sample=True, temperature=1.3, max_new_tokens=30, seed=11)
    eager = reserved_engine(tiny_dirs[arch], rows=4)
    expected = run(eager, [make_job(eager, p, **dict(o)) for p, o in zip(PROMPTS, options)], stagger_s=0.02)

    compiled = reserved_engine(tiny_dirs[arch], rows=0)
    compiled.reserve(4, compile=True)
    progress, graphs = [], []

    def warm_up() -> None:
        compiled.warm_up(lambda done, total: progress.append((done, total)))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    got = run(compiled, [make_job(compiled, p, **dict(o)) for p, o in zip(PROMPTS, options)], max_batch_size=4,
              stagger_s=0.02, prepare=warm_up)
    # The warm-up compiled every graph the steps replay (in the same inference mode): none is compiled while serving.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs[0]
    shapes = len(compiled.compiled_shapes)
    # Per decode token count (1, 2, 4): one block each, 1.5x, 2x, ... up to every token reading 2048 columns.
    assert progress[-1] == (shapes, shapes) and shapes == sum(len(column_tiers(t * 2048 // DECODE_BLOCK, t))
                                                              for t in (1, 2, 4))
    assert [generated(r) for r in got] == [generated(r) for r in expected]


@pytest.mark.slow  # compiles the decode step
def test_compile_flag_serves_the_same_text_over_http(start_server, tiny_dirs, tiny_server):
    server = start_server(tiny_dirs["7b"], "--compile", "--max_batch_size", "4")
    assert "Compiled the decode step" in server.log() and "Compiled 1 of" in server.log()
    bodies = [{"prompt": prompt, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12 + i}}
              for i, prompt in enumerate(["Hello", "The quick brown fox", "x", "Return the list of", "a b c d e"])]
    bodies.append({"prompt": "Once", "seed": 5, "generate_kwargs": {"do_sample": True, "max_new_tokens": 16}})

    def answers(url):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: httpx.post(f"{url}/chat", json=body, timeout=60), bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    assert answers(server.url) == answers(tiny_server.url)


def test_the_default_batch_is_capped_by_the_device_as_vllm_does():
    gib = 2**30
    assert default_row_cap([])[0] == 256  # the CPU
    assert default_row_cap([("NVIDIA H100 80GB HBM3", 80 * gib)])[0] == 1024
    assert default_row_cap([("NVIDIA H200", 141 * gib)] * 2)[0] == 1024
    assert default_row_cap([("NVIDIA A100-SXM4-80GB", 80 * gib)])[0] == 256  # vLLM measured no gain past 256
    assert default_row_cap([("NVIDIA L4", 24 * gib)])[0] == 256


def test_start_up_runs_as_many_rows_as_memory_holds_and_says_why(start_server, tiny_dirs, tiny_server):
    log = tiny_server.log()
    assert "KV cache: 256 bytes per token (2 layers x 1 K/V heads x 16, stored as float32), 0.5 MiB per 2048-token row" in log
    # 4 GiB on the CPU hold 8,192 rows of the tiny model: the CPU's cap decides.
    assert "Running up to 256 sequences at once: the KV cache budget holds 8192 rows, the cap on the CPU is 256" in log
    assert "KV cache reserved: 256 rows x 2048 tokens, 128 MiB" in log
    bounded = start_server(tiny_dirs["7b"], "--kv_cache_memory", "0.01")  # 10 MiB: 20 rows
    assert "Running up to 20 sequences at once: the KV cache budget holds 20 rows" in bounded.log()
    assert "KV cache reserved: 20 rows x 2048 tokens, 10 MiB" in bounded.log()


def test_a_budget_too_small_is_refused(start_server, tiny_dirs):
    small = start_server(tiny_dirs["7b"], "--kv_cache_memory", "0.001", wait=False)
    assert small.process.wait(timeout=120) != 0
    assert "raise --kv_cache_memory or lower --max_num_return_sequences" in small.log()


@pytest.mark.gpu
def test_on_a_gpu_the_compiled_step_gives_the_same_tokens(tiny_dirs):
    """In bf16 eager and compiled kernels can round differently, so greedy tokens are compared in float32."""
    options = [dict(do_sample=False, max_new_tokens=24 + 4 * i) for i in range(4)]
    eager = reserved_engine(tiny_dirs["7b"], rows=4, device="cuda", dtype="float32")
    expected = run(eager, [make_job(eager, p, **o) for p, o in zip(PROMPTS, options)], stagger_s=0.02)
    compiled = reserved_engine(tiny_dirs["7b"], rows=0, device="cuda", dtype="float32")
    compiled.reserve(4, compile=True)
    got = run(compiled, [make_job(compiled, p, **o) for p, o in zip(PROMPTS, options)], max_batch_size=4,
              stagger_s=0.02, prepare=compiled.warm_up)
    assert compiled.cache.keys[0].device.type == "cuda"
    assert [generated(r) for r in got] == [generated(r) for r in expected]


def test_a_batch_without_prefix_caching_leaves_no_rows_holding_tokens(tiny_dirs):
    """What no later request can find is not kept: a finished request's rows are empty again."""
    engine = reserved_engine(tiny_dirs["7b"], rows=4)
    run(engine, [make_job(engine, "Once upon a time", max_new_tokens=4) for _ in range(3)], prefix_caching=False)
    assert [engine.cache.length(row) for row in range(engine.cache.rows)] == [0] * engine.cache.rows
    run(engine, [make_job(engine, "Once upon a time", max_new_tokens=4)], prefix_caching=True)
    assert any(engine.cache.length(row) for row in range(engine.cache.rows))  # kept for the prefix cache
