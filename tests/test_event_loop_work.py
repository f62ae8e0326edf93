"""What the server does on its event loop and with its cores (issue 30, point 4): the decode worker shares the
process's GIL with the event loop, so work the event loop need not do, and thread hops it need not make, are left
out; the model's operators leave a core to the HTTP side."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from timing_asgi import TimingMiddleware
from timing_asgi.integrations import StarletteScopeToName

from predictor.api.encoding import INLINE_CHARS, encode_text
from predictor.api.server import drop_request_timings
from predictor.api.tracing import RequestIdMiddleware, random_hex_id, request_id_from
from predictor.cpu_threads import available_cores, cgroup_cores, operator_threads


# -- operator threads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, cores", [("max 100000\n", None), ("400000 100000\n", 4.0), ("150000 100000", 1.5),
                                         ("", None), ("garbage", None)])
def test_a_cgroup_cpu_limit_is_read_as_cores(tmp_path: Path, text: str, cores: float | None) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    assert cgroup_cores(cpu_max) == cores


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cores(tmp_path / "absent") is None


def test_the_cores_available_are_the_pinned_ones_within_the_limit(tmp_path: Path) -> None:
    pinned = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000")
    assert available_cores(cpu_max) == pinned
    cpu_max.write_text("50000 100000")  # half a core still runs on one
    assert available_cores(cpu_max) == 1
    cpu_max.write_text(f"{(pinned + 8) * 100000} 100000")  # a limit above the pinned cores does not add any
    assert available_cores(cpu_max) == pinned
    cpu_max.write_text("150000 100000")  # 1.5 cores: two may run, for part of the time
    assert available_cores(cpu_max) == min(2, pinned)


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_operators_leave_one_core_to_the_http_side(cores: int, threads: int) -> None:
    assert operator_threads(cores) == threads


def test_the_server_says_how_many_operator_threads_it_runs(tiny_server) -> None:
    if os.environ.get("OMP_NUM_THREADS"):
        pytest.skip("OMP_NUM_THREADS is set here: the server takes its count")
    line = re.search(r"Operators run on (\d+) thread\(s\) of the (\d+) core", tiny_server.log())
    assert line is not None
    assert (int(line.group(1)), int(line.group(2))) == (operator_threads(available_cores()), available_cores())


def test_omp_num_threads_decides_when_it_is_set(start_server, tiny_dir) -> None:
    server = start_server(tiny_dir, env={"OMP_NUM_THREADS": "2"})
    assert httpx.post(f"{server.url}/chat", json={"prompt": "hi", "generate_kwargs": {"max_new_tokens": 2}},
                      timeout=30).status_code == 200
    assert "Operators run on" not in server.log()


# -- KServe's per-request timings --------------------------------------------------------------------------------
def test_kserves_request_timings_are_taken_out_of_the_app() -> None:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(TimingMiddleware, client=None, metric_namer=StarletteScopeToName(prefix="x", starlette_app=app))
    drop_request_timings(app)
    assert [entry.cls for entry in app.user_middleware] == [RequestIdMiddleware]


# -- tokenizing on the event loop --------------------------------------------------------------------------------
def test_a_short_text_is_encoded_on_the_event_loop_and_a_long_one_on_a_worker_thread() -> None:
    threads = []

    def encode(text: str, add_special_tokens: bool = False) -> list[int]:
        threads.append(threading.current_thread())
        return [len(text), int(add_special_tokens)]

    async def both() -> tuple[list[int], list[int]]:
        return (await encode_text(encode, "a" * INLINE_CHARS, True),
                await encode_text(encode, "a" * (INLINE_CHARS + 1), add_special_tokens=True))

    assert asyncio.run(both()) == ([INLINE_CHARS, 1], [INLINE_CHARS + 1, 1])
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()


# -- ids -------------------------------------------------------------------------------------------------------
def test_new_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    ids = {random_hex_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from(None))
