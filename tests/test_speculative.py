"""Speculative decoding keeps every output exactly as it is without it: the pure parts (config, n-gram drafting,
acceptance, draft lengths, per-position penalties) without a model, then the engine on both tiny Falcons with drafts
that are all right, all wrong, partly right and n-gram's own, and one server with ``--speculative_config``."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from generation import generated, make_job, reserved_engine, run
from prometheus_client import REGISTRY

from predictor.config import parse_config
from predictor.engine.sampling.choice import GENERATED, SamplingTable
from predictor.engine.sampling.sampler import make_sampler
from predictor.engine.options import SpeculativeConfig, parse_speculative_config
from predictor.engine.sampling.speculation import (
    PAUSE_STEPS, DraftLength, accepted_drafts, position_table, propose_ngram)
from predictor.engine.scheduling.batcher import Batcher
from predictor.engine.model.layerwise import planned_weight_bytes
from predictor.engine.quantization.linear import weight_bytes
from predictor.engine.scheduling.drafting import DraftModel, draft_fit_refusal, tokenizer_mismatch
from predictor.engine.scheduling.speculating import Speculator

K = 4
PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, in a land far away", "1 2 3 4 5 6"]
NEW = 24


# -- configuration -------------------------------------------------------------------------------------------------
def test_the_config_takes_vllms_keys_and_fills_the_lookup_bounds_as_vllm_does():
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (3, 5, 5)
    assert parse_speculative_config('{"num_speculative_tokens": 2}') == SpeculativeConfig(num_speculative_tokens=2)


@pytest.mark.parametrize("value, names", [
    ("{not json", "not JSON"), ("[4]", "JSON object"), ('{"method": "eagle", "num_speculative_tokens": 2}', "eagle"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens"), ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"num_speculative_tokens": 2, "lookahead": 1}', "lookahead"),
    ('{"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min"),
    ('{"num_speculative_tokens": true}', "num_speculative_tokens"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "model"),
    ('{"method": "ngram", "model": "/m", "num_speculative_tokens": 2}', "model"),
])
def test_a_bad_config_is_refused_at_start_up_in_one_line(value, names):
    with pytest.raises(SystemExit) as refused:
        parse_config(["--speculative_config", value])
    message = str(refused.value)
    assert message.startswith("--speculative_config: ") and names in message and "\n" not in message


# -- drafting and acceptance ---------------------------------------------------------------------------------------
def test_ngram_drafts_copy_what_followed_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 2, 2, 3) == [7, 5]  # "2 3" latest, before "9 1 2 3"
    assert propose_ngram([1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3], 2, 2, 3) == [9, 5]  # the 3-gram "1 2 3" wins
    assert propose_ngram([5, 6, 7, 8], 3, 1, 3) == []  # nothing repeats
    assert propose_ngram([4, 1, 2, 4, 1], 3, 2, 2) == [2, 4, 1]  # a loop continues past the end with its drafts
    assert propose_ngram([7], 3, 1, 2) == []


def test_drafts_are_kept_while_each_equals_the_token_chosen_before_it():
    assert accepted_drafts([5, 6, 7, 8], [5, 6, 7]) == 3
    assert accepted_drafts([5, 0, 7, 8], [5, 6, 7]) == 1
    assert accepted_drafts([0, 6, 7, 8], [5, 6, 7]) == 0
    assert accepted_drafts([3], []) == 0


def test_a_sequence_whose_drafts_fail_drafts_fewer_then_none_then_tries_again_less_often():
    length = DraftLength(4)
    wanted = []
    for _ in range(3):
        wanted.append(length.this_step())
        length.record(wanted[-1], 0)
    assert wanted == [4, 2, 1] and length.this_step() == 0
    for _ in range(PAUSE_STEPS - 1):
        assert length.this_step() == 0
    assert length.this_step() == 1  # a try
    length.record(1, 0)
    assert [length.this_step() for _ in range(2 * PAUSE_STEPS + 1)].count(1) == 1  # waits twice as long
    length.record(1, 1)  # taken: back to drafting, doubling up to k
    assert [length.this_step(), length.record(2, 2), length.this_step(), length.record(4, 4), length.this_step()] \
        == [1, None, 2, None, 4]


def test_each_position_counts_the_drafts_before_it_for_penalties_and_min_tokens(tiny_dirs):
    from transformers import AutoTokenizer
    from predictor.engine.options import GenerationOptions
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["7b"])
    table = SamplingTable(torch.device("cpu"), 50)
    options = GenerationOptions(max_new_tokens=8, repetition_penalty=1.5, eos_token_ids=(0,))
    table.set_row(2, make_sampler(options, [1, 2], 0, torch.device("cpu"), tokenizer), [1, 2])
    table.advance(torch.tensor([2, 2]), torch.tensor([7, 7]))
    view = position_table(table, [2], [[9, 7, 3]])
    assert view.counters[:, GENERATED].tolist() == [2, 3, 4, 5]
    assert [row.nonzero().flatten().tolist() for row in view.seen] == [[1, 2, 7], [1, 2, 7, 9], [1, 2, 7, 9],
                                                                           [1, 2, 3, 7, 9]]
    assert view.counts[:, 7].tolist() == [2, 2, 3, 3]


# -- the engine, on both tiny Falcons --------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["7b", "40b"])
def engine(request, tiny_dirs):
    return reserved_engine(tiny_dirs[request.param])


def jobs(engine, **options):
    options = {"do_sample": False, "max_new_tokens": NEW, **options}
    return [make_job(engine, prompt, **options) for prompt in PROMPTS]


class Drafts:
    """Drafts made from each prompt's known output (``truth``): right, wrong (each token + 1), or right for the
    first ``step % (K + 1)`` drafts then wrong, so full, partial and no acceptance all occur."""

    def __init__(self, engine, results, kind: str) -> None:
        self.truth = {tuple(engine.encode(p)): generated(r)[0] for p, r in zip(PROMPTS, results)}
        self.kind, self.calls = kind, 0

    def __call__(self, seq, k: int) -> list[int]:
        self.calls += 1
        known = self.truth[tuple(seq.tokens[:seq.prompt_len])][len(seq.generated):][:k]
        right = {"right": len(known), "wrong": 0, "partly": self.calls % (K + 1)}[self.kind]
        return known[:right] + [token + 1 for token in known[right:]]


def counters() -> tuple[float, float]:
    return (REGISTRY.get_sample_value("falcon_spec_decode_num_draft_tokens_total") or 0.0,
            REGISTRY.get_sample_value("falcon_spec_decode_num_accepted_tokens_total") or 0.0)


def speculating(engine, job_list, propose=None, **config):
    """The jobs' results with speculation on, and the draft tokens verified and accepted meanwhile."""
    before = counters()
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=K, **config), propose)
    results = run(engine, job_list, speculator=speculator)
    drafted, accepted = (after - start for after, start in zip(counters(), before))
    return results, drafted, accepted


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.3, "min_new_tokens": 20},
                                     {"no_repeat_ngram_size": 2}],
                         ids=["plain", "penalties", "reads-ids"])
