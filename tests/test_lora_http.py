"""Per-request LoRA adapters over HTTP, against PEFT on both tiny Falcon layouts: each adapter chosen on every
route that selects one (OpenAI's ``model``, /chat's ``model``, KServe's :predict and v2 infer), base and adapters
concurrently, the model cards, and a 404 in each route's shape for an unknown name."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from lora_adapters import ALL_TARGETS, greedy, make_adapter, peft_model

PROMPTS = ["Return the value of", "The quick brown fox"]
N = 6
ADAPTERS = {"qkv": {"r": 8, "lora_alpha": 8, "seed": 1},
            "all": {"r": 16, "lora_alpha": 16, "targets": ALL_TARGETS, "seed": 2},
            "mlp": {"r": 4, "lora_alpha": 8, "targets": ("dense_h_to_4h", "dense_4h_to_h"), "seed": 3}}


@pytest.fixture(scope="module", params=["7b", "40b"])
def served(request, tiny_dirs, tmp_path_factory, start_server):
    base = tiny_dirs[request.param]
    root = tmp_path_factory.mktemp(f"http-adapters-{request.param}")
    paths = {name: make_adapter(base, root / name, **kwargs) for name, kwargs in ADAPTERS.items()}
    server = start_server(base, "--lora_modules", *(f"{n}={p}" for n, p in paths.items()), "--max_loras", "2",
                          "--adapter_dir", str(root / "none"), model_name=f"tiny-{request.param}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = {}
    for name in (None, *ADAPTERS):
        model = peft_model(base, {name: paths[name]} if name else None)
        expected[name] = [greedy(model, tokenizer(p)["input_ids"], N) for p in PROMPTS]
    texts = {name: [tokenizer.decode(ids, skip_special_tokens=True) for ids in runs] for name, runs in expected.items()}
    return server, expected, texts


def completion_ids(server, model: str, prompt: str) -> list[int]:
    response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": N, "min_tokens": N, "temperature": 0, "logprobs": 0,
        "return_tokens_as_token_ids": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    return [int(token.split(":")[1]) for token in body["choices"][0]["logprobs"]["tokens"]]


KWARGS = {"max_new_tokens": N, "min_new_tokens": N, "do_sample": False}


def test_openai_model_chooses_the_adapter(served):
    server, expected, _ = served
    for name in (None, *ADAPTERS):
        assert [completion_ids(server, name or server.model_name, p) for p in PROMPTS] == expected[name], name
    assert expected["qkv"] != expected[None]


def test_chat_predict_and_v2_choose_the_adapter(served):
    server, _, texts = served
    for name in ADAPTERS:
        for prompt, text in zip(PROMPTS, texts[name]):
            body = {"prompt": prompt, "return_full_text": False, "generate_kwargs": KWARGS}
            chat = httpx.post(f"{server.url}/chat", json={**body, "model": name}, timeout=60)
            assert chat.status_code == 200, chat.text
            assert chat.json()["Result"] == text, name
            predict = httpx.post(f"{server.url}/v1/models/{name}:predict", json=body, timeout=60)
            assert predict.json()["Result"] == text, name
            infer = httpx.post(f"{server.url}/v2/models/{name}/infer", timeout=60, json={
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
                "parameters": {"return_full_text": False, **KWARGS}})
            assert infer.status_code == 200, infer.text
            assert infer.json()["outputs"][0]["data"] == [text] and infer.json()["model_name"] == name


def test_base_and_adapters_concurrently_each_equal_alone(served):
    server, expected, _ = served
    calls = [(name, i) for _ in range(2) for name in (None, *ADAPTERS) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda c: completion_ids(server, c[0] or server.model_name, PROMPTS[c[1]]), calls))
    for (name, i), ids in zip(calls, results):
        assert ids == expected[name][i], (name, i)


def test_several_prompts_and_the_responses_api_choose_the_adapter(served):
    server, expected, _ = served
    response = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "qkv", "prompt": PROMPTS, "max_tokens": N, "min_tokens": N, "temperature": 0, "logprobs": 0,
        "return_tokens_as_token_ids": True})
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    assert [[int(token.split(":")[1]) for token in c["logprobs"]["tokens"]] for c in choices] == expected["qkv"]

    def respond(model: str) -> dict:
        answer = httpx.post(f"{server.url}/v1/responses", timeout=60, json={
            "model": model, "input": PROMPTS[1], "max_output_tokens": N, "temperature": 0})
        assert answer.status_code == 200, answer.text
        return answer.json()

    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "qkv", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": N, "temperature": 0})
    adapted, base = respond("qkv"), respond(server.model_name)
    assert adapted["model"] == "qkv" and base["model"] == server.model_name
    text = adapted["output"][0]["content"][0]["text"]
    assert text == chat.json()["choices"][0]["message"]["content"]
    assert text != base["output"][0]["content"][0]["text"]


def test_model_cards_name_the_adapters_with_their_parent(served):
    server, _, _ = served
    body = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert body["models"] == [server.model_name, *ADAPTERS]
    cards = {card["id"]: card for card in body["data"]}
    assert cards[server.model_name]["parent"] is None and cards[server.model_name]["root"] == server.model_name
    assert all(cards[name]["parent"] == server.model_name for name in ADAPTERS)
    ready = httpx.get(f"{server.url}/v1/models/qkv", timeout=10)
    assert ready.status_code == 200 and ready.json()["parent"] == server.model_name


def test_an_unknown_name_is_a_404_in_each_routes_shape(served):
    server, _, _ = served
    body = {"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 2}}
    openai = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "Hi"}, timeout=10)
    assert openai.status_code == 404 and "nope" in openai.json()["error"]["message"]
    assert openai.json()["error"]["param"] == "model"
    for response in (httpx.post(f"{server.url}/chat", json={**body, "model": "nope"}, timeout=10),
                     httpx.post(f"{server.url}/v1/models/nope:predict", json=body, timeout=10),
                     httpx.post(f"{server.url}/v2/models/nope/infer", timeout=10, json={
                         "inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}]})):
        assert response.status_code == 404, response.text
        assert "nope" in response.json()["detail"] and "qkv" in response.json()["detail"]


def test_beam_search_with_an_adapter_is_refused(served):
    server, _, _ = served
    response = httpx.post(f"{server.url}/chat", timeout=10, json={
        "prompt": "Hi", "model": "qkv", "generate_kwargs": {"num_beams": 2, "max_new_tokens": 2}})
    assert response.status_code == 400 and "LoRA" in response.json()["detail"]


def test_tokenize_accepts_an_adapters_name(served):
    server, _, _ = served
    base = httpx.post(f"{server.url}/tokenize", json={"model": server.model_name, "prompt": "Hello"}, timeout=10)
    adapter = httpx.post(f"{server.url}/tokenize", json={"model": "qkv", "prompt": "Hello"}, timeout=10)
    assert adapter.status_code == 200 and adapter.json()["tokens"] == base.json()["tokens"]


def test_metrics_count_requests_per_adapter_and_name_the_lora_info(served):
    server, _, _ = served
    completion_ids(server, "mlp", PROMPTS[0])
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)}
    counts = {s.labels["adapter"]: s.value for s in families["falcon_lora_requests"].samples
              if s.name == "falcon_lora_requests_total"}
    assert counts["mlp"] >= 1
    [info] = families["falcon_lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}
    assert info.value > 1.7e9  # the time of the update
