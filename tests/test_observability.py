"""Observability against a real server process: the serving metrics after streamed and plain requests on every
route, and each request's id in its response headers, error bodies and log lines (``--log_format json``).

The server is this module's own (JSON logs, prompts logged so that a request writes a log line of its own);
metrics are compared before and after the requests, so other requests do not disturb the counts.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scale_checks import (
    dashboard_queries,
    exported_families,
    load_dashboard,
    series_names,
    unexported,
    with_kv_cache_metrics,
)

from predictor.api.tracing import MAX_REQUEST_ID_LENGTH, request_id_from

MODEL = "tiny-falcon"
TYPES = {
    "falcon_requests": "counter",
    "falcon_waiting_requests": "gauge",
    "falcon_running_requests": "gauge",
    "falcon_running_sequences": "gauge",
    "falcon_time_to_first_token_seconds": "histogram",
    "falcon_time_per_output_token_seconds": "histogram",
    "falcon_e2e_request_latency_seconds": "histogram",
    "falcon_queue_seconds": "histogram",
    "falcon_generation_seconds": "histogram",
    "falcon_request_prompt_tokens": "histogram",
    "falcon_request_generation_tokens": "histogram",
    "falcon_prompt_tokens": "counter",
    "falcon_generation_tokens": "counter",
}


@pytest.fixture(scope="module")
def server(start_server, tiny_dir):
    return start_server(tiny_dir, "--log_format", "json", "--log_prompts", "--log_requests", model_name=MODEL)


def scrape(server) -> dict[str, float]:
    """Every sample of GET /metrics: name{labels} -> value (labels sorted, as ``key=value`` pairs)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def sse(response: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


CHAT = {"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 6, "min_new_tokens": 2}}


def send_mix(url: str) -> tuple[int, int]:
    """Two requests per route, one streamed, one not (beam search on :predict); returns (requests, prompt tokens
    the answers report)."""
    prompt_tokens = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for body in (CHAT, {**CHAT, "stream": True},
                     {**CHAT, "generate_kwargs": {**CHAT["generate_kwargs"], "do_sample": True,
                                                  "num_return_sequences": 2}}):
            response = client.post("/chat", json=body)
            assert response.status_code == 200, response.text
            answer = sse(response)[-1] if body.get("stream") else response.json()
            prompt_tokens += answer["details"]["prompt_tokens"]
        for kwargs in ({}, {"num_beams": 2, "do_sample": False}):
            body = {**CHAT, "generate_kwargs": {**CHAT["generate_kwargs"], **kwargs}}
            response = client.post(f"/v1/models/{MODEL}:predict", json=body)
            assert response.status_code == 200, response.text
            prompt_tokens += response.json()["details"]["prompt_tokens"]
        openai = {"model": MODEL, "max_tokens": 6, "temperature": 0.8, "seed": 1}
        for path, body in (("completions", {**openai, "prompt": "Once upon a time"}),
                           ("chat/completions", {**openai, "messages": [{"role": "user", "content": "Hi"}]})):
            response = client.post(f"/openai/v1/{path}", json=body)
            assert response.status_code == 200, response.text
            prompt_tokens += response.json()["usage"]["prompt_tokens"]
            response = client.post(f"/openai/v1/{path}", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}})
            assert response.status_code == 200, response.text
            prompt_tokens += sse(response)[-1]["usage"]["prompt_tokens"]
    return 9, prompt_tokens


# ---- metrics --------------------------------------------------------------------------------------------------------

def test_each_metric_is_exported_with_its_type(server) -> None:
    families = exported_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert {name: families.get(name) for name in TYPES} == TYPES


def test_every_route_streamed_or_not_feeds_the_request_metrics(server) -> None:
    before = scrape(server)
    requests, prompt_tokens = send_mix(server.url)
    after = scrape(server)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "queue_seconds",
                      "generation_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert delta(after, before, f"falcon_{histogram}_count{{}}") == requests, histogram
    # One beam-search request: its tokens all come at the end, so it has no time per output token.
    assert delta(after, before, "falcon_time_per_output_token_seconds_count{}") == requests - 1
    assert delta(after, before, "falcon_prompt_tokens_total{}") == prompt_tokens
    assert delta(after, before, "falcon_request_prompt_tokens_sum{}") == prompt_tokens
    generated = delta(after, before, "falcon_generation_tokens_total{}")
    assert generated == delta(after, before, "falcon_request_generation_tokens_sum{}")
    assert requests <= generated <= 6 * (requests + 1)  # 1-6 tokens a sequence; one request has 2 sequences
    ttft = delta(after, before, "falcon_time_to_first_token_seconds_sum{}")
    e2e = delta(after, before, "falcon_e2e_request_latency_seconds_sum{}")
    tpot = delta(after, before, "falcon_time_per_output_token_seconds_sum{}")
    assert 0 < ttft < e2e < 60 and 0 < tpot < e2e
    for route in ("/chat", "/openai/v1/completions", "/openai/v1/chat/completions"):
        ok = f"falcon_requests_total{{outcome=success,route={route}}}"
        assert delta(after, before, ok) == (3 if route == "/chat" else 2), route
    idle = {name: after[f"{name}{{}}"] for name in ("falcon_waiting_requests", "falcon_running_requests",
                                                    "falcon_running_sequences")}
    assert idle == dict.fromkeys(idle, 0.0)


