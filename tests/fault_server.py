"""The real server with faults injected into generation, for tests of failure isolation.

``python -m tests.fault_server <the flags of python -m predictor>`` (from the repository root) patches the engine in
this process, then runs ``predictor.__main__.main()`` unchanged. A prompt that contains one of the markers below
makes the engine raise while it works on that prompt, as a lost or full accelerator would:

- ``<<fault:runtime>>``: ``RuntimeError`` (a device fault) in the batch step that computes the prompt,
  or in beam search;
- ``<<fault:oom>>``: ``torch.OutOfMemoryError`` there instead;
- ``<<fault:device-lost>>``: from then on every step raises, whatever the prompt, as a GPU that fell off the
  bus would (the engine's self-check included).

Other prompts run untouched, so a test can check that the next request is served normally.

With ``$FAULT_SERVER_HOLD_LOAD`` set to a path, loading the model waits until that file exists, so a test can see
the server while it is still loading, for as long as it needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from predictor import __main__ as predictor_main
from predictor.api import model
from predictor.engine import runner as engine

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
    if os.environ.get("FAULT_SERVER_HOLD_LOAD"):
        hold_loading_until(os.environ["FAULT_SERVER_HOLD_LOAD"])
    predictor_main.main()
