"""Start-up mistakes: each ends ``python -m predictor`` within seconds, non-zero, in one line that says what to do.

The processes run for real (no mocks): an unreachable Hub is a local port that refuses connections, or one that
accepts them and never answers, so no test depends on this machine's network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from predictor.preflight import checkpoint_problem
from predictor.config import DEMO_MODEL_NAME, add_predictor_arguments, build_parser, parse_config
from predictor.variants import VARIANTS, closest_variant, cpu_memory_warning

ROOT = Path(__file__).resolve().parent.parent
FAST_S = 10  # the interpreter and KServe's import take about 1 s on an idle machine; the checks themselves, ms
WITH_TORCH_S = 20  # checking for a GPU imports torch too: about 5 s in all on 2 busy cores
FALCON_7B = VARIANTS["falcon-7b"]


def refuse(*args: str, env: dict[str, str] | None = None, hf_cache: Path, within_s: float = FAST_S) -> str:
    """Run ``python -m predictor ARGS``; assert it exits non-zero, fast, with one line and no traceback."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "predictor", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "HF_HUB_CACHE": str(hf_cache), **(env or {})})
    elapsed = time.monotonic() - started
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    assert elapsed < within_s, f"took {elapsed:.1f} s: {output}"
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    return output


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    """An empty Hugging Face cache, so that a copy in this machine's cache cannot change the outcome."""
    return tmp_path / "hf-cache"


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as sock:  # bound then closed: connecting to it is refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_model_name_that_is_no_variant_names_the_four_and_the_closest(hf_cache) -> None:
    line = refuse("--model_name", "falcon-7", hf_cache=hf_cache)
    assert "falcon-7b, falcon-7b-instruct, falcon-40b, falcon-40b-instruct" in line
    assert "Did you mean falcon-7b?" in line and "--model_dir DIR" in line


def test_closest_variant_and_when_there_is_none() -> None:
    assert closest_variant("falcon-40b-instruc") == "falcon-40b-instruct"
    assert closest_variant("Falcon-7B") == "falcon-7b"
    assert closest_variant("llama") is None


def test_no_model_named_is_the_demo_and_a_name_with_a_checkpoint_is_only_a_name() -> None:
    assert parse_config([]).is_demo and parse_config(["--model_name", DEMO_MODEL_NAME]).is_demo
    assert parse_config(["--model_name", "my-falcon", "--model_dir", "/mnt/models"]).model_name == "my-falcon"
    assert parse_config(["--model_name", "my-falcon", "--model_id", "org/falcon"]).model_id == "org/falcon"
    with pytest.raises(SystemExit, match="names no Falcon variant"):
        parse_config(["--model_name", "falcon-180b"])


def test_a_model_dir_that_does_not_exist(tmp_path, hf_cache) -> None:
    line = refuse("--model_dir", str(tmp_path / "nonexistent"), hf_cache=hf_cache)
    assert line == f"--model_dir {tmp_path / 'nonexistent'} does not exist."


def test_an_empty_model_dir_says_what_a_checkpoint_holds(tmp_path, hf_cache) -> None:
    line = refuse("--model_dir", str(tmp_path), "--model_name", "falcon-7b", hf_cache=hf_cache)
    missing = line.split("missing: ")[1].split(". ")[0]
    assert "config.json" in missing and "*.safetensors or *.bin" in missing and "tokenizer.json" in missing
    # A variant's name says which checkpoint belongs there, and how to fetch it at its pinned revision.
    assert f"hf download tiiuae/falcon-7b --revision {FALCON_7B.revision} --local-dir {tmp_path}" in line


def test_a_checkpoint_without_its_tokenizer_names_only_what_is_missing(tiny_dir, tmp_path, hf_cache) -> None:
    partial = shutil.copytree(tiny_dir, tmp_path / "partial")
    (partial / "tokenizer.json").unlink()
    line = refuse("--model_dir", str(partial), hf_cache=hf_cache)
    assert line.split("missing: ")[1].split(". ")[0] == "the tokenizer, tokenizer.json"


