"""Kaito's adapter directory: every adapter in it, weighted by the environment variable named after its folder and
combined as Kaito's server combines them with PEFT's ``add_weighted_adapter`` (linear for one, svd for several),
applies to every request; each is logged as ``Adapter added: <name>``. Adapters that cannot be served stop start-up
with one line naming the adapter and the problem."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from transformers import AutoTokenizer

from lora_adapters import ALL_TARGETS, greedy, make_adapter, peft_model
from predictor.api.adapters import kaito_adapters

PROMPTS = ["Return the value of", "The quick brown fox"]
N = 6


def completion_ids(server, prompt: str) -> list[int]:
    response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": server.model_name, "prompt": prompt, "max_tokens": N, "min_tokens": N, "temperature": 0,
        "logprobs": 0, "return_tokens_as_token_ids": True})
    assert response.status_code == 200, response.text
    return [int(token.split(":")[1]) for token in response.json()["choices"][0]["logprobs"]["tokens"]]


@pytest.mark.parametrize("arch, strengths", [("7b", {"alpha": 0.5}), ("40b", {"alpha": 0.5}),
                                             ("7b", {"alpha": 1.0, "beta": 0.7}),
                                             ("40b", {"alpha": 0.3, "beta": 1.0})])
def test_the_directory_mix_equals_peft_on_every_request(arch, strengths, tiny_dirs, tmp_path, start_server):
    base = tiny_dirs[arch]
    folder = tmp_path / "adapter"
    made = {"alpha": {"r": 8, "lora_alpha": 8, "seed": 5},  # Kaito's fine-tuning defaults
            "beta": {"r": 4, "lora_alpha": 16, "targets": ALL_TARGETS, "seed": 6}}
    paths = {name: make_adapter(base, folder / name, **made[name]) for name in strengths}
    (folder / "not-an-adapter").mkdir()
    server = start_server(base, "--adapter_dir", str(folder), env={k: str(v) for k, v in strengths.items()})
    reference = peft_model(base, paths, weights=strengths)
    plain = peft_model(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected = greedy(reference, ids, N)
        assert completion_ids(server, prompt) == expected
        chat = httpx.post(f"{server.url}/chat", timeout=60, json={
            "prompt": prompt, "return_full_text": False,
            "generate_kwargs": {"max_new_tokens": N, "min_new_tokens": N, "do_sample": False}})
        assert chat.json()["Result"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert any(greedy(plain, tokenizer(p)["input_ids"], N) != completion_ids(server, p) for p in PROMPTS)
    log = server.log()
    for name in strengths:
        assert f"Adapter added: {name}" in log
    assert "Adapter added: not-an-adapter" not in log


def test_discovery_reads_strengths_from_the_environment(tmp_path):
    for name in ("b", "a", "empty"):
        (tmp_path / name).mkdir()
    for name in ("a", "b"):
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert kaito_adapters(tmp_path, {"a": "0.25"}) == [("a", tmp_path / "a", 0.25), ("b", tmp_path / "b", 1.0)]
    assert kaito_adapters(tmp_path / "missing", {}) == []
    with pytest.raises(SystemExit, match="environment variable a='strong', is not a number"):
        kaito_adapters(tmp_path, {"a": "strong"})


def exit_line(server, deadline_s: float = 120) -> str:
    deadline = time.monotonic() + deadline_s
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.process.returncode not in (None, 0)
    log = server.log()
    assert "Traceback" not in log
    return log


def test_a_strength_that_is_not_a_number_stops_start_up(tiny_dirs, tmp_path, start_server):
    make_adapter(tiny_dirs["7b"], tmp_path / "adapter" / "alpha", seed=5)
    server = start_server(tiny_dirs["7b"], "--adapter_dir", str(tmp_path / "adapter"), env={"alpha": "half"},
                          wait=False)
    assert "adapter alpha: its strength, environment variable alpha='half', is not a number" in exit_line(server)


def test_a_bad_adapter_stops_start_up_in_one_line(tiny_dirs, tmp_path, start_server):
    big = make_adapter(tiny_dirs["7b"], tmp_path / "big", r=32, lora_alpha=32, seed=7)
    server = start_server(tiny_dirs["7b"], "--lora_modules", f"big={big}", "--adapter_dir", str(tmp_path / "none"),
                          wait=False)
    assert "adapter big: rank 32 is above --max_lora_rank 16" in exit_line(server)
    other_size = make_adapter(tiny_dirs["40b"], tmp_path / "other", seed=7)  # 40b's fused projection is wider
    server = start_server(tiny_dirs["7b"], "--adapter_dir", str(tmp_path / "kaito"), "--lora_modules",
                          f"other={other_size}", wait=False)
    assert "adapter other:" in exit_line(server) and "another Falcon size" in server.log()
