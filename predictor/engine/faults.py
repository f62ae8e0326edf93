"""A test hook: make the work on a request raise at a named stage, to test that a failure there ends that request
alone (or, for an exception no stage may catch, that the worker's death is noticed and answered).

Nothing in the server installs an injector, so in production ``inject`` is a call that returns at once. The tests'
fault server (``tests/fault_server.py``) installs one that raises when a request's prompt carries a marker. The
stages, in the order a request meets them:

- on the decode worker: ``adapter`` (placing its LoRA adapter), an option's name (``stop_strings``, ``grammar``,
  ``repetition_penalty``... : building its sampler, where a failure is the option's), ``prefix`` and ``rows`` (its
  prefix lookup and cache rows), ``prefill`` and ``decode`` (a forward pass computing its prompt or its next
  token), ``sampling`` (choosing its next token), ``retirement`` (answering it once finished);
- on the beam worker: ``beams``;
- on the event loop: ``detokenization`` and ``streaming``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

Injector = Callable[[str, Sequence[int]], None]  # (stage, the request's prompt ids): raises to inject a fault

_injector: Injector | None = None


def install(injector: Injector | None) -> None:
    """Install ``injector`` (None removes it)."""
    global _injector
    _injector = injector


def inject(stage: str, prompt_ids: Sequence[int]) -> None:
    """Called at each stage of a request's work; raises only when a test's injector decides to."""
    if _injector is not None:
        _injector(stage, prompt_ids)


def inject_each(stage: str, prompts: Iterable[Sequence[int]]) -> None:
    """``inject`` for each of a step's rows: one call per step when no injector is installed, not one per row."""
    if _injector is not None:
        for prompt_ids in prompts:
            _injector(stage, prompt_ids)
