"""Security against real servers: no request field can make the server load a file, model, revision or code; the
API key guards every inference route and nothing else; prompts stay out of the logs unless asked for; and no route
lets a client unload or load the served model.

One server of our own, with ``--api_key`` and ``--log_prompts``; default logging is checked on the shared
``tiny_server``.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

API_KEY = f"key-{secrets.token_hex(8)}"  # unique, so the log check below cannot match anything else
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NORMAL = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 2}}

# generate() options that load code, models or objects, or reach outside the request; and names that would
# choose what to load. None of them is a field of /chat.
LOADING_GENERATE_KWARGS = {
    "custom_generate": "transformers-community/group-beam-search",
    "trust_remote_code": True,
    "assistant_model": "tiiuae/falcon-40b",
    "assistant_tokenizer": "tiiuae/falcon-40b",
    "tokenizer": "/etc/passwd",
    "model": "tiiuae/falcon-40b",
    "revision": "main",
    "cache_dir": "/tmp",
    "generation_config": {"custom_generate": "x"},
    "streamer": "x",
    "logits_processor": ["x"],
    "stopping_criteria": ["x"],
    "prefix_allowed_tokens_fn": "os.system",
    "prompt_lookup_num_tokens": 10,
    "cache_implementation": "offloaded",
    "past_key_values": [[1]],
    "synced_gpus": True,
    "watermarking_config": {"greenlist_ratio": 0.5},
}
LOADING_TOP_LEVEL = {
    "model_id": "tiiuae/falcon-40b", "model_dir": "/mnt/models", "revision": "main",
    "trust_remote_code": True, "cache_dir": "/tmp", "adapter": "lora/evil", "custom_generate": "x",
    "tokenizer": "/etc/passwd", "load_in_8bit": True, "device": "cuda:1",
}


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_dir):
    server = start_server(tiny_dir, "--api_key", API_KEY, "--log_prompts")
    yield server
    server.stop()


def predict_path(server) -> str:
    return f"/v1/models/{server.model_name}:predict"


# -- nothing in a request chooses what to load ----------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(LOADING_GENERATE_KWARGS))
def test_generate_kwargs_cannot_name_code_or_models_to_load(tiny_server, key: str) -> None:
    payload = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 2, key: LOADING_GENERATE_KWARGS[key]}}
    for path in ("/chat", predict_path(tiny_server)):
        response = httpx.post(tiny_server.url + path, json=payload, timeout=30)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error_type"] == "unknown_parameter" and body["param"] == f"generate_kwargs.{key}", body


@pytest.mark.parametrize("key", sorted(LOADING_TOP_LEVEL))
def test_top_level_fields_cannot_name_code_or_models_to_load(tiny_server, key: str) -> None:
    payload = {**NORMAL, key: LOADING_TOP_LEVEL[key]}
    for path in ("/chat", predict_path(tiny_server)):
        response = httpx.post(tiny_server.url + path, json=payload, timeout=30)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error_type"] == "unknown_parameter" and body["param"] == key, body


def test_the_model_field_only_chooses_among_what_is_served(tiny_server) -> None:
    """``model`` names the served model or one of its adapters; any other name, a Hub id included, is a 404 and
    loads nothing."""
    for path in ("/chat", predict_path(tiny_server)):
        response = httpx.post(tiny_server.url + path, json={**NORMAL, "model": "tiiuae/falcon-40b"}, timeout=30)
        assert response.status_code == 404, response.text
        assert response.json()["error_type"] == "model_not_found"


# -- the API key -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": API_KEY},
    {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer"}, {"X-API-Key": API_KEY},
], ids=["none", "wrong", "longer", "no-scheme", "basic", "empty", "other-header"])
def test_inference_routes_need_the_key(keyed_server, headers: dict[str, str]) -> None:
    url = keyed_server.url
    for method, path in (("POST", "/chat"), ("POST", predict_path(keyed_server)),
                         ("POST", f"/v1/models/{keyed_server.model_name}%3Apredict"),
                         ("POST", f"/v2/models/{keyed_server.model_name}/infer"),
                         ("POST", "/openai/v1/completions"), ("POST", "/openai/v1/chat/completions"),
                         ("POST", f"/v2/repository/models/{keyed_server.model_name}/unload"),
                         ("POST", f"/v2/repository/models/{keyed_server.model_name}/load")):
        response = httpx.request(method, url + path, json=NORMAL, headers=headers, timeout=30)
        assert response.status_code == 401, f"{method} {path}: {response.status_code} {response.text[:200]}"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        if path.startswith("/openai/"):  # OpenAI clients read OpenAI's error shape
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "authentication_error", error
        else:
            assert response.json()["error_type"] == "unauthorized"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # nothing above reached the model


def test_unauthenticated_body_is_not_read(keyed_server) -> None:
    """Auth comes first: a large unauthenticated body is refused with 401, not 413 or a parse error."""
    response = httpx.post(f"{keyed_server.url}/chat", content=b"{" * (3 * 1024 * 1024), timeout=60)
    assert response.status_code == 401, response.text[:200]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_the_key_opens_inference_routes(keyed_server, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {API_KEY}"}
    for path in ("/chat", predict_path(keyed_server)):
        response = httpx.post(keyed_server.url + path, json=NORMAL, headers=headers, timeout=60)
        assert response.status_code == 200, f"{path}: {response.text}"
        assert isinstance(response.json()["Result"], str)


def test_probes_and_metrics_stay_open(keyed_server) -> None:
    url, name = keyed_server.url, keyed_server.model_name
    for path in ("/health", "/healthz", "/metrics", f"/v1/models/{name}", f"/v2/models/{name}/ready",
                 "/v2/health/live", "/v2/health/ready", "/livez"):
        response = httpx.get(url + path, timeout=10)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
    assert "falcon_requests_total" in httpx.get(f"{url}/metrics", timeout=10).text


def test_the_key_is_not_logged(keyed_server) -> None:
    httpx.post(f"{keyed_server.url}/chat", json=NORMAL, headers=AUTH, timeout=60)
    httpx.post(f"{keyed_server.url}/chat", json=NORMAL, headers={"Authorization": f"Bearer {API_KEY}-wrong"})
    assert API_KEY not in keyed_server.log()


# -- prompts in the logs -------------------------------------------------------------------------------------------

def unique_prompt(tag: str) -> str:
    return f"{tag} {secrets.token_hex(6)} private"


def wait_for_log(server, needle: str, present: bool, deadline_s: float = 5) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if (needle in server.log()) == present:
            return True
        time.sleep(0.1)
    return False


def test_prompts_are_not_logged_by_default(tiny_server) -> None:
    served, refused, failed, nul = (unique_prompt(tag) for tag in ("served", "refused", "failed", "nul"))
    url = tiny_server.url
    assert httpx.post(f"{url}/chat", json={**NORMAL, "prompt": served}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/chat", json={"prompt": refused, "generate_kwargs": {"top_p": 0}},
                      timeout=60).status_code == 400
    assert httpx.post(f"{url}{predict_path(tiny_server)}", timeout=60, json={
        "prompt": failed, "generate_kwargs": {"max_new_tokens": 1, "frequency_penalty": 1}}).status_code == 400
    # the prompt itself is the field at fault, so the error message quotes it back to the client
    assert httpx.post(f"{url}/chat", json={**NORMAL, "prompt": nul + "\x00"}, timeout=60).status_code == 400
    time.sleep(0.5)  # let the log catch up
    log = tiny_server.log()
    for prompt in (served, refused, failed, nul):
        assert prompt.split()[1] not in log, f"the prompt {prompt!r} is in the server log"


def test_prompts_are_logged_with_log_prompts(keyed_server) -> None:
    prompt = unique_prompt("logged")
    assert httpx.post(f"{keyed_server.url}/chat", json={**NORMAL, "prompt": prompt}, headers=AUTH,
                      timeout=60).status_code == 200
    assert wait_for_log(keyed_server, prompt, present=True), "--log_prompts did not log the prompt"


# -- the served model cannot be unloaded or replaced by a client ------------------------------------------------

def test_no_route_unloads_or_loads_the_model(keyed_server) -> None:
    """KServe registers v2 model-repository routes (load/unload). Unloading stops the batcher for good, so no
    client may reach them: without --api_key (the default) they are open to anyone, and an inference key is not
    an operator's. (Runs last here: when it fails, this server is left without a model.)"""
    name = keyed_server.model_name
    for action in ("unload", "load"):
        response = httpx.post(f"{keyed_server.url}/v2/repository/models/{name}/{action}", headers=AUTH, timeout=30)
        assert 400 <= response.status_code < 500, f"{action}: {response.status_code} {response.text[:200]}"
    health = httpx.get(f"{keyed_server.url}/health", timeout=10)
    assert health.status_code == 200, health.text
    assert httpx.post(f"{keyed_server.url}/chat", json=NORMAL, headers=AUTH, timeout=60).status_code == 200
