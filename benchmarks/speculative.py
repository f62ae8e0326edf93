"""Speculative decoding on the CPU, in one run, with and without it (issue 32): target forwards per generated token
and milliseconds per token at batch 1, 8 and 64, on the tiny 7B-shaped Falcon, through the real batcher.

Workloads, each generating ``--tokens`` greedy tokens per sequence (``min_new_tokens`` holds every sequence to it):

(a) **n-gram on repetitive input**: prompts on which the tiny model's greedy output falls into loops that prompt
    lookup can draft (a random model copies nothing from its input; its loops are what n-gram drafting can find).
(b) **the target's own output as drafts**: what a draft model equal to the target would propose, without the draft
    model's own cost: the mechanism's ceiling (k + 1 tokens per forward); and **a draft model equal to the target**
    (``draft_model``: a second engine on the same checkpoint, drafting greedily), whose own forwards count in the
    CPU time but not as target forwards.
(c) **drafts that always fail** (each token of the output + 1): what speculation costs when it cannot help; the
    back-off must keep it within 5 % of speculation off at every batch. ``(c) without back-off`` drafts k tokens
    every step whatever happened, to show what the back-off saves.

(a) and (c) run with the server's defaults (``disable_by_batch_size`` included: above it no step speculates). For
(b) the threshold is lifted, and its sweep over batch sizes shows where verifying k more tokens per sequence stops
paying on this CPU even when every draft is right: the measurement behind ``DISABLE_BY_BATCH_SIZE``.

    python benchmarks/speculative.py                 # about two minutes
    python benchmarks/speculative.py --tokens 64 --repeats 1

Figures on a shared machine are noisy: compare the columns of one run, never figures of two runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from predictor import metrics  # noqa: E402
from predictor.api.chat.mapping import to_generation_job  # noqa: E402
from predictor.api.chat.schema import parse_chat_request  # noqa: E402
from predictor.engine.model.runner import Engine  # noqa: E402
from predictor.engine.model.loading import LoadSpec, load_engine  # noqa: E402
from predictor.engine.options import Limits, SpeculativeConfig  # noqa: E402
from predictor.engine.sampling.speculation import DraftLength  # noqa: E402
from predictor.engine.scheduling.batcher import Batcher  # noqa: E402
from predictor.engine.scheduling.drafting import DraftModel  # noqa: E402
from predictor.engine.scheduling.speculating import Speculator  # noqa: E402
from predictor.tiny import build_tiny_falcon  # noqa: E402
from report import machine_info, write_results  # noqa: E402

# (a)'s prompts: those on which the tiny 7B-shaped Falcon's greedy output loops soonest (found by running prompt
# lookup over its greedy output for a few hundred prompts of the tokenizer's corpus words)
LOOPING = ("line. line. line. line. line. line.", "an an an an an an", "true help", "it returns the",
           "can the base", "or or or or or or")
K = 4
BATCHES = (1, 8, 64)
SWEEP = (1, 8, 16, 32, 64)


def jobs(engine: Engine, prompts: list[str], tokens: int) -> list:
    kwargs = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
    return [to_generation_job(parse_chat_request({"prompt": p, "generate_kwargs": kwargs}), engine.encode(p),
                              engine.info, Limits()) for p in prompts]


def generate(engine: Engine, job_list: list, speculator: Speculator | None) -> tuple[float, int, list[list[int]]]:
    """CPU seconds the decode worker's steps took (its thread's time, one torch thread: forwards, token choice,
    drafting and host work), target forwards (``Engine.step`` calls) and each job's tokens, all jobs submitted at
    once. The worker's CPU time rather than wall time: on a shared machine it is far less disturbed by other
    processes."""
    forwards, cpu = 0, 0.0
    step = engine.step

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return step(*args, **kwargs)

    async def main():
        batcher = Batcher(engine, max_batch_size=len(job_list), speculator=speculator)
        batch_step = batcher._batch.step

        def timed_step():
            nonlocal cpu
            started = time.thread_time()
            batch_step()
            cpu += time.thread_time() - started
        batcher._batch.step = timed_step
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(job).result() for job in job_list))
        batcher.close()
        return results
    engine.step = counted
    try:
        results = asyncio.run(main())
    finally:
        del engine.step
    return cpu, forwards, [list(r.sequences[0].token_ids) for r in results]


class Unrelenting(Speculator):
    """Drafts k tokens for every sequence every step (up to the batch threshold), however its drafts fared:
    speculation without the per-sequence back-off."""

    def lengths(self, decoding):
        if len(decoding) > self.config.disable_by_batch_size:
            return {}
        for seq in decoding:  # what the step records into, ignored here
            seq.draft_length = seq.draft_length or DraftLength(self.config.num_speculative_tokens)
        return {id(seq): self.config.num_speculative_tokens for seq in decoding}


def known_drafts(truth: dict[tuple[int, ...], list[int]], shift: int) -> Callable:
    """Drafts from each prompt's known output, each token + ``shift`` (0: right, 1: always wrong)."""
    def propose(seq, k: int) -> list[int]:
        known = truth[tuple(seq.tokens[:seq.prompt_len])][len(seq.generated):][:k]
        return [token + shift for token in known]
    return propose