def test_a_sharded_checkpoint_needs_one_complete_copy_of_its_weights(tmp_path) -> None:
    """Hub checkpoints often hold the weights twice (safetensors and bin), each sharded with an index."""
    for name in ("config.json", "tokenizer.json", "model-1.safetensors"):
        (tmp_path / name).write_text("{}")
    for index, shards in (("model.safetensors.index.json", ["model-1.safetensors", "model-2.safetensors"]),
                          ("pytorch_model.bin.index.json", ["pytorch_model-1.bin", "pytorch_model-2.bin"])):
        (tmp_path / index).write_text(json.dumps({"weight_map": dict(zip("ab", shards))}))
    problem = checkpoint_problem(tmp_path)
    assert "missing: 1 of the weight files model.safetensors.index.json lists (e.g. model-2.safetensors)" in problem
    (tmp_path / "model-2.safetensors").write_text("")
    assert checkpoint_problem(tmp_path) is None  # the .bin copy may be absent


def test_an_unreachable_hub_fails_at_once_with_the_download_command(refused_port, hf_cache) -> None:
    line = refuse("--model_name", "falcon-7b", hf_cache=hf_cache,
                  env={"HF_ENDPOINT": f"http://127.0.0.1:{refused_port}"})
    assert line.startswith(f"The Hugging Face Hub (http://127.0.0.1:{refused_port}) cannot be reached")
    assert (f"`hf download tiiuae/falcon-7b --revision {FALCON_7B.revision} --local-dir falcon-7b` and start with "
            "--model_dir falcon-7b --model_name falcon-7b") in line


