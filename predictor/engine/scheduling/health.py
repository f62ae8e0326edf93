"""The engine's health: consecutive failed steps, the workers' heartbeats, and the supervisor that stops the engine
when a worker dies or hangs.

A step that fails fails its requests and the worker goes on; ``FAILURES_BEFORE_UNHEALTHY`` failures in a row mark
the engine broken (a lost GPU, say), and readiness turns 503. While broken and idle, the worker runs a one-token
self-check every ``SELF_CHECK_INTERVAL_S``: success (a transient fault) makes it healthy again, and how long it has
stayed broken is what liveness reads (``--dead_after``).

A worker that dies (an exception no request's isolation caught), or that beats no heartbeat for ``--dead_after``
seconds while it has work, stops the engine for good: readiness and liveness turn 503 at once, so Kubernetes
restarts the pod, and every request waiting or running is answered (``Batcher.stop_engine``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Callable

logger = logging.getLogger(__name__)

FAILURES_BEFORE_UNHEALTHY = 3  # consecutive failed steps that mark the engine broken
SELF_CHECK_INTERVAL_S = 5.0  # how often a broken engine tries a one-token forward pass to see if it recovered
SUPERVISION_INTERVAL_S = 0.2  # how often the supervisor looks at the workers


class EngineHealth:
    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self._next_check = 0.0
        self._broken_since: float | None = None
        self._beats: dict[str, float] = {}  # worker name -> when it last made progress
        self.stopped: str | None = None  # why the engine stopped for good; None while it runs

    @property
    def healthy(self) -> bool:
        """False after repeated consecutive failures, until a step or a self-check succeeds again; False for good
        once the engine stopped."""
        return self.stopped is None and self.failures < FAILURES_BEFORE_UNHEALTHY

    @property
    def unhealthy_for(self) -> float:
        """Seconds the engine has been unhealthy without recovering (0 while healthy): a lost device shows as a
        figure that only grows."""
        return 0.0 if self._broken_since is None else time.monotonic() - self._broken_since

    @property
    def check_due(self) -> bool:
        return not self.healthy and time.monotonic() >= self._next_check

    def succeeded(self) -> None:
        self.failures = 0
        self._broken_since = None

    def failed(self) -> None:
        self.failures += 1
        self.checking()
        if self.failures == FAILURES_BEFORE_UNHEALTHY:
            self._broken_since = time.monotonic()

    def checking(self) -> None:
        """A self-check starts now (or a step failed): the next one is due an interval later."""
        self._next_check = time.monotonic() + SELF_CHECK_INTERVAL_S

    def beat(self, worker: str) -> None:
        """``worker`` made progress (a step, a wait for work): one clock read and one store."""
        self._beats[worker] = time.monotonic()

    def silent_for(self, worker: str) -> float:
        """Seconds since ``worker``'s last heartbeat."""
        return time.monotonic() - self._beats.get(worker, time.monotonic())

    def stop(self, cause: str) -> bool:
        """Mark the engine stopped for good because of ``cause``; whether this call was the first to."""
        if self.stopped is not None:
            return False
        self.stopped = cause
        self._broken_since = self._broken_since or time.monotonic()
        return True


class Supervisor:
    """Watches the worker threads from a thread of its own: one that ended while the engine runs, or that has work
    (``busy``) and beat no heartbeat for ``dead_after_s``, stops the engine through ``stop(cause, stack)``."""

    def __init__(self, health: EngineHealth, workers: dict[str, threading.Thread], busy: Callable[[str], bool],
                 dead_after_s: float, finished: Callable[[], bool], stop: Callable[[str, str], None]) -> None:
        self.health = health
        self.workers = workers
        self.busy = busy
        self.dead_after_s = dead_after_s
        self.finished = finished  # the workers were told to end (close) and may have: not a fault
        self.stop = stop
        self.thread = threading.Thread(target=self._watch, name="batcher-supervisor", daemon=True)

    def start(self) -> None:
        for name in self.workers:
            self.health.beat(name)
        self.thread.start()

    def _watch(self) -> None:
        try:
            while self.health.stopped is None:
                time.sleep(min(SUPERVISION_INTERVAL_S, self.dead_after_s / 4))
                if self.finished() and not any(thread.is_alive() for thread in self.workers.values()):
                    return
                self._check()
        except BaseException:  # noqa: BLE001 - the watcher itself must not end unnoticed
            logger.exception("The engine's supervisor failed; stopping the engine")
            self.stop("the engine's supervisor failed", traceback.format_exc())

    def _check(self) -> None:
        for name, thread in self.workers.items():
            if not thread.is_alive() and not self.finished():
                self.stop(f"the {name} worker ended unexpectedly", "")
                return
            silent = self.health.silent_for(name)
            if thread.is_alive() and silent > self.dead_after_s and self.busy(name):
                frame = sys._current_frames().get(thread.ident)  # where it is stuck
                stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
                self.stop(f"the {name} worker made no progress for {silent:.0f} s", stack)
                return
