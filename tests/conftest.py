"""Shared fixtures: tiny Falcon checkpoints (both architectures) and real server processes on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from predictor.config import DEMO_MODEL_NAME
from predictor.tiny import build_tiny_falcon

STARTUP_DEADLINE_S = 120


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Falcon per architecture: "7b" (multi-query) and "40b" (new decoder architecture)."""
    root = tmp_path_factory.mktemp("tiny-falcon")
    return {arch: build_tiny_falcon(root / arch, arch) for arch in ("7b", "40b")}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["7b"]


@dataclass
class ServerProcess:
    """A ``python -m predictor`` process serving on a loopback port."""

    process: subprocess.Popen
    port: int
    model_name: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        """Poll /health until it answers 200 (the model is loaded), failing fast if the process died."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {deadline_s}s:\n{self.log()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(model_dir: Path | None, log_dir: Path, *extra: str, model_name: str | None = None,
                  module: str = "predictor", env: dict[str, str] | None = None) -> ServerProcess:
    """Start a server process (not waiting for readiness). ``module`` may name a wrapper that runs it. Served as
    "tiny-falcon" by default; with neither ``model_dir`` nor ``model_name``, the demo (any other name alone is
    refused: it would name no Falcon variant)."""
    if model_name is None:
        model_name = "tiny-falcon" if model_dir is not None else DEMO_MODEL_NAME
    port = free_port()
    args = [sys.executable, "-m", module, "--model_name", model_name, "--http_port", str(port),
            "--enable_grpc", "false", *extra]
    if model_dir is not None:
        args += ["--model_dir", str(model_dir)]
    log_path = log_dir / f"server-{port}.log"
    process = subprocess.Popen(args, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
                               cwd=Path(__file__).resolve().parent.parent)
    return ServerProcess(process, port, model_name, log_path)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start a ready server with extra flags; every server is stopped at the end of the session."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(model_dir: Path | None, *extra: str, wait: bool = True, **kwargs) -> ServerProcess:
        server = launch_server(model_dir, log_dir, *extra, **kwargs)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(start_server, tiny_dirs) -> ServerProcess:
    """A server on the 7B-style tiny Falcon with default flags."""
    return start_server(tiny_dirs["7b"])


@pytest.fixture(scope="session")
def tiny_server_40b(start_server, tiny_dirs) -> ServerProcess:
    """A server on the 40B-style (new decoder architecture) tiny Falcon."""
    return start_server(tiny_dirs["40b"], model_name="tiny-falcon-40b")


@pytest.fixture(scope="session", params=["7b", "40b"])
def any_server(request, tiny_server, tiny_server_40b) -> ServerProcess:
    """Each architecture's server in turn."""
    return tiny_server if request.param == "7b" else tiny_server_40b


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker itself: keywords also hold every node's name, so a checkout in a folder named "gpu" matched
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(skip)
    # Files with a slow test first: the two workers take whole files in this order (``--dist loadfile``), and a long
    # file handed out last would leave one worker running it alone at the end.
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file's tests keep their order