def measure(engine: Engine, prompts: list[str], tokens: int, repeats: int,
            speculators: dict[str, Callable[[dict], Speculator | None]]) -> dict[str, dict[str, Any]]:
    """Each speculator's best seconds over ``repeats`` runs (the run least disturbed by the machine's other load),
    interleaved, in turn first and last; every run's output must equal speculation off's. Also the draft tokens
    verified per generated token: what speculation computed on top, whatever the timings' noise."""
    runs: dict[str, list[float]] = {name: [] for name in speculators}
    forwards: dict[str, int] = {}
    drafted: dict[str, float] = {}
    truth: dict[tuple[int, ...], list[int]] = {}
    for repeat in range(repeats):
        for name in list(speculators)[::-1 if repeat % 2 else 1]:
            job_list = jobs(engine, prompts, tokens)
            before = metrics.SPEC_DECODE_DRAFT_TOKENS._value.get()
            seconds, count, outputs = generate(engine, job_list, speculators[name](truth))
            drafted[name] = (metrics.SPEC_DECODE_DRAFT_TOKENS._value.get() - before) / (tokens * len(prompts))
            if name == "off":
                truth.update({tuple(job.prompt_ids): out for job, out in zip(job_list, outputs)})
                reference = outputs
            elif outputs != reference:
                raise AssertionError(f"{name}: speculation changed the output")
            runs[name].append(seconds)
            forwards[name] = count
    rows = {}
    for name, seconds in runs.items():
        best = min(seconds)
        rows[name] = dict(seconds=best, all_seconds=seconds, forwards=forwards[name],
                          draft_tokens_per_token=drafted[name],
                          # per sequence; at batch > 1 the batch's forwards, so its slowest sequence's
                          tokens_per_forward=tokens / forwards[name],
                          ms_per_token=1000 * best / tokens)  # CPU time per token, as a stream sees it
    return rows


def config(**kwargs) -> SpeculativeConfig:
    return SpeculativeConfig(num_speculative_tokens=K, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (the best reported)")
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speculative-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_falcon(Path(tmp) / "tiny", "7b")
        engine = load_engine(LoadSpec(str(checkpoint), device="cpu"))
        draft = load_engine(LoadSpec(str(checkpoint), device="cpu"))
    engine.reserve(max(SWEEP) + 1)
    draft.reserve(max(SWEEP) + 1)
    generate(engine, jobs(engine, ["warm up"] * max(SWEEP), args.tokens), None)  # allocator and lazy set-up
    workloads = {
        "(a) n-gram": {"off": lambda truth: None,
                       "on": lambda truth: Speculator(config(prompt_lookup_min=1, prompt_lookup_max=3))},
        "(b) own output": {"off": lambda truth: None,
                           "on": lambda truth: Speculator(config(disable_by_batch_size=max(SWEEP)),
                                                          known_drafts(truth, 0))},
        "(b) draft model = target": {
            "off": lambda truth: None,
            "on": lambda truth: Speculator(config(method="draft_model", model="the target",
                                                  disable_by_batch_size=max(SWEEP)), propose_all=DraftModel(draft))},
        "(c) always fail": {"off": lambda truth: None,
                            "on": lambda truth: Speculator(config(), known_drafts(truth, 1)),
                            "on, no back-off": lambda truth: Unrelenting(config(), known_drafts(truth, 1))},
    }
    results: dict[str, Any] = dict(machine=machine_info("cpu", REPO), k=K, tokens=args.tokens,
                                   repeats=args.repeats, workloads={})
    lines = ["| workload | batch | off: CPU ms/token | on: CPU ms/token | on vs off | off: tokens/forward | "
             "on: tokens/forward | on: drafts verified/token | no back-off: CPU ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, speculators in workloads.items():
        if workload[1] not in args.workloads:
            continue
        batches = SWEEP if workload == "(b) own output" else BATCHES
        for batch in batches:
            prompts = [LOOPING[i % len(LOOPING)] for i in range(batch)]
            rows = measure(engine, prompts, args.tokens, args.repeats, speculators)
            results["workloads"].setdefault(workload, {})[batch] = rows
            off, on = rows["off"], rows["on"]
            unrelenting = rows.get("on, no back-off")
            line = (f"| {workload} | {batch} | {off['ms_per_token']:.2f} | {on['ms_per_token']:.2f} | "
                    f"{on['seconds'] / off['seconds'] - 1:+.1%} | {off['tokens_per_forward']:.2f} | "
                    f"{on['tokens_per_forward']:.2f} | {on['draft_tokens_per_token']:.3f} | "
                    + (f"{unrelenting['ms_per_token']:.2f} |" if unrelenting else "- |"))
            lines.append(line)
            print(line, flush=True)
    table = "\n".join(lines)
    write_results(results, table, args.out)
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
