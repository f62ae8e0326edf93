"""How much of each step the host adds to the device's time, with the device emulated.

The real batcher serves real requests, 64 tokens each, in one of the issue's mixes (``MIXES``: greedy; sampled with
top-k and top-p; sampled with a stop string; sampled with a stop string and half of them streamed, detokenized on
the event loop as the API does). Only the device is emulated:

- ``Engine.step`` (the forward pass) is a device that takes a set time per step. Its launch returns at once; the
  host waits for it, with the GIL released, where it reads the step's tokens back (``DecodeBatch._read_back``),
  until the device time since the launch has passed, as a GPU read-back would.
- Token choice (``--choice device``, the default) runs the real code on scores ``NARROW`` columns wide: the host
  pays for its Python and for dispatching every operator, as it pays for launching the kernels on a GPU, while the
  arithmetic over rows x vocabulary (sorts, softmaxes, the noise), which a GPU does inside the step's device time,
  is all but free. The tokens read back are random ids of the whole vocabulary. ``--choice host`` chooses from the
  whole vocabulary on the CPU: its arithmetic then counts as host time, which overstates the host's work.

The figure is the steps' wall time / device time, from the first step's start to the last one's end: 1.0 when
the host never keeps the device waiting. The requests are parsed before the clock starts; the run's wall time /
(steps x device time), which adds admitting them and handing back their answers, is recorded as ``end_to_end``.
``--before COMMIT`` runs an earlier engine beside this one, in turns, with the same choices (an engine from before
issue 30 has no read-back to hook: its stub waits inside the step, as its serial step did; use ``--choice host``).

    python benchmarks/emulated_device.py                              # 1/32/128/256/512 rows x 3/8 ms, all mixes
    python benchmarks/emulated_device.py --rows 256 --device-ms 8 --rounds 3

Figures on a shared machine are noisy: compare figures of one run, never figures of two runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a land far away, the falcon"
NARROW = 64  # columns of the scores token choice runs on with --choice device (top-k 50 needs 50)
STOP = "zq zq zq"  # a stop string the emulated tokens practically never complete: it costs its checks, every step
SAMPLED = {"do_sample": True, "top_k": 50, "top_p": 0.9}
# The mixes: each request's options, and whether request i is streamed.
MIXES = {
    "greedy": ({"do_sample": False}, lambda i: False),  # /chat samples unless told not to (Kaito's default)
    "sampled": (SAMPLED, lambda i: False),
    "sampled+stop": ({**SAMPLED, "stop_strings": [STOP]}, lambda i: False),
    "sampled+stop+half streamed": ({**SAMPLED, "stop_strings": [STOP]}, lambda i: i % 2 == 0),
}


class EmulatedDevice:
    """Stands in for ``Engine.step``: a device that runs each step for ``device_s`` after the one before it. The
    tokens chosen from a step's logits are ready when that step ends; reading them back waits until then."""

    def __init__(self, engine, batch_type, on_device: bool = False) -> None:
        import torch

        self.engine, self.device_s, self.on_device = engine, 0.0, on_device
        self.ends: list[float] = [0.0]  # when each launched step ends on the device
        self.steps, self.waited = 0, 0.0
        vocab = engine.info.vocab_size
        width = NARROW if on_device else vocab
        self.logits = torch.randn(4096, width, generator=torch.Generator().manual_seed(0)) * 3
        self.ids = torch.Generator().manual_seed(1)  # the tokens a step reads back, with --choice device
        self._offset = 0
        self._ready: dict[int, float] = {}  # id(tokens tensor) -> when the step it was chosen from ends
        self.span: list[float] = []  # when the first step of a run started and its last one ended
        engine.step = self.step
        batch_step = batch_type.step

        def timed_step(batch):
            started = time.perf_counter()
            batch_step(batch)
            self.span[:] = [self.span[0] if self.span else started, time.perf_counter()]

        batch_type.step = timed_step
        self.waits_at_read_back = hasattr(batch_type, "_read_back")
        if self.waits_at_read_back:
            read_back, choose = batch_type._read_back, batch_type._choose_tokens

            def waiting_read_back(batch, tokens):
                self.wait(self._ready.pop(id(tokens), self.ends[-1]))
                if self.on_device:  # chosen among NARROW columns: read back as ids of the whole vocabulary
                    tokens = torch.randint(vocab, tokens.shape, generator=self.ids)
                return read_back(batch, tokens)

            def tagged_choose(batch, *args, **kwargs):
                tokens, logprobs = choose(batch, *args, **kwargs)
                self._ready[id(tokens)] = self.ends[-1]
                return tokens, logprobs

            batch_type._read_back, batch_type._choose_tokens = waiting_read_back, tagged_choose

    def step(self, decode, chunks=()):
        self.ends.append(max(time.perf_counter(), self.ends[-1]) + self.device_s)
        self.steps += 1
        if not hasattr(decode, "ids"):  # tokens on the device: the batch tells the cache once it read them back
            for row, token in decode:
                self.engine.cache.extend(row, (token,))
        if not self.waits_at_read_back:
            self.wait(self.ends[-1])
        rows = len(decode) + sum(wanted for _, _, wanted in chunks)
        self._offset = (self._offset + rows) % (self.logits.shape[0] - rows)
        return self.logits[self._offset:self._offset + rows]

    def as_accelerator(self, batcher) -> None:
        """The batch behaves as on the accelerator this device stands for (its CPU engine would not)."""
        batcher._batch.hold_events = True  # a step's events go to the event loop while it waits for the device

    def choose_narrow(self, batcher) -> None:
        """The batch's options table as wide as the scores it chooses from."""
        from predictor.engine.sampling.choice import SamplingTable

        batcher._batch.sampling = SamplingTable(self.engine.device, NARROW)

    def wait(self, until: float) -> None:
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
            self.waited += delay


