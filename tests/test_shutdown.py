"""SIGTERM with a short ``--drain_timeout`` against a real server busy with long requests on every route: at the
drain timeout they end with their text so far and finish_reason "shutdown" (streams with their final event and
``[DONE]``), and the process exits 0 soon after, its generation threads stopped (no SIGABRT)."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictor.config import SHUTDOWN_AFTER_DRAIN_S

DRAIN_S = 2.0
TOKENS = 2000  # far more than this machine generates in DRAIN_S for six requests at once
LONG = {"prompt": "Once", "generate_kwargs": {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS}}


@pytest.fixture(scope="module")
def server(start_server, tiny_dir):
    server = start_server(tiny_dir, "--drain_timeout", str(DRAIN_S), "--request_timeout", "600")
    yield server
    server.stop()


def requests_for(model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    openai = {"model": model, "max_tokens": TOKENS, "stream": True, "temperature": 0}  # greedy, from
    # prompts whose greedy continuations on the tiny Falcon do not end (eos, or chat's stop) within TOKENS
    return {
        "chat": ("/chat", LONG),
        "chat-stream": ("/chat", {**LONG, "stream": True}),
        "chat-beams": ("/chat", {**LONG, "generate_kwargs": {**LONG["generate_kwargs"], "num_beams": 2}}),
        "predict": (f"/v1/models/{model}:predict", LONG),
        "completions-stream": ("/openai/v1/completions", {**openai, "prompt": "Once"}),
        "chat-completions-stream": ("/openai/v1/chat/completions",
                                    {**openai, "messages": [{"role": "user", "content": "Tell me a story"}]}),
    }


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The JSON answer, or for a stream its payloads (the [DONE] marker included, as a string)."""
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        if not response.headers["content-type"].startswith("text/event-stream"):
            response.read()
            return {"status": response.status_code, "json": response.json()}
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return {"status": response.status_code, "events": [item if item == "[DONE]" else json.loads(item)
                                                       for item in data]}


def running_sequences(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "falcon_running_sequences")


def test_sigterm_ends_every_request_at_the_drain_timeout_and_exits_0(server) -> None:
    answers: dict[str, dict[str, Any]] = {}
    threads = [threading.Thread(target=lambda k=key, p=path, b=body: answers.__setitem__(k, post(server.url + p, b)))
               for key, (path, body) in requests_for(server.model_name).items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while running_sequences(server) < len(threads) - 1:  # the beam search runs apart from the batch
        assert time.monotonic() < deadline, "the requests never all started"
        time.sleep(0.1)

    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = server.process.wait(timeout=DRAIN_S + SHUTDOWN_AFTER_DRAIN_S + 10)
    exited_after = time.monotonic() - signalled
    for thread in threads:
        thread.join(timeout=30)
    log = server.log()
    assert code == 0, f"exit code {code}\n{log[-3000:]}"
    assert exited_after < DRAIN_S + SHUTDOWN_AFTER_DRAIN_S, f"exited {exited_after:.1f} s after SIGTERM"
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]

    assert set(answers) == set(requests_for(server.model_name)), f"requests without an answer: {answers.keys()}"
    for key in ("chat", "chat-beams", "predict"):
        assert answers[key]["status"] == 200, answers[key]
        details = answers[key]["json"]["details"]
        assert set(details["finish_reasons"]) == {"shutdown"}, (key, details)
        if key != "chat-beams":  # beam search has its text only at the end, where it is cut
            assert 0 < details["generated_tokens"][0] < TOKENS, (key, details)

    events = answers["chat-stream"]["events"]
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["details"]["finish_reasons"] == ["shutdown"], events[-2]
    assert events[-3]["finish_reason"] == "shutdown", events[-3]
    for key in ("completions-stream", "chat-completions-stream"):
        events = answers[key]["events"]
        assert events[-1] == "[DONE]", (key, events[-3:])
        assert events[-2]["choices"][0]["finish_reason"] == "shutdown", (key, events[-2])