def test_greedy_output_is_the_same_whatever_the_drafts(engine, options):
    off = run(engine, jobs(engine, **options))
    for kind in ("right", "wrong", "partly"):
        on, drafted, accepted = speculating(engine, jobs(engine, **options), Drafts(engine, off, kind))
        assert [generated(r) for r in on] == [generated(r) for r in off], kind
        assert drafted > 0
        if kind == "right":
            assert accepted == drafted  # the output itself, as drafts, is taken whole
        elif kind == "wrong":
            assert accepted == 0
        else:
            assert 0 < accepted < drafted
    on, _, _ = speculating(engine, jobs(engine, **options))  # n-gram's own drafts
    assert [generated(r) for r in on] == [generated(r) for r in off]


@pytest.mark.parametrize("arch", ["7b", "40b"])
def test_quantized_weights_and_an_fp8_cache_speculate_as_they_decode(tiny_dirs, arch):
    """int8 weights and an fp8 KV cache: the verifying step reads the same quantized layers and the same 8-bit
    cache rows as the plain step, so greedy output and seeded sampling are unchanged by drafts."""
    quantized = reserved_engine(tiny_dirs[arch], quantization="int8", kv_cache_dtype="fp8")
    off = run(quantized, jobs(quantized))
    for kind in ("right", "partly"):
        on, drafted, accepted = speculating(quantized, jobs(quantized), Drafts(quantized, off, kind))
        assert [generated(r) for r in on] == [generated(r) for r in off], kind
        assert 0 < accepted <= drafted
    seeded = dict(do_sample=True, temperature=0.9, top_k=40, seed=7)
    sampled_off = run(quantized, jobs(quantized, **seeded))
    sampled_on, _, _ = speculating(quantized, jobs(quantized, **seeded), Drafts(quantized, sampled_off, "right"))
    assert [generated(r) for r in sampled_on] == [generated(r) for r in sampled_off]


