"""How much of each step the host adds to the device's time, with the device emulated: this checkout against an
earlier commit, in one run.

The real batcher serves real requests (sampled with top-k and top-p, half of them streamed and detokenized on the
event loop as the API does, half with a stop string, 64 tokens each); only ``Engine.step`` is replaced, by a device
that takes a set time per step. Its launch returns at once; the host waits for it, with the GIL released, where it
reads the step's tokens back (``DecodeBatch._read_back``), until the device time since the launch has passed, as a
GPU read-back would. A tree without that read-back (the engine before issue 30) waits inside the step: it launches
and reads back at once, as it did. Step wall time / device time is 1.0 when the host never keeps the device waiting.

    python benchmarks/emulated_device.py                   # 1/32/128/256/512 rows x 3/8 ms, against main's engine
    python benchmarks/emulated_device.py --rows 256 --device-ms 8 --rounds 3

Figures on a shared machine are noisy: compare the two columns of one run, never figures of two runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

REPO = Path(__file__).resolve().parent.parent
BEFORE = "f59233f"  # the engine before issue 30: token choice per row on the host, serial steps
PROMPT = "Once upon a time, in a land far away, the falcon"
STOP = "zq zq zq"  # a stop string the emulated tokens practically never complete: it costs its checks, every step


class EmulatedDevice:
    """Stands in for ``Engine.step``: a device that runs each step for ``device_s`` after the one before it. The
    tokens chosen from a step's logits are ready when that step ends; reading them back waits until then."""

    def __init__(self, engine, batch_type) -> None:
        import torch

        self.engine, self.device_s = engine, 0.0
        self.ends: list[float] = [0.0]  # when each launched step ends on the device
        self.steps, self.waited = 0, 0.0
        self.logits = torch.randn(4096, engine.info.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
        self._offset = 0
        self._ready: dict[int, float] = {}  # id(tokens tensor) -> when the step it was chosen from ends
        engine.step = self.step
        self.waits_at_read_back = hasattr(batch_type, "_read_back")
        if self.waits_at_read_back:
            read_back, choose = batch_type._read_back, batch_type._choose_tokens

            def waiting_read_back(batch, tokens):
                self.wait(self._ready.pop(id(tokens), self.ends[-1]))
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

    def wait(self, until: float) -> None:
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
            self.waited += delay


def measure(model_dir: str, rows: list[int], device_ms: list[float], tokens: int) -> list[dict]:
    """Step wall time / device time and the host's time per step, for each number of rows and device time (run in
    a child process, on the tree first on its path)."""
    import asyncio

    import torch

    from predictor.api.chat.mapping import to_generation_job
    from predictor.api.chat.schema import parse_chat_request
    from predictor.engine.model.runner import LoadSpec, load_engine
    from predictor.engine.options import Limits
    from predictor.engine.scheduling.batcher import Batcher
    from predictor.engine.scheduling.decoding import DecodeBatch

    torch.set_num_threads(1)
    engine = load_engine(LoadSpec(model_dir))
    engine.reserve(max(rows))
    device = EmulatedDevice(engine, DecodeBatch)
    prompt_ids = engine.encode(PROMPT)

    def job(i: int):
        kwargs = {"do_sample": True, "top_k": 50, "top_p": 0.9, "max_new_tokens": tokens, "min_new_tokens": tokens}
        if i % 2:
            kwargs["stop_strings"] = [STOP]
        return to_generation_job(parse_chat_request({"prompt": PROMPT, "generate_kwargs": kwargs}), prompt_ids,
                                 engine.info, Limits())

    async def consume(batcher: Batcher, i: int) -> None:
        ticket = batcher.submit(job(i), stream=i % 4 < 2)
        if i % 4 < 2:  # streamed: detokenized as it comes, as the API's streams are
            ids = []
            async for event in ticket.events():
                if event.token_id is not None:
                    ids.append(event.token_id)
                    engine.tokenizer.decode(ids[-8:])
        await ticket.result()

    async def serve(n: int) -> float:
        batcher = Batcher(engine, max_batch_size=n, max_queue=n, prefix_caching=False)
        batcher.start()
        await asyncio.gather(*(consume(batcher, i) for i in range(n)))  # warm-up
        device.steps, device.waited, device.ends = 0, 0.0, device.ends[-1:]
        started = time.perf_counter()
        await asyncio.gather(*(consume(batcher, i) for i in range(n)))
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed

    figures = []
    for n in rows:
        for ms in device_ms:
            device.device_s = ms / 1e3
            elapsed = asyncio.run(serve(n))
            per_step = elapsed / device.steps
            figures.append({"rows": n, "device_ms": ms, "steps": device.steps, "ratio": per_step / device.device_s,
                            "host_ms_per_step": (elapsed - device.waited) / device.steps * 1e3})
    return figures


def run_child(source: Path, model_dir: str, args: argparse.Namespace) -> list[dict]:
    code = (f"import sys, json; sys.path.insert(0, {str(source)!r}); sys.path.insert(1, {str(REPO / 'benchmarks')!r});"
            f"import emulated_device as e; print(json.dumps(e.measure({model_dir!r}, {args.rows!r}, "
            f"{args.device_ms!r}, {args.tokens})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the child on {source} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the git commit whose engine is the baseline")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128, 256, 512], help="requests run together")
    parser.add_argument("--device-ms", type=float, nargs="+", default=[3.0, 8.0], help="the device's time per step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per engine (medians are reported)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "emulated-device.json"))
    args = parser.parse_args()

    from predictor.tiny import build_tiny_falcon

    with tempfile.TemporaryDirectory(prefix="emulated-device-") as tmp:
        model_dir = str(build_tiny_falcon(Path(tmp) / "tiny-falcon-7b", "7b"))
        before = report.package_at(args.before, Path(tmp) / "before")
        samples: dict[str, list[list[dict]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name, source in (("before", before), ("after", REPO)):  # in turns: the machine's drifts hit both
                samples[name].append(run_child(source, model_dir, args))
    rows = []
    print(f"{'rows':>5} {'device ms':>9} {'before ratio':>12} {'after ratio':>11} {'before host ms':>14} "
          f"{'after host ms':>13}")
    for i, point in enumerate(samples["after"][0]):
        figure = {"rows": point["rows"], "device_ms": point["device_ms"]}
        for name in ("before", "after"):
            figure[f"{name}_ratio"] = statistics.median(s[i]["ratio"] for s in samples[name])
            figure[f"{name}_host_ms_per_step"] = statistics.median(s[i]["host_ms_per_step"] for s in samples[name])
        rows.append(figure)
        print(f"{figure['rows']:>5} {figure['device_ms']:>9g} {figure['before_ratio']:>12.2f} "
              f"{figure['after_ratio']:>11.2f} {figure['before_host_ms_per_step']:>14.2f} "
              f"{figure['after_host_ms_per_step']:>13.2f}")
    result = {"before": args.before, "tokens": args.tokens, "rounds": args.rounds, "medians": rows,
              "samples": samples, "torch_threads": 1}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
