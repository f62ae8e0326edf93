"""``--tensor_parallel_size 2`` over HTTP on the CPU (gloo) with the 40B-shaped tiny Falcon: the same answers as one
process, beams refused in one line, refusals at start-up, a lost rank ending in 503s and a non-zero exit, and
SIGTERM stopping every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

TP_FLAGS = ("--tensor_parallel_size", "2", "--device", "cpu", "--collective_timeout", "5")
GREEDY = {"do_sample": False, "max_new_tokens": 16, "output_scores": True, "return_dict_in_generate": True}
PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt, with many more tokens than the others have"]


def followers(pid: int) -> list[int]:
    """The server's tensor-parallel ranks: its child processes running multiprocessing's spawn entry point."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return [c for c in children if b"spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def chat(server, prompt: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", json={"prompt": prompt, "generate_kwargs": {**GREEDY, **kwargs}},
                      timeout=120)


@pytest.fixture()
def tp_server(start_server, tiny_dirs):
    server = start_server(tiny_dirs["40b"], *TP_FLAGS, model_name="tiny-falcon-40b")
    yield server
    server.stop()


def test_two_ranks_answer_as_one_process_and_stop_on_sigterm(tp_server, tiny_server_40b):
    ranks = followers(tp_server.process.pid)
    assert len(ranks) == 1
    results: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, chat(tp_server, p))) for p in PROMPTS]
    for thread in threads:  # concurrently: they share steps on both ranks
        thread.start()
    for thread in threads:
        thread.join()
    for prompt in PROMPTS:
        one, two = chat(tiny_server_40b, prompt).json(), results[prompt].json()
        assert two["Result"] == one["Result"]
        assert two["details"]["logprobs"][0] == pytest.approx(one["details"]["logprobs"][0], abs=1e-4)

    beams = chat(tp_server, "Hello", num_beams=2)
    assert beams.status_code == 400
    assert "beam search is not served with --tensor_parallel_size 2" in beams.json()["detail"]

    assert tp_server.stop() == 0
    deadline = time.monotonic() + 10
    while alive(ranks[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(ranks[0]), "a rank outlived the server"


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_fails_requests_with_503_and_ends_the_server(tp_server, fault):
    rank = followers(tp_server.process.pid)[0]
    answer: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answer.append(
        chat(tp_server, "Hello", max_new_tokens=1900, min_new_tokens=1900, output_scores=False)))
    request.start()
    time.sleep(1.0)  # generating by now
    os.kill(rank, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    request.join(timeout=60)
    assert answer and answer[0].status_code == 503, answer[0].text if answer else "no answer"
    body = answer[0].json()
    assert body["error_type"] == "engine_stopped"  # the path of a dead worker: one outcome, one probe state
    assert "tensor-parallel engine is lost" in body["detail"]
    probes = [httpx.get(f"{tp_server.url}{path}", timeout=5) for path in ("/health", "/livez")]
    assert [p.status_code for p in probes] == [503, 503]
    assert probes[0].json()["status"] == "Stopped"
    assert "tensor-parallel engine is lost" in probes[1].json()["cause"]
    assert tp_server.process.wait(timeout=20) != 0
    deadline = time.monotonic() + 10
    while alive(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(rank), "a rank outlived the server"


@pytest.mark.parametrize(("architecture", "size", "words"), [
    ("7b", "2", "scale by replicas"),
    ("40b", "4", "does not divide the model's 2 K/V groups"),
])
def test_a_size_that_cannot_split_is_refused_at_start_up_in_one_line(tiny_dirs, architecture, size, words):
    done = subprocess.run([sys.executable, "-m", "predictor", "--model_dir", str(tiny_dirs[architecture]),
                           "--model_name", "tiny", "--device", "cpu", "--tensor_parallel_size", size],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert words in last and last.startswith("--tensor_parallel_size"), done.stderr


@pytest.mark.slow  # compiles the decode step
def test_compiled_steps_under_two_ranks_answer_as_one_process(start_server, tiny_dirs, tiny_server_40b):
    server = start_server(tiny_dirs["40b"], *TP_FLAGS, "--compile", "--max_batch_size", "1",
                          "--max_num_return_sequences", "1", model_name="tiny-falcon-40b", wait=False)
    try:
        server.wait_ready(deadline_s=400)  # both ranks compile every shape on a shared CPU
        assert "Compiled the decode step" in server.log()
        for prompt in PROMPTS[:2]:
            one, two = chat(tiny_server_40b, prompt).json(), chat(server, prompt).json()
            assert two["Result"] == one["Result"]
            assert two["details"]["logprobs"][0] == pytest.approx(one["details"]["logprobs"][0], abs=1e-4)
    finally:
        assert server.stop() == 0
