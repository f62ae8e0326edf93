"""Hostile and impatient clients against a real server: header floods get 431 without the server's memory growing,
connections stalled in their headers or idle between requests are closed, a :predict whose client leaves stops
generating and is counted, and KServe's v1/v2 routes that serve no text generation answer a 404 naming those
that do, never a 5xx.

SIGTERM with a short drain is in ``test_shutdown.py``, v2 infer in ``test_open_inference.py``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 5
MAX_HEADER_BYTES = 64 * 1024  # the default
LONG = {"prompt": "Once", "generate_kwargs": {"max_new_tokens": 2000, "min_new_tokens": 2000}}


@pytest.fixture(scope="module")
def server(start_server, tiny_dir):
    server = start_server(tiny_dir, "--header_timeout", str(HEADER_TIMEOUT_S),
                          "--timeout-keep-alive", str(KEEP_ALIVE_S))
    yield server
    server.stop()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def read_until_closed(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sends until it closes ``sock``, if it does within ``seconds``; None if it stays open."""
    sock.settimeout(seconds)
    deadline, data = time.monotonic() + seconds, b""
    try:
        while time.monotonic() < deadline:
            if not (piece := sock.recv(65536)):
                return data
            data += piece
    except TimeoutError:
        return None
    except ConnectionResetError:
        return data
    return None


def closed_within(sock: socket.socket, seconds: float) -> bool:
    return read_until_closed(sock, seconds) is not None


def read_response(sock: socket.socket) -> bytes:
    """One whole response (these have a Content-Length) on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def rss_mib(server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def metric(server, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# -- headers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    [("X-Big", "a" * 4 * MAX_HEADER_BYTES)],  # one header too long: refused while it is still coming
    [(f"X-{i}", "b" * 8) for i in range(MAX_HEADER_BYTES // 12)],  # many short ones, a little past the limit
], ids=["one-long-header", "many-headers"])
def test_a_header_flood_gets_431(server, headers) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    with connect(server) as sock:
        try:
            sock.sendall(head + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent
        answer = read_until_closed(sock, 10)
    assert answer is not None, "the connection stayed open after a header flood"
    if answer:  # else the server closed it before its 431 could be read: allowed
        assert status_of(answer) == 431, answer[:300]
        assert b'"error_type":"headers_too_large"' in answer, answer[:300]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_headers_under_the_limit_are_served(server) -> None:
    response = httpx.get(f"{server.url}/health", headers={"X-Fine": "c" * (MAX_HEADER_BYTES // 2)}, timeout=10)
    assert response.status_code == 200, response.text


def test_unfinished_header_floods_do_not_grow_memory(server) -> None:
    """Ten connections at once, each sending 16 MB of one header that never ends (the issue saw +154 MiB): each is
    cut off past the limit, so the server holds at most the limit and a read per connection."""
    before = rss_mib(server)
    chunk = b"d" * (1024 * 1024)
    socks = [connect(server) for _ in range(10)]
    try:
        for sock in socks:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                for _ in range(16):
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server gave up on this one: what it should do
        grown = rss_mib(server) - before
    finally:
        for sock in socks:
            sock.close()
    assert grown < 40, f"the server's memory grew by {grown:.0f} MiB"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_connection_stalled_in_its_headers_is_closed(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert closed_within(sock, HEADER_TIMEOUT_S + 10), "a connection stalled in its headers stayed open"


def test_a_connection_that_sends_nothing_is_closed(server) -> None:
    with connect(server) as sock:
        assert closed_within(sock, HEADER_TIMEOUT_S + 10), "a silent connection stayed open"


def test_a_kept_alive_connection_stalled_in_its_next_headers_is_closed(server) -> None:
    """Data on a kept-alive connection stops uvicorn's keep-alive timer: the header deadline takes over."""
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        sock.sendall(b"GET /hea")
        assert closed_within(sock, KEEP_ALIVE_S + 10), "a connection stalled in its second request stayed open"


def test_an_idle_kept_alive_connection_is_closed_and_a_busy_one_is_not(server) -> None:
    with connect(server) as sock:
        for _ in range(3):  # idle between requests for longer than the header timeout, less than keep-alive's
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_response(sock)) == 200
            time.sleep(HEADER_TIMEOUT_S * 2)
        assert closed_within(sock, KEEP_ALIVE_S + 10), "an idle keep-alive connection stayed open"


# -- :predict ----------------------------------------------------------------------------------------------------------

def test_predict_stops_generating_when_its_client_leaves(server) -> None:
    route = "/v1/models/{name}:predict"
    cancelled, generated = metric(server, "falcon_requests_total", route=route, outcome="cancelled"), metric(
        server, "falcon_request_generation_tokens_sum")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=LONG, timeout=0.5)
    deadline = time.monotonic() + 30
    while metric(server, "falcon_requests_total", route=route, outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the :predict whose client left was not counted as cancelled"
        time.sleep(0.1)
    while metric(server, "falcon_request_generation_tokens_sum") == generated:  # the cancelled generation's tokens
        assert time.monotonic() < deadline, "the cancelled generation never ended"
        time.sleep(0.1)
    spent = metric(server, "falcon_request_generation_tokens_sum") - generated
    assert spent < LONG["generate_kwargs"]["max_new_tokens"], "the generation ran to its end"


def test_predict_is_counted(server) -> None:
    route = "/v1/models/{name}:predict"
    before = {outcome: metric(server, "falcon_requests_total", route=route, outcome=outcome)
              for outcome in ("success", "missing_prompt", "model_not_found")}
    url = f"{server.url}/v1/models/{server.model_name}:predict"
    assert httpx.post(url, json={"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 2}}, timeout=60).is_success
    assert httpx.post(url, json={"prompt": ""}, timeout=60).status_code == 400
    assert httpx.post(f"{server.url}/v1/models/other:predict", json={"prompt": "Hi"}, timeout=60).status_code == 404
    for outcome, count in before.items():
        assert metric(server, "falcon_requests_total", route=route, outcome=outcome) == count + 1, outcome


# -- KServe's routes that serve no generation ------------------------------------------------------------------------

V2_INFER = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hello"]}]}


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v2/models/{m}/versions/1/ready", None),
    ("GET", "/v2/models/{m}/versions/1", None),
    ("GET", "/v2/models/{m}?model_version=1", None),
    ("POST", "/v2/models/{m}/versions/1/infer", V2_INFER),
    ("POST", "/v1/models/{m}:explain", {"prompt": "Hello"}),
], ids=["version-ready", "version-metadata", "version-query", "version-infer", "explain"])
def test_kserve_routes_without_generation_say_where_it_is(server, method: str, path: str, body) -> None:
    url = server.url + path.format(m=server.model_name)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
    response = httpx.request(method, url, timeout=30, **kwargs)
    assert response.status_code == 404, f"{response.status_code} {response.text[:300]}"
    error = response.json()
    assert set(error) >= {"detail", "error", "error_type"}
    if path.endswith("explain"):
        assert "/chat" in error["detail"] and "/infer" in error["detail"], error


def test_kserve_model_routes_still_answer(server) -> None:
    name = server.model_name
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/ready", f"/v1/models/{name}", "/v2/models", "/v1/models"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:200]}"