def test_a_hub_that_never_answers_is_given_up_on_within_seconds(hf_cache) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        line = refuse("--model_name", "falcon-40b-instruct", hf_cache=hf_cache,
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"})
    assert "cannot be reached (ReadTimeout" in line and "tiiuae/falcon-40b-instruct --revision" in line


def test_hf_hub_offline_is_honoured_without_touching_the_network(hf_cache) -> None:
    line = refuse("--model_name", "falcon-7b-instruct", hf_cache=hf_cache,
                  env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert line.startswith("HF_HUB_OFFLINE is set and tiiuae/falcon-7b-instruct at revision")
    assert f"({hf_cache})" in line and "hf download tiiuae/falcon-7b-instruct --revision" in line


def test_an_incomplete_cached_copy_offline_says_what_it_lacks(tiny_dir, hf_cache) -> None:
    snapshot = shutil.copytree(tiny_dir, hf_cache / "models--tiiuae--falcon-7b" / "snapshots" / FALCON_7B.revision)
    (snapshot / "model.safetensors").unlink()  # a download cut short
    line = refuse("--model_name", "falcon-7b", hf_cache=hf_cache, env={"HF_HUB_OFFLINE": "1"})
    assert f"the cached copy of tiiuae/falcon-7b at revision {FALCON_7B.revision} ({snapshot})" in line
    assert "missing: the weights, *.safetensors or *.bin." in line


def test_a_cached_pinned_checkpoint_is_served_without_the_hub(start_server, tiny_dir, tmp_path,
                                                              refused_port) -> None:
    """The pinned commit in the Hugging Face cache is served although the Hub is unreachable; as a falcon-7b on
    the CPU, start-up warns what its float32 weights need."""
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--tiiuae--falcon-7b" / "snapshots" / FALCON_7B.revision
    shutil.copytree(tiny_dir, snapshot)
    server = start_server(None, "--device", "cpu", model_name="falcon-7b",
                          env={"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{refused_port}"})
    response = httpx.post(f"{server.url}/chat", json={"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 2}},
                          timeout=30)
    assert response.status_code == 200, response.text
    log = server.log()
    assert f"Serving tiiuae/falcon-7b from the Hugging Face cache: {snapshot}" in log
    assert "falcon-7b on the CPU: 6.9 B parameters in float32 need about 26 GiB" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_device_cuda_without_a_gpu_is_refused_before_the_port_opens(tiny_dir, hf_cache) -> None:
    line = refuse("--model_dir", str(tiny_dir), "--device", "cuda", hf_cache=hf_cache, within_s=WITH_TORCH_S)
    assert line.startswith("--device cuda was asked for but no CUDA GPU is visible")


@pytest.mark.parametrize("flags, words", [
    (("--quantization", "fp8"), "--quantization fp8 needs a GPU with FP8 tensor cores"),
    (("--load_in_4bit",), "--quantization int4 needs a CUDA GPU of compute capability 8.0+"),
])
def test_a_gpu_scheme_on_the_cpu_is_refused_before_the_port_opens(tiny_dir, hf_cache, flags, words) -> None:
    line = refuse("--model_dir", str(tiny_dir), *flags, "--device", "cpu", hf_cache=hf_cache)
    assert line.startswith(words) and line.endswith("on the CPU use --quantization int8")


def test_kaito_flags_that_disagree_with_quantization_are_refused(tiny_dir, hf_cache) -> None:
    line = refuse("--model_dir", str(tiny_dir), "--load_in_8bit", "--quantization", "int4", hf_cache=hf_cache)
    assert line == "--load_in_8bit and --quantization int4 ask for different weights; give one of them"


def test_the_cpu_warning_counts_the_weights_in_the_dtype_in_force() -> None:
    falcon_40b = VARIANTS["falcon-40b"]
    assert "in float32 need about 154 GiB" in cpu_memory_warning(falcon_40b, "auto", memory_gib=128)
    assert "in bfloat16 need about 77 GiB" in cpu_memory_warning(falcon_40b, "bfloat16", memory_gib=128)
    assert "this machine has 128 GiB" in cpu_memory_warning(falcon_40b, "auto", memory_gib=128)


def test_every_flag_of_ours_has_help_and_shows_its_default() -> None:
    ours = argparse.ArgumentParser()
    add_predictor_arguments(ours)
    flags = [action for action in ours._actions if action.dest != "help"]
    assert len(flags) > 15
    assert not [action.dest for action in flags if not (action.help or "").strip()]
    formatter = build_parser().formatter_class("python -m predictor")
    assert not [action.dest for action in flags if "%(default)" not in formatter._get_help_string(action)]


def test_model_name_help_says_what_it_selects_and_names_the_demo() -> None:
    model_name = build_parser()._option_string_actions["--model_name"].help
    assert "--model_name MODEL_NAME" in build_parser().format_help()
    assert all(name in model_name for name in VARIANTS)
    assert "--model_dir" in model_name and DEMO_MODEL_NAME in model_name


def test_workers_other_than_one_are_refused_not_ignored() -> None:
    with pytest.raises(SystemExit, match="--workers 2: one process serves"):
        parse_config(["--workers", "2"])
    assert parse_config(["--workers", "1"]).model_name == DEMO_MODEL_NAME


def test_kserve_transformer_flags_are_accepted_but_not_in_help() -> None:
    from predictor.config import KSERVE_REFUSED_FLAGS, KSERVE_TRANSFORMER_FLAGS

    help_text = build_parser().format_help()
    for flag in KSERVE_TRANSFORMER_FLAGS + KSERVE_REFUSED_FLAGS:
        assert f"{flag} " not in help_text and f"[{flag}" not in help_text, flag
    parse_config(["--predictor_host", "elsewhere:8080", "--predictor_protocol", "v2"])


def test_every_kserve_flag_in_help_is_in_a_group_of_its_own() -> None:
    """KServe's flags are grouped (server, gRPC, logging) as docs/configuration.md shows them; a flag a new KServe
    version adds lands in argparse's "options" list and fails here until it is placed."""
    parser = build_parser()
    options = [action.option_strings for action in parser._optionals._group_actions
               if action.help != argparse.SUPPRESS]
    assert options == [["-h", "--help"]]


def test_grpc_is_off_by_default_and_its_model_infer_says_where_text_is(start_server, tiny_dir) -> None:
    """With --enable_grpc true, port --grpc_port serves KServe's v2 gRPC health and metadata; ModelInfer carries
    tensors, so it is refused with INVALID_ARGUMENT naming the HTTP route, not an internal error."""
    import asyncio

    import grpc
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    from conftest import free_port

    assert parse_config([]).enable_grpc is False and parse_config([]).grpc_port == 8081
    grpc_port = free_port()
    server = start_server(tiny_dir, "--enable_grpc", "true", "--grpc_port", str(grpc_port))

    async def call() -> tuple[bool, grpc.aio.AioRpcError]:
        client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}")
        ready = await client.is_model_ready(server.model_name)
        prompt = InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"Hello"], dtype=object))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.infer(InferRequest(model_name=server.model_name, infer_inputs=[prompt]))
        return ready, refused.value

    ready, refused = asyncio.run(call())
    assert ready
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "/v2/models/<name>/infer" in refused.details()
