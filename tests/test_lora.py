"""Per-request LoRA adapters in the engine, token for token against PEFT on both tiny Falcon layouts: each adapter
alone, and the base model with several adapters in one batch (more adapters than slots, so some requests wait)."""

from __future__ import annotations

import pytest

from generation import make_job, run
from lora_adapters import ALL_TARGETS, greedy, make_adapter, peft_model
from predictor.engine.lora.adapter import linear_shapes, read_adapter
from predictor.engine.model.loading import LoadSpec, load_engine

PROMPTS = ["Return the value of", "The quick brown fox", "Create a new"]
LONG = " ".join(["Return the value of the key"] * 8)  # several blocks of the prefix cache
NEW_TOKENS = 8
ADAPTERS = {  # name: how PEFT made it
    "qkv": dict(r=8, lora_alpha=8, seed=1),  # Kaito's fine-tuning default
    "all": dict(r=16, lora_alpha=32, targets=ALL_TARGETS, use_rslora=True, seed=2),
    "mlp": dict(r=4, lora_alpha=16, targets=("dense", "dense_h_to_4h", "dense_4h_to_h"), seed=3),
}


@pytest.fixture(scope="module", params=["7b", "40b"])
def setup(request, tiny_dirs, tmp_path_factory):
    base = tiny_dirs[request.param]
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    paths = {name: make_adapter(base, root / name, **kwargs) for name, kwargs in ADAPTERS.items()}
    engine = load_engine(LoadSpec(str(base)))
    bank = engine.enable_lora(max_loras=2, max_rank=16)
    for name, path in paths.items():
        bank.register(read_adapter(name, path, linear_shapes(engine.model), max_rank=16))
    engine.reserve(16)
    expected = {}
    for name in (None, *paths):
        model = peft_model(base, {name: paths[name]} if name else None)
        expected[name] = [greedy(model, engine.encode(p), NEW_TOKENS) for p in (*PROMPTS, LONG)]
    return engine, expected


def job(engine, prompt, adapter):
    import dataclasses

    return dataclasses.replace(make_job(engine, prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False), adapter=adapter)


def tokens(result):
    return list(result.sequences[0].token_ids)


def test_the_adapters_change_the_output(setup):
    _, expected = setup
    for name in ADAPTERS:
        assert expected[name] != expected[None], name


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_each_adapter_alone_equals_peft(setup, adapter):
    engine, expected = setup
    results = run(engine, [job(engine, p, adapter) for p in PROMPTS], max_batch_size=1)
    assert [tokens(r) for r in results] == expected[adapter][:len(PROMPTS)]


def test_base_and_adapters_batched_together_equal_each_alone(setup):
    """Four adapters' worth of requests (base included) with two slots: each still gets PEFT's tokens."""
    engine, expected = setup
    names = [None, *ADAPTERS]
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in names]
    results = run(engine, [job(engine, PROMPTS[i], name) for name, i in jobs], stagger_s=0.01)
    for (name, i), result in zip(jobs, results):
        assert tokens(result) == expected[name][i], (name, i)
    assert engine.lora.running() == []  # every slot released


def test_a_prefix_is_never_shared_between_adapters(setup):
    """A long prompt computed with one adapter is not reused for another (nor for the base model)."""
    engine, expected = setup
    for name in (None, "qkv", "all", None, "all", "qkv"):
        assert tokens(run(engine, [job(engine, LONG, name)])[0]) == expected[name][-1], name
    assert len({tuple(expected[name][-1]) for name in (None, "qkv", "all")}) == 3


@pytest.mark.slow  # compiles the decode step
def test_compiled_steps_serve_the_adapters_as_peft(setup):
    """The compiled decode step reads every slot and target: base and adapter requests still get PEFT's tokens."""
    engine, expected = setup
    compiled = load_engine(LoadSpec(engine.model.name_or_path))
    bank = compiled.enable_lora(max_loras=2, max_rank=16)
    for name in ADAPTERS:
        bank.register(engine.lora.adapter(name))
    compiled.reserve(4, compile=True)
    names = [None, *ADAPTERS]
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in names]
    results = run(compiled, [job(compiled, PROMPTS[i], name) for name, i in jobs], max_batch_size=4,
                  stagger_s=0.01, prepare=compiled.warm_up)
    for (name, i), result in zip(jobs, results):
        assert tokens(result) == expected[name][i], (name, i)
