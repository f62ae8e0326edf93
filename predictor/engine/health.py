"""The engine's health: consecutive failed steps, and when a broken engine should check itself again.

A step that fails fails its requests and the worker goes on; ``FAILURES_BEFORE_UNHEALTHY`` failures in a row mark
the engine broken (a lost GPU, say), and readiness turns 503. While broken and idle, the worker runs a one-token
self-check every ``SELF_CHECK_INTERVAL_S``: success (a transient fault) makes it healthy again, and how long it has
stayed broken is what liveness reads (``--dead_after``).
"""

from __future__ import annotations

import time

FAILURES_BEFORE_UNHEALTHY = 3  # consecutive failed steps that mark the engine broken
SELF_CHECK_INTERVAL_S = 5.0  # how often a broken engine tries a one-token forward pass to see if it recovered


class EngineHealth:
    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self._next_check = 0.0
        self._broken_since: float | None = None

    @property
    def healthy(self) -> bool:
        """False after repeated consecutive failures, until a step or a self-check succeeds again."""
        return self.failures < FAILURES_BEFORE_UNHEALTHY

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