def measure(model_dir: str, rows: list[int], device_ms: list[float], tokens: int, mixes: list[str],
            on_device: bool) -> list[dict]:
    """Step wall time / device time and the host's time per step, for each mix, number of rows and device time
    (run in a child process, on the tree first on its path)."""
    import asyncio

    import torch

    from predictor.api.chat.mapping import to_generation_job
    from predictor.api.chat.schema import parse_chat_request
    from predictor.api.streaming import IncrementalDecoder
    try:
        from predictor.engine.model.loading import LoadSpec, load_engine
    except ImportError:  # an engine from before the loading functions left ``runner`` (--before)
        from predictor.engine.model.runner import LoadSpec, load_engine
    from predictor.engine.options import Limits
    from predictor.engine.scheduling.batcher import Batcher
    from predictor.engine.scheduling.decoding import DecodeBatch

    torch.set_num_threads(1)
    engine = load_engine(LoadSpec(model_dir))
    engine.reserve(max(rows))
    gc.collect()  # as the server does once loaded: later full collections skip the model's and libraries' objects
    gc.freeze()
    device = EmulatedDevice(engine, DecodeBatch, on_device)
    assert not on_device or (engine.info.eos_token_id or 0) < NARROW, "the eos id must be in the narrow scores"
    prompt_ids = engine.encode(PROMPT)

    def job(options: dict):
        kwargs = {**options, "max_new_tokens": tokens, "min_new_tokens": tokens}
        return to_generation_job(parse_chat_request({"prompt": PROMPT, "generate_kwargs": kwargs}), prompt_ids,
                                 engine.info, Limits())

    async def consume(batcher: Batcher, job, streamed: bool) -> None:
        ticket = batcher.submit(job, stream=streamed)
        if streamed:  # detokenized as it comes, by the API's own decoder
            decoder = IncrementalDecoder(engine.decode, prompt_ids)
            async for event in ticket.events():
                if event.token_id is not None:
                    decoder.push(event.token_id)
        await ticket.result()

    async def serve(n: int, mix: str) -> float:
        options, streamed = MIXES[mix]
        batcher = Batcher(engine, max_batch_size=n, max_queue=n, prefix_caching=False)
        device.as_accelerator(batcher)
        if on_device:
            device.choose_narrow(batcher)
        batcher.start()
        jobs = [job(options) for _ in range(n)]  # parsed before the clock starts: the API's work, not the steps'
        await asyncio.gather(*(consume(batcher, jobs[i], streamed(i)) for i in range(n)))  # warm-up
        device.steps, device.waited, device.ends, device.span = 0, 0.0, device.ends[-1:], []
        started = time.perf_counter()
        await asyncio.gather(*(consume(batcher, jobs[i], streamed(i)) for i in range(n)))
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed

    figures = []
    for mix in mixes:
        for n in rows:
            for ms in device_ms:
                device.device_s = ms / 1e3
                elapsed = asyncio.run(serve(n, mix))
                steps_wall = device.span[1] - device.span[0]
                figures.append({"mix": mix, "rows": n, "device_ms": ms, "steps": device.steps,
                                "ratio": steps_wall / device.steps / device.device_s,
                                "end_to_end": elapsed / device.steps / device.device_s,
                                "host_ms_per_step": (steps_wall - device.waited) / device.steps * 1e3})
    return figures