def test_running_gauges_count_a_request_while_it_generates(server) -> None:
    body = {"prompt": "Once", "generate_kwargs": {"max_new_tokens": 400, "min_new_tokens": 400,
                                                  "num_return_sequences": 2, "do_sample": True}}
    thread = threading.Thread(target=httpx.post, args=(f"{server.url}/chat",),
                              kwargs={"json": body, "timeout": 120})
    thread.start()
    try:
        # Admitted, the sequences hold rows at once; their tokens count in the KV usage once the first step wrote
        # them, a moment later: a scrape can fall between the two.
        deadline, seen = time.monotonic() + 30, {}
        while time.monotonic() < deadline and not (seen.get("falcon_running_requests{}")
                                                   and seen.get("falcon_kv_cache_usage_ratio{}")):
            seen = scrape(server)
        assert seen["falcon_running_requests{}"] == 1 and seen["falcon_running_sequences{}"] == 2, seen
        assert 0 < seen["falcon_kv_cache_usage_ratio{}"] <= 1, seen  # tokens held / reserved while sequences run
    finally:
        thread.join()
    assert scrape(server)["falcon_running_requests{}"] == 0


def test_the_dashboard_and_overlays_query_what_the_running_server_exports(server) -> None:
    families = with_kv_cache_metrics(exported_families(httpx.get(f"{server.url}/metrics", timeout=10).text))
    assert unexported(dashboard_queries(load_dashboard()), series_names(families)) == []


# ---- request ids ----------------------------------------------------------------------------------------------------

def log_lines(server) -> list[dict[str, Any]]:
    """The server's JSON log lines (each must be one JSON object)."""
    lines = [line for line in server.log().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def test_a_client_request_id_comes_back_and_names_every_log_line_of_the_request(server) -> None:
    response = httpx.post(f"{server.url}/chat", json=CHAT, headers={"X-Request-ID": "trace-7f3a"}, timeout=60)
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-7f3a"
    time.sleep(0.2)  # the access line is written as the response goes out
    mine = [line for line in log_lines(server) if line["request_id"] == "trace-7f3a"]
    loggers = {line["logger"] for line in mine}
    assert "uvicorn.access" in loggers and any(line["message"].startswith("prompt: ") for line in mine), mine
    assert all(set(line) >= {"time", "level", "logger", "request_id", "message"} for line in mine)


def test_a_request_without_an_id_gets_a_new_one_in_the_header_and_the_error_body(server) -> None:
    first = httpx.post(f"{server.url}/chat", json={"prompt": ""}, timeout=30)
    second = httpx.post(f"{server.url}/chat", json={"prompt": ""}, timeout=30)
    assert first.status_code == 400
    ids = [r.headers["x-request-id"] for r in (first, second)]
    assert ids[0] != ids[1] and all(len(i) == 32 for i in ids)
    assert first.json()["request_id"] == ids[0]


def test_openai_errors_and_refusals_before_the_route_carry_the_id(server) -> None:
    response = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "nope", "prompt": "x"},
                          headers={"X-Request-ID": "oa-1"}, timeout=30)
    assert response.status_code == 404 and response.json()["request_id"] == "oa-1"
    assert response.headers["x-request-id"] == "oa-1"
    too_large = httpx.post(f"{server.url}/chat", content=b"x" * (3 * 1024 * 1024), headers={"X-Request-ID": "big"},
                           timeout=30)
    assert too_large.status_code == 413 and too_large.json()["request_id"] == "big"


def test_a_hostile_request_id_is_bounded_and_sanitised(server) -> None:
    hostile = "a\u00e9b c\"}{\\" + "x" * 500
    response = httpx.post(f"{server.url}/chat", json={"prompt": ""}, timeout=30,
                          headers={"X-Request-ID": hostile.encode("utf-8")})
    sent_back = response.headers["x-request-id"]
    assert sent_back == request_id_from(hostile.encode("utf-8")) and len(sent_back) <= MAX_REQUEST_ID_LENGTH
    assert set(sent_back) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:")
    assert response.json()["request_id"] == sent_back


def test_request_id_from_keeps_safe_ids_and_replaces_the_rest() -> None:
    assert request_id_from(b"abc-123_X.y:z") == "abc-123_X.y:z"
    assert request_id_from(b"a\nb") == "a_b"
    assert request_id_from(b"x" * 1000) == "x" * MAX_REQUEST_ID_LENGTH
    assert len(request_id_from(None)) == 32 and len(request_id_from(b"\n\n")) == 32 and request_id_from(b"_") != "_"
