"""Load and faults against a real server process: not ready is a 503, overload is a 429 with Retry-After, a client
that goes away cancels its generation, a request runs within its time budget, a failed generation fails only its own
request, a broken engine turns /health 503, and SIGTERM drains in-flight requests before a clean exit.

One server serves them all, in this order: seen while its model is still loading, then deliberately small (one
running sequence, one waiting request), with faults injectable by ``tests/fault_server.py``; the last test drains
it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

BUDGET_S = 1.0  # --request_timeout of the server here: well under the ~2 s the "long" request below needs on
# this machine, so it always ends on its budget
LONG = {"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 2000, "min_new_tokens": 2000}}
NORMAL = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 2}}
RUNTIME_FAULT, OOM_FAULT, DEVICE_LOST = "<<fault:runtime>>", "<<fault:oom>>", "<<fault:device-lost>>"  # see
# tests/fault_server.py
FAULT_SECRET = "injected-fault-detail-that-must-not-reach-clients"


@pytest.fixture(scope="module")
def launched(start_server, tiny_dir, tmp_path_factory):
    """One running sequence and one waiting request at most; faults injectable; its model loads only once the
    ``release`` file exists; drained by the last test."""
    release = tmp_path_factory.mktemp("hold-load") / "release"
    process = start_server(tiny_dir, "--max_queue", "1", "--max_batch_size", "1", "--request_timeout", str(BUDGET_S),
                           module="tests.fault_server", env={"FAULT_SERVER_HOLD_LOAD": str(release)}, wait=False)
    yield process, release
    process.stop()


@pytest.fixture(scope="module")
def while_loading(launched) -> dict[str, httpx.Response]:
    """What the server answered once its port was open but before its model was loaded."""
    process, release = launched
    deadline = time.monotonic() + 120
    while True:
        assert process.process.poll() is None, process.log()[-3000:]
        assert time.monotonic() < deadline, "the port never opened"
        try:
            health = httpx.get(f"{process.url}/health", timeout=5)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    answers = {
        "health": health,
        "chat": chat(process, NORMAL),
        "predict": httpx.post(f"{process.url}/v1/models/{process.model_name}:predict", json=NORMAL, timeout=30),
        "readiness": httpx.get(f"{process.url}/v1/models/{process.model_name}", timeout=10),
    }
    release.touch()
    return answers


@pytest.fixture(scope="module")
def server(launched, while_loading):
    process, _ = launched
    process.wait_ready()
    return process


def chat(server, payload: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", json=payload, timeout=timeout)


def metric(server, sample_name: str, **labels: str) -> float:
    """A sample's value from the server's Prometheus /metrics (0 before it is first set)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def requests_total(server, outcome: str) -> float:
    return metric(server, "falcon_requests_total", route="/chat", outcome=outcome)


def assert_no_traceback(response: httpx.Response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text


def assert_serves(server) -> None:
    response = chat(server, NORMAL)
    assert response.status_code == 200, response.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_not_ready_while_loading(while_loading) -> None:
    """The port opens before the model loads: probes and clients get 503, not a refused connection or a 500."""
    health = while_loading["health"]
    assert health.status_code == 503 and health.json() == {"status": "Loading"}, health.text
    refused = while_loading["chat"]
    assert_no_traceback(refused)
    assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready", refused.text
    assert while_loading["predict"].status_code == 503, while_loading["predict"].text
    assert while_loading["readiness"].status_code == 503


# -- limits and load --------------------------------------------------------------------------------------------

def test_request_time_budget_stops_generation(server) -> None:
    started = time.monotonic()
    response = chat(server, LONG)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["finish_reasons"] == ["time_limit"], details
    assert 0 < details["generated_tokens"][0] < 2000
    assert elapsed < BUDGET_S + 20, elapsed


def test_overload_gives_429_with_retry_after_and_no_server_error(server) -> None:
    """One sequence runs, one request waits; the others are refused at once instead of piling up. The one waiting
    may spend its whole budget waiting (the running one uses as much): then it gets 504, not a 500."""
    overloaded_before = requests_total(server, "overloaded")

    async def fire(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{server.url}/chat", json=LONG) for _ in range(n)))

    responses = asyncio.run(fire(8))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 504}, [r.text for r in responses if r.status_code >= 500]
    for response in responses:
        if response.status_code == 504:
            assert response.json()["error_type"] == "request_timeout", response.text
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) >= 4, statuses  # at most one running and one waiting (plus one that slipped in early)
    for response in refused:
        assert_no_traceback(response)
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error_type"] == "overloaded"
    for response in responses:
        if response.status_code == 200:
            assert response.json()["details"]["finish_reasons"] == ["time_limit"]
    assert requests_total(server, "overloaded") - overloaded_before == len(refused)
    assert_serves(server)


