"""What clients of the replaced service and careless clients meet, and what the log says about them.

Each test speaks HTTP to a real server process; the log checks read that process's output.
"""

from __future__ import annotations

import time

import httpx
import pytest

ERROR_KEYS = {"detail", "error", "error_type", "request_id"}
NORMAL = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def quiet_server(start_server, tiny_dir):
    """A server of its own, so that its log holds only what these tests did (default flags)."""
    return start_server(tiny_dir, model_name="tiny-falcon-logs")


@pytest.fixture(scope="module")
def logging_server(start_server, tiny_dir):
    return start_server(tiny_dir, "--log_requests", model_name="tiny-falcon-log-requests")


def assert_error_shape(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert ERROR_KEYS <= set(body) and body["error_type"] == error_type, body
    assert body["detail"] == body["error"] and body["detail"]
    return body


def wait_for_log(server, text: str, deadline_s: float = 10) -> str:
    deadline = time.monotonic() + deadline_s
    while text not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.log()


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models/x"), ("GET", "/v2/models/x/ready"), ("GET", "/v2/models/x"),
    ("POST", "/v1/models/x:predict"), ("POST", "/v2/models/x/infer"),
])
def test_an_unknown_model_is_a_404_in_the_error_shape(quiet_server, method: str, path: str) -> None:
    response = httpx.request(method, quiet_server.url + path, json=NORMAL, timeout=10)
    body = assert_error_shape(response, 404, "model_not_found")
    assert "x" in body["detail"] and quiet_server.model_name in body["detail"]


def test_unknown_routes_and_methods_in_the_error_shape(quiet_server) -> None:
    body = assert_error_shape(httpx.get(f"{quiet_server.url}/no/such/route", timeout=10), 404, "not_found")
    assert "/no/such/route" in body["detail"]
    response = httpx.delete(f"{quiet_server.url}/chat", timeout=10)
    body = assert_error_shape(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST" and "accepts POST" in body["detail"]


def test_client_mistakes_leave_no_traceback_and_no_error_in_the_log(quiet_server) -> None:
    for path in ("/v1/models/x", "/v2/models/x/ready", "/v2/models/nope", "/nowhere"):
        httpx.get(quiet_server.url + path, timeout=10)
    httpx.post(f"{quiet_server.url}/v1/models/x:predict", json=NORMAL, timeout=10)
    httpx.post(f"{quiet_server.url}/chat", content=b'{"prompt": "a", "prompt": "b"}', timeout=10)
    assert httpx.post(f"{quiet_server.url}/chat", json=NORMAL, timeout=30).status_code == 200
    log = quiet_server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_start_up_says_nothing_untrue_about_the_openai_routes(quiet_server) -> None:
    log = quiet_server.log()
    assert "Uvicorn running" in log and "OpenAI endpoints not registered" not in log
    assert httpx.get(f"{quiet_server.url}/openai/v1/models", timeout=10).status_code == 200


def test_per_request_lines_only_with_log_requests(quiet_server, logging_server) -> None:
    for server in (quiet_server, logging_server):
        assert httpx.post(f"{server.url}/chat", json=NORMAL, timeout=30).status_code == 200
    assert '"POST /chat HTTP/1.1" 200' in wait_for_log(logging_server, '"POST /chat HTTP/1.1" 200')
    assert "kserve.trace" in logging_server.log()
    time.sleep(0.5)  # what the logging server wrote by now, the quiet one would have too
    quiet = quiet_server.log()
    assert '"POST /chat HTTP/1.1"' not in quiet and "kserve.trace" not in quiet


def test_root_answers_kserve_and_the_replaced_service(quiet_server) -> None:
    response = httpx.get(f"{quiet_server.url}/", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "alive", "message": "Server is running"}


@pytest.mark.parametrize("body, key", [
    (b'{"prompt": "a", "prompt": "b"}', "prompt"),
    (b'{"prompt": "a", "generate_kwargs": {"max_new_tokens": 2, "max_new_tokens": 3}}', "max_new_tokens"),
])
@pytest.mark.parametrize("route", ["/chat", "predict"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_a_duplicate_key_is_refused_by_name(quiet_server, body: bytes, key: str, route: str,
                                           content_type: str) -> None:
    path = f"/v1/models/{quiet_server.model_name}:predict" if route == "predict" else route
    response = httpx.post(quiet_server.url + path, content=body, headers={"Content-Type": content_type},
                          timeout=10)
    error = assert_error_shape(response, 400, "invalid_request")
    assert error["param"] == key and f"'{key}' appears twice" in error["detail"]


def test_the_same_key_in_different_objects_is_no_duplicate(quiet_server) -> None:
    body = b'{"prompt": "a", "seed": 1, "generate_kwargs": {"max_new_tokens": 2, "seed": 1}}'
    response = httpx.post(f"{quiet_server.url}/chat", content=body, timeout=10)
    # generate_kwargs has no seed: refused for that, by its own name, not as a duplicate.
    assert_error_shape(response, 400, "unknown_parameter")
    assert response.json()["param"] == "generate_kwargs.seed"


def test_stream_on_kserve_predict_streams_like_chat(quiet_server) -> None:
    url = f"{quiet_server.url}/v1/models/{quiet_server.model_name}:predict"
    with httpx.stream("POST", url, json={**NORMAL, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"Result"' in events[-2]


def test_probes_while_loading_get_503_in_the_error_shape_and_leave_no_traceback(start_server, tiny_dir,
                                                                                tmp_path) -> None:
    """Kubernetes probes the readiness routes every few seconds while a large model loads, for minutes."""
    server = start_server(tiny_dir, module="tests.fault_server", model_name="tiny-falcon-loading", wait=False,
                          env={"FAULT_SERVER_HOLD_LOAD": str(tmp_path / "never-released")})
    deadline = time.monotonic() + 60
    while "Uvicorn running" not in server.log():
        assert time.monotonic() < deadline and server.process.poll() is None, server.log()[-3000:]
        time.sleep(0.1)
    name = server.model_name
    for method, path in (("GET", f"/v1/models/{name}"), ("GET", f"/v2/models/{name}/ready"),
                         ("POST", f"/v1/models/{name}:predict")):
        response = httpx.request(method, server.url + path, json=NORMAL, timeout=10)
        assert_error_shape(response, 503, "not_ready")
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
