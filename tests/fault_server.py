"""The real server with faults injected into generation, for tests of failure isolation.

``python -m tests.fault_server <the flags of python -m predictor>`` (from the repository root) patches the engine in
this process, then runs ``predictor.__main__.main()`` unchanged. A prompt that contains one of the markers below
makes the engine raise while it works on that prompt, as a lost or full accelerator would:

- ``<<fault:runtime>>``: ``RuntimeError`` (a device fault) in the batch step that computes the prompt,
  or in beam search;
- ``<<fault:oom>>``: ``torch.OutOfMemoryError`` there instead;
- ``<<fault:device-lost>>``: from then on every step raises, whatever the prompt, as a GPU that fell off the
  bus would (the engine's self-check included).

Through the engine's fault-injection hook (``predictor.engine.faults``), a prompt that contains
``<<raise:STAGE>>`` makes the work on that request raise ``RuntimeError`` at that stage (an option's name such as
``stop_strings``, ``adapter``, ``prefix``, ``rows``, ``prefill``, ``decode``, ``sampling``, ``retirement``, ``beams``,
``detokenization``, ``streaming``: see ``predictor/engine/faults.py``); ``<<kill:STAGE>>`` raises an exception no stage may catch (``WorkerKilled``, a ``BaseException``),
which ends the worker thread; ``<<hang:STAGE>>`` blocks the worker there for good.

Other prompts run untouched, so a test can check that the next request is served normally.

With ``$FAULT_SERVER_HOLD_LOAD`` set to a path, loading the model waits until that file exists, so a test can see
the server while it is still loading, for as long as it needs.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import Callable, Sequence

import torch

from predictor import __main__ as predictor_main
from predictor.api import model
from predictor.engine import faults
from predictor.engine.model import runner as engine

HOLD_LOAD_MAX_S = 120  # never wait for the release longer than a test would wait for readiness

SECRET = "injected-fault-detail-that-must-not-reach-clients"
FAULTS: dict[str, Callable[[], BaseException]] = {
    "<<fault:runtime>>": lambda: RuntimeError(f"CUDA error: an illegal memory access ({SECRET})"),
    "<<fault:oom>>": lambda: torch.OutOfMemoryError(f"CUDA out of memory ({SECRET})"),
}


DEVICE_LOST = "<<fault:device-lost>>"
device_lost = False


def raise_if_marked(tokenizer, prompts: list[list[int]]) -> None:
    global device_lost
    for prompt in prompts:
        text = tokenizer.decode(prompt)
        device_lost = device_lost or DEVICE_LOST in text
        if device_lost:
            raise RuntimeError(f"CUDA error: device lost ({SECRET})")
        for marker, fault in FAULTS.items():
            if marker in text:
                raise fault()


def install_faults() -> None:
    step, probe, generate_beams = engine.Engine.step, engine.Engine.probe, engine.Engine.generate_beams

    def faulty_step(self: engine.Engine, decode, chunks=()):
        raise_if_marked(self.tokenizer, [list(tokens) for _, tokens, _ in chunks])
        if device_lost:
            raise RuntimeError(f"CUDA error: device lost ({SECRET})")
        return step(self, decode, chunks)

    def faulty_probe(self: engine.Engine):
        if device_lost:
            raise RuntimeError(f"CUDA error: device lost ({SECRET})")
        return probe(self)

    def faulty_generate_beams(self: engine.Engine, prompt_ids: list[int], *args, **kwargs):
        raise_if_marked(self.tokenizer, [prompt_ids])
        return generate_beams(self, prompt_ids, *args, **kwargs)

    engine.Engine.step = faulty_step
    engine.Engine.probe = faulty_probe
    engine.Engine.generate_beams = faulty_generate_beams


STAGE_MARKER = re.compile(r"<<(raise|kill|hang):(\w+)>>")


class WorkerKilled(BaseException):
    """Escapes every ``except Exception``: what ends a worker thread."""


def stage_faults(tokenizer) -> faults.Injector:
    """The injector: raises at the stage a prompt's marker names."""
    @functools.lru_cache(maxsize=256)
    def markers(prompt: tuple[int, ...]) -> list[tuple[str, str]]:
        return STAGE_MARKER.findall(tokenizer.decode(list(prompt)))

    def inject(stage: str, prompt_ids: Sequence[int]) -> None:
        for action, marked in markers(tuple(prompt_ids)):
            if marked != stage:
                continue
            if action == "raise":
                raise RuntimeError(f"injected at {stage} ({SECRET})")
            if action == "kill":
                raise WorkerKilled(f"injected at {stage}")
            threading.Event().wait()  # hang: nothing ever sets it

    return inject


def install_stage_faults() -> None:
    load = model.FalconModel.load

    def load_with_faults(self: model.FalconModel) -> bool:
        loaded = load(self)
        faults.install(stage_faults(self.engine.tokenizer))
        return loaded

    model.FalconModel.load = load_with_faults


def hold_loading_until(release: str) -> None:
    load = model.FalconModel.load

    def held_load(self: model.FalconModel) -> bool:
        deadline = time.monotonic() + HOLD_LOAD_MAX_S
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return load(self)

    model.FalconModel.load = held_load


if __name__ == "__main__":
    install_faults()
    install_stage_faults()
    if os.environ.get("FAULT_SERVER_HOLD_LOAD"):
        hold_loading_until(os.environ["FAULT_SERVER_HOLD_LOAD"])
    predictor_main.main()