def test_seeded_sampling_is_the_same_with_speculation(engine):
    options = dict(do_sample=True, seed=11, temperature=0.9, top_k=40, repetition_penalty=1.2)
    off = run(engine, jobs(engine, **options))
    for kind in ("right", "partly"):
        on, drafted, accepted = speculating(engine, jobs(engine, **options), Drafts(engine, off, kind))
        assert [generated(r) for r in on] == [generated(r) for r in off] and accepted > 0, kind


def test_log_probabilities_are_those_of_the_plain_step(engine):
    options = dict(output_scores=True, return_dict_in_generate=True)
    off = run(engine, jobs(engine, **options))
    on, _, accepted = speculating(engine, jobs(engine, **options), Drafts(engine, off, "right"))
    assert accepted > 0
    for plain, speculated in zip(off, on):
        ours, theirs = speculated.sequences[0].logprobs, plain.sequences[0].logprobs
        assert len(ours) == len(theirs) == len(plain.sequences[0].token_ids)
        assert [x.logprob for x in ours] == pytest.approx([x.logprob for x in theirs], abs=1e-4)


@pytest.mark.parametrize("cut", ["eos", "stop", "length"])
def test_a_burst_is_cut_exactly_at_eos_stop_strings_and_max_tokens(engine, cut):
    plain = run(engine, jobs(engine))
    ids = generated(plain[0])[0]
    at = next(i for i in range(5, NEW) if ids[i] not in ids[:i])  # mid-generation, inside a burst of right drafts
    options = {"eos": {"eos_token_id": ids[at]}, "length": {"max_new_tokens": at + 1},
               "stop": {"stop_strings": [engine.decode(ids[at - 1:at + 1])]}}[cut]
    off = run(engine, jobs(engine, **options))
    on, _, accepted = speculating(engine, jobs(engine, **options), Drafts(engine, plain, "right"))
    assert accepted > 0
    assert [generated(r) for r in on] == [generated(r) for r in off]
    assert [s.finish_reason for r in on for s in r.sequences] == [s.finish_reason for r in off for s in r.sequences]
    if cut != "stop":
        assert generated(on[0])[0] == ids[:at + 1]


def test_streams_get_the_accepted_tokens_in_order_and_the_cache_holds_no_rejected_token(engine):
    off = run(engine, jobs(engine))
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=K), Drafts(engine, off, "partly"))
    engine.cache.clear()  # rows hold only what this test runs

    async def main():
        batcher = Batcher(engine, speculator=speculator)
        batcher.start()
        tickets = [batcher.submit(job, stream=True) for job in jobs(engine)]
        streamed = []
        for ticket in tickets:
            streamed.append([event.token_id async for event in ticket.events() if event.token_id is not None])
        batcher.close()
        return streamed
    streamed = asyncio.run(main())
    assert streamed == [generated(r)[0] for r in off]
    cache = engine.cache
    known = [engine.encode(p) + generated(r)[0] for p, r in zip(PROMPTS, off)]
    for row in range(cache.rows):  # each row's indexed tokens are a real sequence's, never a rejected draft
        held = cache._tokens[row]
        assert len(held) == cache.length(row)
        if held:
            assert any(held == sequence[:len(held)] for sequence in known), row


def test_a_request_cancelled_mid_burst_ends_there_and_frees_its_row(engine):
    off = run(engine, jobs(engine))
    right = Drafts(engine, off, "right")

    def cancel_at_fifth(seq, k):
        if len(seq.generated) >= 5:
            seq.ticket.cancel()
        return right(seq, k)

    async def main():
        batcher = Batcher(engine, speculator=Speculator(SpeculativeConfig(num_speculative_tokens=K),
                                                        cancel_at_fifth))
        batcher.start()
        result = await batcher.submit(jobs(engine)[0]).result()
        deadline = asyncio.get_running_loop().time() + 10
        while batcher.running_sequences and asyncio.get_running_loop().time() < deadline:  # retired after answering
            await asyncio.sleep(0.001)
        running = batcher.running_sequences
        batcher.close()
        return result, running
    result, running = asyncio.run(main())
    tokens = generated(result)[0]
    assert result.sequences[0].finish_reason == "cancelled" and running == 0
    assert tokens == generated(off[0])[0][:len(tokens)] and 5 < len(tokens) < NEW  # the burst's first token only
    assert engine.cache.free_rows == engine.cache.rows


def test_structured_output_does_not_speculate_and_keeps_its_grammar(engine):
    import dataclasses
    from predictor.engine.sampling.grammar import json_schema_grammar
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    plain, = jobs(engine)[:1]
    ruled = dataclasses.replace(plain, options=dataclasses.replace(plain.options, grammar=grammar))
    off = run(engine, [ruled, plain])
    asked = []

    def right(seq, k):
        asked.append(seq.ticket.job.options.grammar)
        return Drafts(engine, [off[1]], "right")(seq, k)
    on, _, accepted = speculating(engine, [ruled, plain], right)
    assert accepted > 0 and asked and not any(asked)  # only the plain request drafted
    assert [generated(r) for r in on] == [generated(r) for r in off]


