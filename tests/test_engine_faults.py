"""A request can never stop the engine: faults injected at each stage of the work on a request (through the
engine's fault-injection hook, ``tests/fault_server.py``) end that request alone, with a clear answer, and the
next request is served; a worker that dies or hangs stops the engine visibly (the probes go 503) and every request
waiting or running is answered; no request waits past its budget even when no worker is left to answer it.

Each server here is the real one, on the tiny Falcon, over HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

SECRET = "injected-fault-detail-that-must-not-reach-clients"  # see tests/fault_server.py
PAIR = {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 4, "min_new_tokens": 4, "num_return_sequences": 2,
                                             "do_sample": True}}


@pytest.fixture(scope="module")
def server(start_server, tiny_dir):
    """Two cache rows (two sequences at once), faults injectable by prompt markers."""
    return start_server(tiny_dir, "--max_batch_size", "2", "--max_num_return_sequences", "2",
                        "--request_timeout", "60", module="tests.fault_server")


def chat(server, payload: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", json=payload, timeout=timeout)


def marked(marker: str, **generate_kwargs: Any) -> dict[str, Any]:
    return {"prompt": f"Hello {marker}", "generate_kwargs": {"max_new_tokens": 4, **generate_kwargs}}


def failed_total(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "falcon_requests_total" and sample.labels.get("outcome") == "failed")


def assert_served_after(server) -> None:
    """A request with two sequences needs both cache rows: it is served only if the failed request freed its."""
    response = chat(server, PAIR)
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] == [4, 4]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def in_thread(call) -> tuple[threading.Thread, dict[str, Any]]:
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("response", call()))
    thread.start()
    return thread, answer


# -- one request fails alone --------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["stop_strings", "repetition_penalty"])
def test_an_option_that_cannot_be_built_is_a_422_naming_it(server, option: str) -> None:
    kwargs = {"stop_strings": ["zz"]} if option == "stop_strings" else {"repetition_penalty": 1.3}
    response = chat(server, marked(f"<<raise:{option}>>", **kwargs))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "unsupported_option" and body["param"] == option, body
    assert option in body["detail"] and SECRET not in response.text
    assert_served_after(server)


@pytest.mark.parametrize("stage, error_type", [
    ("prefix", "admission_failed"), ("rows", "admission_failed"), ("prefill", "generation_failed"),
    ("decode", "generation_failed"), ("sampling", "sampling_failed"), ("retirement", "retirement_failed"),
    ("detokenization", "detokenization_failed"), ("beams", "generation_failed")])
def test_a_fault_at_a_stage_fails_its_request_alone_with_a_500_naming_the_stage(server, stage: str,
                                                                                 error_type: str) -> None:
    failed = failed_total(server)
    kwargs = {"num_beams": 2, "do_sample": False} if stage == "beams" else {"num_return_sequences": 2}
    response = chat(server, marked(f"<<raise:{stage}>>", **kwargs))
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_type"] == error_type, body
    assert SECRET not in response.text and "Traceback" not in response.text
    assert failed_total(server) == failed + 1
    assert_served_after(server)


@pytest.mark.parametrize("stage", ["decode", "sampling"])
def test_a_fault_in_a_shared_step_ends_only_the_request_at_fault(server, stage: str) -> None:
    """The forward pass and the token choice are shared by the batch: when they raise, each request's part is
    redone on its own, and only the one at fault ends."""
    steady = {"prompt": "Once upon a time", "generate_kwargs": {"do_sample": False, "max_new_tokens": 300,
                                                                 "min_new_tokens": 300}}
    thread, answer = in_thread(lambda: chat(server, steady))
    time.sleep(0.2)  # running by now
    response = chat(server, marked(f"<<raise:{stage}>>"))
    thread.join(60)
    assert response.status_code == 500, response.text
    running = answer["response"]
    assert running.status_code == 200, running.text
    assert running.json()["details"]["generated_tokens"] == [300]
    alone = chat(server, steady).json()  # the same greedy request, with nothing else in the batch
    assert running.json()["Result"] == alone["Result"]
    assert_served_after(server)


def test_a_fault_while_streaming_ends_the_stream_with_an_error_event(server) -> None:
    failed = failed_total(server)
    payload = {**marked("<<raise:streaming>>"), "stream": True}
    with httpx.stream("POST", f"{server.url}/chat", json=payload, timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error_type"] == "streaming_failed" and SECRET not in json.dumps(error), events
    assert failed_total(server) == failed + 1
    assert_served_after(server)


def test_an_openai_request_whose_sampling_fails_gets_a_server_error_and_the_next_is_served(server) -> None:
    body = {"model": server.model_name, "prompt": "Hello <<raise:sampling>>", "max_tokens": 4}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "sampling_failed"
    body["prompt"] = "Hello"
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200


@pytest.fixture(scope="module")
def adapter_server(start_server, tiny_dir, tmp_path_factory):
    """Two LoRA adapters and one slot for them: a request for the second runs only once the first's is free."""
    from lora_adapters import make_adapter

    root = tmp_path_factory.mktemp("fault-adapters")
    paths = {name: make_adapter(tiny_dir, root / name, seed=seed) for seed, name in enumerate(("one", "two"), 1)}
    return start_server(tiny_dir, "--lora_modules", *(f"{name}={path}" for name, path in paths.items()),
                        "--max_loras", "1", "--adapter_dir", str(root / "none"), "--request_timeout", "60",
                        module="tests.fault_server")


@pytest.mark.parametrize("stage, error_type", [
    ("adapter", "admission_failed"), ("rows", "admission_failed"), ("prefill", "generation_failed"),
    ("decode", "generation_failed"), ("sampling", "sampling_failed"), ("retirement", "retirement_failed")])