def test_client_disconnect_cancels_generation(server) -> None:
    """A client that closes its connection frees its batch slot: with one slot, the next request starts at once
    instead of waiting for the abandoned generation's time budget."""
    cancelled_before = requests_total(server, "cancelled")
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)  # generating by now; well inside its budget
    deadline = time.monotonic() + 10
    while requests_total(server, "cancelled") == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_total(server, "cancelled") == cancelled_before + 1
    queued_before = metric(server, "falcon_queue_seconds_sum")
    count_before = metric(server, "falcon_queue_seconds_count")
    assert chat(server, NORMAL).status_code == 200
    assert metric(server, "falcon_queue_seconds_count") == count_before + 1
    waited = metric(server, "falcon_queue_seconds_sum") - queued_before
    assert waited < 0.5, f"the next request waited {waited:.2f}s for the slot: the abandoned generation ran on"


# -- faults --------------------------------------------------------------------------------------------------------

def assert_generation_failed(response: httpx.Response) -> dict:
    assert_no_traceback(response)
    assert FAULT_SECRET not in response.text, "internal exception details reached the client"
    assert 500 <= response.status_code < 600, response.text
    body = response.json()
    assert body["error_type"] == "generation_failed", body
    return body


@pytest.mark.parametrize("marker", [RUNTIME_FAULT, OOM_FAULT], ids=["runtime-error", "out-of-memory"])
def test_failed_generation_fails_only_its_request(server, marker: str) -> None:
    failed_before = requests_total(server, "failed")
    body = assert_generation_failed(chat(server, {"prompt": f"Hello {marker}",
                                                        "generate_kwargs": {"max_new_tokens": 4}}))
    if marker == OOM_FAULT:
        assert "memory" in body["detail"]
    assert requests_total(server, "failed") == failed_before + 1
    assert_serves(server)


def test_failed_beam_search_fails_only_its_request(server) -> None:
    beams = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    assert_generation_failed(chat(server, {"prompt": f"Hello {RUNTIME_FAULT}", "generate_kwargs": beams}))
    response = chat(server, {"prompt": "Hello", "generate_kwargs": beams})
    assert response.status_code == 200, response.text
    assert_serves(server)


def test_repeated_failures_turn_health_503(server) -> None:
    """Three failed steps in a row mean the device is likely gone: /health (readiness) says so, liveness stays."""
    for _ in range(3):
        assert_generation_failed(chat(server, {"prompt": f"Hello {RUNTIME_FAULT}",
                                                     "generate_kwargs": {"max_new_tokens": 4}}))
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json() == {"status": "Unhealthy"}
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    livez = httpx.get(f"{server.url}/livez", timeout=10)  # broken for less than --dead_after: no restart yet
    assert livez.status_code == 200 and livez.json() == {"status": "Alive"}
    assert server.process.poll() is None
    assert_serves(server)  # a step that works again clears the failure count


def test_a_lost_device_fails_liveness_after_dead_after(start_server, tiny_dir) -> None:
    """An engine that fails every step and every self-check stays unready, and after --dead_after seconds
    liveness fails too, so Kubernetes restarts the pod instead of leaving it unready for good."""
    lost = start_server(tiny_dir, "--dead_after", "1", module="tests.fault_server")
    for prompt in (f"Hello {DEVICE_LOST}", "Hello", "Hello"):
        assert_generation_failed(chat(lost, {"prompt": prompt, "generate_kwargs": {"max_new_tokens": 4}}))
    assert httpx.get(f"{lost.url}/health", timeout=10).status_code == 503
    deadline = time.monotonic() + 30
    livez = httpx.get(f"{lost.url}/livez", timeout=10)
    while livez.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        livez = httpx.get(f"{lost.url}/livez", timeout=10)
    assert livez.status_code == 503 and livez.json()["status"] == "Dead"
    lost.stop()


# -- drain -----------------------------------------------------------------------------------------------------------

def test_sigterm_drains_in_flight_requests_then_exits_0(server) -> None:
    in_flight: dict[str, Any] = {}

    def run_long() -> None:
        in_flight["response"] = chat(server, LONG)

    thread = threading.Thread(target=run_long)
    thread.start()
    time.sleep(0.3)  # generating by now
    assert thread.is_alive(), "the in-flight request ended before SIGTERM"
    server.process.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()

    deadline = signalled_at + 2
    health = httpx.get(f"{server.url}/health", timeout=10)
    while health.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
        health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json() == {"status": "Draining"}, health.text
    assert httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=10).status_code == 503
    assert thread.is_alive(), "the in-flight request ended before the new one could be refused"
    refused = chat(server, NORMAL)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error_type"] == "draining"
    predict = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=NORMAL, timeout=10)
    assert predict.status_code == 503, predict.text

    thread.join(timeout=60)
    response = in_flight["response"]
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"][0] > 0
    assert server.process.wait(timeout=60) == 0, server.log()[-3000:]