def test_no_step_speculates_above_the_batch_size_threshold(engine):
    off = run(engine, jobs(engine, min_new_tokens=NEW))  # all running until the end
    for threshold in (len(PROMPTS) - 1, len(PROMPTS)):
        on, drafted, _ = speculating(engine, jobs(engine, min_new_tokens=NEW), Drafts(engine, off, "right"),
                                     disable_by_batch_size=threshold)
        assert (drafted > 0) == (threshold == len(PROMPTS))
        assert [generated(r) for r in on] == [generated(r) for r in off]


# -- a draft model --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafters(tiny_dirs):
    """A draft engine per tiny layout: each drafts for its own layout's target (a draft equal to the target) and
    for the other (the 7B-shaped drafting for the 40B-shaped, as falcon-7b for falcon-40b: one tokenizer)."""
    return {arch: DraftModel(reserved_engine(tiny_dirs[arch])) for arch in ("7b", "40b")}


@pytest.mark.parametrize("drafter", ["same", "other"])
def test_a_draft_model_keeps_greedy_and_seeded_outputs(engine, drafters, drafter):
    arch = "40b" if engine.shape.kv_heads > 1 else "7b"
    draft = drafters[arch if drafter == "same" else {"7b": "40b", "40b": "7b"}[arch]]
    for options in ({}, dict(do_sample=True, seed=5, temperature=0.8, top_k=40)):
        off = run(engine, jobs(engine, **options))
        before = counters()
        speculator = Speculator(SpeculativeConfig(method="draft_model", model="draft", num_speculative_tokens=K),
                                propose_all=draft)
        on = run(engine, jobs(engine, **options), speculator=speculator)
        drafted, accepted = (after - start for after, start in zip(counters(), before))
        assert [generated(r) for r in on] == [generated(r) for r in off], options
        assert drafted > 0
        if drafter == "same" and not options:
            assert accepted == drafted  # the target's own greedy choices


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_dirs, tmp_path, drafters):
    from predictor.tiny import build_tiny_falcon
    word_level = reserved_engine(build_tiny_falcon(tmp_path / "word-level", "7b", tokenizer="wordlevel"), rows=2)
    target = drafters["7b"].engine
    assert "vocabulary" in tokenizer_mismatch(word_level, target)
    assert tokenizer_mismatch(drafters["40b"].engine, target) is None


# -- over HTTP ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["7b", "40b"])
def test_a_draft_that_cannot_fit_beside_the_target_is_refused_in_one_line(tiny_dirs, arch):
    """The draft's weights are counted from its config before it is loaded, as the load would hold them."""
    source = str(tiny_dirs[arch])
    for dtype, scheme in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8")):
        loaded = reserved_engine(source, rows=1, dtype=str(dtype).removeprefix("torch."), quantization=scheme)
        # int8 is counted at a byte a weight: its row scales add 2 bytes per row, 3 % at the tiny width of 64
        assert planned_weight_bytes(source, dtype, scheme) == pytest.approx(weight_bytes(loaded.model), rel=0.03)
    need = planned_weight_bytes(source, torch.bfloat16, None)
    assert draft_fit_refusal("/models/falcon-7b", need, need) is None
    refusal = draft_fit_refusal("/models/falcon-7b", 14_400_000_000, 9_000_000_000)
    assert "\n" not in refusal and refusal.startswith("--speculative_config: the draft model /models/falcon-7b")
    assert "14.4 GB" in refusal and "9.0 GB" in refusal and '"ngram"' in refusal and "--quantization" in refusal


@pytest.fixture(scope="module")
def speculative_server(start_server, tiny_dirs):
    config = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                         "prompt_lookup_max": 3})
    return start_server(tiny_dirs["7b"], "--speculative_config", config)


def test_a_speculating_server_answers_as_one_without(speculative_server, tiny_server):
    body = {"prompt": "1 2 3 4 5 6 1 2 3 4 5 6 1 2 3", "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": 48}}
    answers = [httpx.post(f"{server.url}/chat", json=body, timeout=60).json()["Result"]
               for server in (speculative_server, tiny_server)]
    assert answers[0] == answers[1]
    metrics = httpx.get(f"{speculative_server.url}/metrics", timeout=10).text
    drafted = [line for line in metrics.splitlines() if line.startswith("falcon_spec_decode_num_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0
