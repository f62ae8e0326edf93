"""Adapters the server cannot serve are refused in one line naming the adapter and the problem (model-free)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from predictor.engine.lora.adapter import AdapterError, read_adapter

SHAPES = [{"query_key_value": (96, 64), "dense": (64, 64), "dense_h_to_4h": (256, 64), "dense_4h_to_h": (64, 256)}] * 2
KEY = "base_model.model.transformer.h.{layer}.self_attention.query_key_value.lora_{which}.weight"


def write(folder, config=None, tensors=None, r=8):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["query_key_value"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    if tensors is None:
        tensors = {KEY.format(layer=0, which="A"): torch.ones(r, 64), KEY.format(layer=0, which="B"): torch.ones(96, r)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def refusal(folder, max_rank=16):
    with pytest.raises(AdapterError) as error:
        read_adapter("mine", folder, SHAPES, max_rank)
    message = str(error.value)
    assert message.startswith("adapter mine: ") and "\n" not in message
    return message


def test_a_good_adapter_reads_with_its_scaling_folded_in(tmp_path):
    adapter = read_adapter("mine", write(tmp_path / "a", {"lora_alpha": 16}), SHAPES, 16)
    a, b = adapter.weights[(0, "query_key_value")]
    assert adapter.rank == 8 and a.shape == (8, 64) and torch.equal(b, torch.full((96, 8), 2.0))
    rs = read_adapter("mine", write(tmp_path / "rs", {"lora_alpha": 16, "use_rslora": True}), SHAPES, 16)
    assert torch.allclose(rs.weights[(0, "query_key_value")][1], torch.full((96, 8), 16 / 8 ** 0.5))


@pytest.mark.parametrize("config, words", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "trained biases"),
    ({"target_modules": ["q_proj"]}, "does not have"),
    ({"rank_pattern": {"dense": 4}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "not LORA"),
])
def test_refused_configs(tmp_path, config, words):
    assert words in refusal(write(tmp_path / "a", config))


def test_rank_above_the_maximum(tmp_path):
    assert "above --max_lora_rank 4" in refusal(write(tmp_path / "a"), max_rank=4)


def test_shapes_of_another_falcon_size(tmp_path):
    tensors = {KEY.format(layer=0, which="A"): torch.ones(8, 128), KEY.format(layer=0, which="B"): torch.ones(96, 8)}
    assert "another Falcon size" in refusal(write(tmp_path / "a", tensors=tensors))
    tensors = {KEY.format(layer=5, which="A"): torch.ones(8, 64), KEY.format(layer=5, which="B"): torch.ones(96, 8)}
    assert "another Falcon size" in refusal(write(tmp_path / "b", tensors=tensors))


@pytest.mark.parametrize("key, words", [
    ("base_model.model.transformer.h.0.self_attention.query_key_value.lora_magnitude_vector", "DoRA"),
    ("base_model.model.transformer.h.0.self_attention.query_key_value.bias", "trained biases"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
    ("base_model.model.transformer.h.0.mlp.query_key_value.lora_A.weight", "does not have"),
])
def test_refused_weights(tmp_path, key, words):
    tensors = {KEY.format(layer=0, which="A"): torch.ones(8, 64), KEY.format(layer=0, which="B"): torch.ones(96, 8),
               key: torch.ones(8, 64)}
    assert words in refusal(write(tmp_path / "a", tensors=tensors))


def test_missing_and_unreadable_files(tmp_path):
    assert "is missing" in refusal(tmp_path / "nothing")
    folder = write(tmp_path / "a")
    (folder / "adapter_config.json").write_text("{not json")
    assert "unreadable" in refusal(folder)
    folder = write(tmp_path / "b")
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    assert "unreadable" in refusal(folder)
    (folder / "adapter_model.safetensors").unlink()
    assert "neither" in refusal(folder)


class Payload:  # a pickle that would run code: weights_only=True refuses it
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_bin_file_loads_only_as_plain_tensors(tmp_path):
    folder = write(tmp_path / "a")
    tensors = {KEY.format(layer=0, which="A"): torch.ones(8, 64), KEY.format(layer=0, which="B"): torch.ones(96, 8)}
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    assert read_adapter("mine", folder, SHAPES, 16).rank == 8
    torch.save({"x": Payload()}, folder / "adapter_model.bin")
    assert "weights_only=True" in refusal(folder)
