"""The variants table and the start-up checks that read it."""

import pytest

from predictor.config import DEMO_MODEL_NAME, parse_config
from predictor.variants import VARIANTS, find_variant, memory_shortfall


def test_the_four_falcons_with_their_needs():
    assert set(VARIANTS) == {"falcon-7b", "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct"}
    for name, variant in VARIANTS.items():
        assert variant.hf_id == f"tiiuae/{name}" and len(variant.revision) == 40
        assert variant.context_length == 2048 and variant.dtype == "bfloat16"
        assert variant.instruct == name.endswith("-instruct")
        assert (variant.gpus, variant.gpu_memory_gib) == ((1, 14) if "7b" in name else (2, 90))
        assert variant.hf_uri == f"hf://tiiuae/{name}:{variant.revision}"


def test_lookup_by_served_name_or_hub_id():
    assert find_variant("falcon-40b") is find_variant("tiiuae/falcon-40b") is VARIANTS["falcon-40b"]
    assert find_variant("llama") is None and find_variant(None) is None


def test_falcon_40b_does_not_fit_one_80gb_gpu_and_says_what_works():
    message = memory_shortfall(VARIANTS["falcon-40b"], [79.2])
    assert "falcon-40b needs about 90 GiB of GPU memory in bfloat16" in message
    assert "2 GPUs" in message and "141 GB" in message and "--quantization fp8" in message
    assert memory_shortfall(VARIANTS["falcon-40b"], [79.2, 79.2]) is None
    assert memory_shortfall(VARIANTS["falcon-40b"], [139.8]) is None
    assert memory_shortfall(VARIANTS["falcon-7b"], [79.2]) is None


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_falcon_40b_fits_one_80gb_gpu_in_8_bits(scheme):
    assert memory_shortfall(VARIANTS["falcon-40b"], [79.2], scheme) is None
    assert VARIANTS["falcon-40b"].rows_on(1, 80, scheme) >= 64  # a batch beside the weights


def test_a_gpu_too_small_even_for_8_bits_is_told_the_scheme_that_fits():
    message = memory_shortfall(VARIANTS["falcon-40b"], [39.5], "fp8")
    assert "in --quantization fp8" in message and "--quantization int4 (about 34 GiB)" in message
    assert memory_shortfall(VARIANTS["falcon-7b"], [15.0], "int8") is None  # a 16 GB T4 or L4
    assert "--quantization fp8" in memory_shortfall(VARIANTS["falcon-7b"], [11.0])


def test_bytes_per_scheme_and_kv_rows_per_cache_dtype():
    falcon_7b = VARIANTS["falcon-7b"]
    assert falcon_7b.weight_bytes("int8") / falcon_7b.weight_bytes() < 0.55
    assert falcon_7b.weight_bytes("int4") / falcon_7b.weight_bytes() < 0.3
    assert falcon_7b.kv_bytes_per_token_in("fp8") == 32 * 1 * 2 * 66  # 64 e4m3 values and a 2-byte scale
    for variant in VARIANTS.values():
        assert variant.rows_on(1, 80, "fp8", "fp8") >= 1.9 * variant.rows_on(1, 80, "fp8")


def test_model_name_picks_the_variant_and_its_pinned_revision():
    config = parse_config(["--model_name", "falcon-7b-instruct"])
    assert config.model_id == "tiiuae/falcon-7b-instruct"
    assert config.revision == VARIANTS["falcon-7b-instruct"].revision
    assert config.limits.context_length == 2048


def test_model_dir_wins_and_no_model_means_the_demo():
    config = parse_config(["--model_dir", "/mnt/models", "--model_name", "falcon-40b"])
    assert config.model_dir == "/mnt/models" and not config.is_demo
    demo = parse_config([])
    assert demo.is_demo and demo.model_name == DEMO_MODEL_NAME


def test_api_key_from_the_environment_is_not_a_visible_default(monkeypatch, capsys):
    monkeypatch.setenv("PREDICTOR_API_KEY", "s3cret")
    assert parse_config([]).api_key == "s3cret"
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "s3cret" not in capsys.readouterr().out


def test_limits_must_be_positive():
    with pytest.raises(SystemExit):
        parse_config(["--max_queue", "0"])