def test_a_request_failing_with_an_adapter_fails_alone_and_frees_its_slot(adapter_server, stage: str,
                                                                           error_type: str) -> None:
    response = chat(adapter_server, {**marked(f"<<raise:{stage}>>"), "model": "one"})
    assert response.status_code == 500, response.text
    assert response.json()["error_type"] == error_type and SECRET not in response.text
    other = {"prompt": "Hello", "model": "two", "generate_kwargs": {"max_new_tokens": 4, "min_new_tokens": 4}}
    response = chat(adapter_server, other, timeout=30)  # waits for the only slot if the failed request kept it
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] == [4]


# -- the engine stops: a worker died or hangs ---------------------------------------------------------------------

LONG = {"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 2000, "min_new_tokens": 2000}}


def assert_probes_fail_within(server, bound_s: float) -> None:
    deadline = time.monotonic() + bound_s
    while httpx.get(f"{server.url}/livez", timeout=10).status_code == 200:
        assert time.monotonic() < deadline, "liveness still 200"
        time.sleep(0.05)
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json() == {"status": "Stopped"}, health.text
    livez = httpx.get(f"{server.url}/livez", timeout=10)
    assert livez.status_code == 503 and livez.json()["status"] == "Dead", livez.text
    for route in (f"/v1/models/{server.model_name}", f"/v2/models/{server.model_name}/ready"):  # KServe's readiness
        ready = httpx.get(f"{server.url}{route}", timeout=10)
        assert ready.status_code == 503 and ready.json()["error_type"] == "engine_stopped", (route, ready.text)


def assert_engine_stopped(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error_type"] == "engine_stopped", response.text
    assert "engine stopped" in response.json()["detail"]


def test_a_dead_decode_worker_fails_the_probes_and_answers_every_request(start_server, tiny_dir) -> None:
    stopped = start_server(tiny_dir, "--max_batch_size", "2", "--request_timeout", "60", module="tests.fault_server")
    running, running_answer = in_thread(lambda: chat(stopped, LONG))
    time.sleep(0.3)
    doomed, doomed_answer = in_thread(lambda: chat(stopped, marked("<<kill:retirement>>", max_new_tokens=100,
                                                                    min_new_tokens=100)))
    time.sleep(0.1)  # the doomed request has the second row; it dies when it finishes, after this one came
    waiting, waiting_answer = in_thread(lambda: chat(stopped, LONG))  # no third row: it waits
    started = time.monotonic()
    for thread in (running, doomed, waiting):
        thread.join(30)
    assert time.monotonic() - started < 10
    for answer in (running_answer, doomed_answer, waiting_answer):
        assert_engine_stopped(answer["response"])
    assert_probes_fail_within(stopped, 1.0)
    assert_engine_stopped(chat(stopped, {"prompt": "Hello"}))
    log = stopped.log()
    assert log.count("The engine stopped") == 1 and "WorkerKilled" in log and "Traceback" in log, log[-3000:]
    assert stopped.stop() == 0


def test_a_hung_decode_worker_stops_the_engine_after_dead_after(start_server, tiny_dir) -> None:
    hung = start_server(tiny_dir, "--max_batch_size", "1", "--dead_after", "1", "--request_timeout", "60",
                        module="tests.fault_server")
    stuck, stuck_answer = in_thread(lambda: chat(hung, marked("<<hang:decode>>")))
    time.sleep(0.2)
    waiting, waiting_answer = in_thread(lambda: chat(hung, {"prompt": "Hello"}))
    started = time.monotonic()
    assert_probes_fail_within(hung, 5.0)
    for thread, answer in ((stuck, stuck_answer), (waiting, waiting_answer)):
        thread.join(10)
        assert_engine_stopped(answer["response"])
    assert time.monotonic() - started < 5.0
    assert "made no progress" in hung.log()
    assert hung.stop() == 0


def test_a_dead_beam_worker_fails_the_probes(start_server, tiny_dir) -> None:
    stopped = start_server(tiny_dir, module="tests.fault_server")
    assert_engine_stopped(chat(stopped, marked("<<kill:beams>>", num_beams=2, do_sample=False)))
    assert_probes_fail_within(stopped, 1.0)
    stream = httpx.post(f"{stopped.url}/chat", json={"prompt": "Hello", "stream": True}, timeout=10)
    assert stream.status_code == 503  # refused before its stream began
    assert stopped.stop() == 0


def test_no_request_waits_past_its_budget_when_no_worker_answers(start_server, tiny_dir) -> None:
    """The worker hangs but is not yet declared dead: the watchdog on the event loop answers, a waiting request at
    its budget, the running one a grace period later."""
    budget = 1.0
    hung = start_server(tiny_dir, "--max_batch_size", "1", "--dead_after", "120", "--request_timeout", str(budget),
                        module="tests.fault_server")
    stuck, stuck_answer = in_thread(lambda: chat(hung, marked("<<hang:decode>>")))
    time.sleep(0.2)
    started = time.monotonic()
    waiting = chat(hung, {"prompt": "Hello"})
    waited = time.monotonic() - started
    assert waiting.status_code == 504 and waiting.json()["error_type"] == "request_timeout", waiting.text
    assert budget - 0.3 < waited < budget + 1.0
    stream_started = time.monotonic()
    with httpx.stream("POST", f"{hung.url}/chat", json={"prompt": "Hello", "stream": True}, timeout=30) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - stream_started < budget + 1.0
    assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2], events
    stuck.join(15)
    stuck_response = stuck_answer["response"]
    assert stuck_response.status_code == 504, stuck_response.text
    assert hung.stop() == 0
