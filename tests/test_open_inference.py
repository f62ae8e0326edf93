"""Text generation on KServe's Open Inference Protocol (``POST /v2/models/<name>/infer``) against a real server: the
texts are /chat's for the same prompts and options, bad bodies are 400s in /chat's error shape (never a 5xx), and
a client that leaves cancels its prompts."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

OPTIONS = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}


def infer_url(server, name: str | None = None) -> str:
    return f"{server.url}/v2/models/{name or server.model_name}/infer"


def tensor(prompts: list, shape: list[int] | None = None, **changes) -> dict:
    return {"name": "text_input", "datatype": "BYTES", "shape": shape or [len(prompts)], "data": prompts, **changes}


def test_prompts_in_a_bytes_tensor_get_chats_texts(tiny_server) -> None:
    prompts = ["Once upon a time", "Hello"]
    response = httpx.post(infer_url(tiny_server), timeout=60,
                          json={"id": "req-1", "inputs": [tensor(prompts)], "parameters": OPTIONS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == tiny_server.model_name and body["id"] == "req-1"
    [output] = body["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES" and output["shape"] == [2]
    for prompt, text, reasons in zip(prompts, output["data"], body["parameters"]["finish_reasons"], strict=True):
        chat = httpx.post(f"{tiny_server.url}/chat", timeout=60, json={
            "prompt": prompt, "return_full_text": False, "generate_kwargs": {"max_new_tokens": 6, "do_sample": False}})
        assert chat.json()["Result"] == text
        assert chat.json()["details"]["finish_reasons"] == reasons


def test_several_sequences_per_prompt_make_a_2d_tensor(tiny_server) -> None:
    response = httpx.post(infer_url(tiny_server), timeout=60, json={
        "inputs": [tensor([["Hi"], ["Yo"]], shape=[2, 1])],
        "parameters": {"max_new_tokens": 3, "num_return_sequences": 2, "seed": 1}})
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["shape"] == [2, 2] and len(output["data"]) == 4


@pytest.mark.parametrize("body, param", [
    (b'{"inputs":[{"name":"\\ud800"}]}', None),  # a lone surrogate: KServe answered 500
    (b"[1, 2]", None),
    ({}, "inputs"),
    ({"inputs": []}, "inputs"),
    ({"inputs": [tensor(["Hi"], datatype="FP32")]}, "inputs.0.datatype"),
    ({"inputs": [tensor([1.5])]}, "inputs.0.data.0"),
    ({"inputs": [tensor(["Hi"], shape=[3])]}, "inputs.0.shape"),
    ({"inputs": [tensor([])]}, "inputs.0.data"),
    ({"inputs": [tensor(["Hi"] * 1000)]}, "inputs.0.data"),
    ({"inputs": [tensor([""])]}, "prompt"),
    ({"inputs": [tensor(["Hi"])], "parameters": {"top_p": 2}}, "generate_kwargs.top_p"),
    ({"inputs": [tensor(["Hi"])], "parameters": {"custom_generate": "x"}}, "generate_kwargs.custom_generate"),
    ({"inputs": [tensor(["Hi"])], "parameters": {"stream": True}}, "parameters.stream"),
    ({"inputs": [tensor(["Hi"])], "outputs": [{"name": "logits"}]}, "outputs"),
], ids=["surrogate", "not-an-object", "no-inputs", "empty-inputs", "not-bytes", "not-text", "bad-shape",
        "no-prompts", "too-many-prompts", "empty-prompt", "bad-option", "code-option", "stream", "unknown-output"])
def test_a_bad_infer_request_is_a_400_naming_its_fault(tiny_server, body, param) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(infer_url(tiny_server), timeout=60, **kwargs)
    assert response.status_code == 400, f"{response.status_code} {response.text[:300]}"
    error = response.json()
    assert set(error) == {"detail", "error", "error_type", "param", "request_id"}
    if param is not None:
        assert error["param"] == param, error


def test_another_models_name_is_a_404(tiny_server) -> None:
    response = httpx.post(infer_url(tiny_server, "other"), json={"inputs": [tensor(["Hi"])]}, timeout=30)
    assert response.status_code == 404 and response.json()["error_type"] == "model_not_found"


def requests_total(server, outcome: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "falcon_requests_total" and sample.labels == {
                    "route": "/v2/models/{name}/infer", "outcome": outcome}:
                return sample.value
    return 0.0


def test_a_client_that_leaves_cancels_its_prompts(tiny_server) -> None:
    before = requests_total(tiny_server, "cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(infer_url(tiny_server), timeout=0.5, json={
            "inputs": [tensor(["Once", "Twice"])], "parameters": {"max_new_tokens": 2000, "min_new_tokens": 2000}})
    deadline = time.monotonic() + 30
    while requests_total(tiny_server, "cancelled") == before:
        assert time.monotonic() < deadline, "the infer request whose client left was not cancelled"
        time.sleep(0.1)
