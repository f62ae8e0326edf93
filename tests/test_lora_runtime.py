"""Adapters loaded and unloaded at run time (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter): only with
--runtime_lora_updating, behind --api_key, only from under --lora_root; a bad adapter is a 400 that leaves the served
ones as they were; unloading lets the requests using the adapter finish."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from lora_adapters import greedy, make_adapter, peft_model

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
N = 6


@pytest.fixture(scope="module")
def runtime(tiny_dirs, tmp_path_factory, start_server):
    base = tiny_dirs["7b"]
    root = tmp_path_factory.mktemp("lora-root")
    outside = tmp_path_factory.mktemp("elsewhere")
    make_adapter(base, root / "qkv", seed=11)
    make_adapter(base, root / "big", r=32, lora_alpha=32, seed=12)
    make_adapter(base, outside / "qkv", seed=11)
    server = start_server(base, "--runtime_lora_updating", "--lora_root", str(root), "--api_key", KEY,
                          "--adapter_dir", str(tmp_path_factory.mktemp("empty-adapter-dir")))
    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = greedy(peft_model(base, {"qkv": root / "qkv"}), tokenizer("Hello there")["input_ids"], N)
    return server, root, outside, expected


def post(server, path, body, headers=AUTH, timeout=60):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def ids(server, model, max_tokens=N):
    response = post(server, "/v1/completions", {"model": model, "prompt": "Hello there", "max_tokens": max_tokens,
                                                 "ignore_eos": True, "temperature": 0, "logprobs": 0,
                                                 "return_tokens_as_token_ids": True}, timeout=120)
    return response, ([int(t.split(":")[1]) for t in response.json()["choices"][0]["logprobs"]["tokens"]]
                      if response.status_code == 200 else None)


def test_load_serve_refuse_and_unload(runtime):
    server, root, outside, expected = runtime
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "qkv", "lora_path": str(root / "qkv")},
                headers={}).status_code == 401
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "qkv", "lora_path": str(root / "qkv")})
    assert loaded.status_code == 200 and "qkv" in loaded.text
    assert ids(server, "qkv")[1] == expected
    assert "qkv" in httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["models"]

    far = post(server, "/v1/load_lora_adapter", {"lora_name": "far", "lora_path": str(outside / "qkv")})
    assert far.status_code == 403 and "--lora_root" in far.json()["error"]["message"]
    sneaky = post(server, "/v1/load_lora_adapter", {"lora_name": "far", "lora_path": str(root / ".." / "x")})
    assert sneaky.status_code == 403
    big = post(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(root / "big")})
    assert big.status_code == 400 and "adapter big: rank 32 is above --max_lora_rank 16" in big.text
    missing = post(server, "/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(root / "gone")})
    assert missing.status_code == 400 and "adapter gone:" in missing.text
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "qkv", "lora_path": str(root / "qkv")})
    assert again.status_code == 400 and "already served" in again.text
    assert ids(server, "qkv")[1] == expected  # the refusals left it as it was

    results = {}
    long_run = threading.Thread(target=lambda: results.update(long=ids(server, "qkv", max_tokens=300)))
    long_run.start()
    deadline = time.monotonic() + 60
    while "falcon_running_sequences 1.0" not in httpx.get(f"{server.url}/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the long request never ran"
        time.sleep(0.05)
    unloaded = post(server, "/v1/unload_lora_adapter", {"lora_name": "qkv"})
    assert unloaded.status_code == 200
    long_run.join(120)
    response, tokens = results["long"]
    assert response.status_code == 200 and len(tokens) == 300 and tokens[:N] == expected
    assert ids(server, "qkv")[0].status_code == 404
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "qkv"}).status_code == 404


def test_the_routes_are_off_by_default(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/load_lora_adapter", timeout=10,
                          json={"lora_name": "a", "lora_path": "/mnt/adapter/a"})
    assert response.status_code == 404