def run_child(source: Path, model_dir: str, args: argparse.Namespace, on_device: bool) -> list[dict]:
    code = (f"import sys, json; sys.path.insert(0, {str(source)!r}); sys.path.insert(1, {str(REPO / 'benchmarks')!r});"
            f"import emulated_device as e; print(json.dumps(e.measure({model_dir!r}, {args.rows!r}, "
            f"{args.device_ms!r}, {args.tokens}, {args.mixes!r}, {on_device})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the child on {source} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128, 256, 512], help="requests run together")
    parser.add_argument("--device-ms", type=float, nargs="+", default=[3.0, 8.0], help="the device's time per step")
    parser.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES), help="the requests' options")
    parser.add_argument("--choice", nargs="+", choices=["device", "host"], default=["device", "host"],
                        help="where token choice's arithmetic runs (a column each)")
    parser.add_argument("--before", default=None, help="also an earlier commit's engine, in turns with this one")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per column (medians are reported)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "emulated-device.json"))
    args = parser.parse_args()

    from predictor.tiny import build_tiny_falcon

    with tempfile.TemporaryDirectory(prefix="emulated-device-") as tmp:
        model_dir = str(build_tiny_falcon(Path(tmp) / "tiny-falcon-7b", "7b"))
        trees = {"": REPO}
        if args.before:
            trees = {f"{args.before}, ": report.package_at(args.before, Path(tmp) / "before"), "this tree, ": REPO}
        columns = {f"{tree}choice on {where}": (source, where == "device")
                   for tree, source in trees.items() for where in args.choice}
        samples: dict[str, list[list[dict]]] = {name: [] for name in columns}
        for _ in range(args.rounds):
            for name, (source, on_device) in columns.items():  # in turns: the machine's drifts hit every column
                samples[name].append(run_child(source, model_dir, args, on_device))
    rows = []
    print(f"{'mix':>28} {'rows':>5} {'device ms':>9}  "
          + "  ".join(f"{name}: ratio, end to end, host ms/step" for name in columns))
    first = next(iter(samples.values()))[0]
    for i, point in enumerate(first):
        figure = {key: point[key] for key in ("mix", "rows", "device_ms")}
        for name in columns:
            figure[name] = {key: statistics.median(s[i][key] for s in samples[name])
                            for key in ("ratio", "end_to_end", "host_ms_per_step")}
        rows.append(figure)
        print(f"{figure['mix']:>28} {figure['rows']:>5} {figure['device_ms']:>9g}  " + "  ".join(
            f"{figure[name]['ratio']:>6.2f} {figure[name]['end_to_end']:>6.2f} {figure[name]['host_ms_per_step']:>7.2f}"
            for name in columns))
    result = {"tokens": args.tokens, "rounds": args.rounds, "columns": list(columns), "medians": rows,
              "samples": samples, "torch_threads": 1}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
