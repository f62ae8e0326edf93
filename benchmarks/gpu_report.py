"""The GPU run's figures beside their floors, and its Markdown.

Floors are the H200's: a decode step cannot be faster than reading every weight once (HBM3e, ~4.8 TB/s), a
prefill not faster than its matrix products at the dense bfloat16 peak (~989 TFLOP/s, 2 FLOPs per parameter per
token), and a batch of B sequences not faster than B tokens per weight read or the peak's tokens per second.
The dry run's figures are compared with the same floors: it shows the arithmetic works, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

H200_BYTES_PER_S = 4.8e12
H200_BF16_FLOPS = 989e12
MODELS = ("falcon-7b", "falcon-40b")
# The tensor-parallel side is held to the same floors, one GPU's: its own bound (each GPU reads half the weights)
# is half of them.
TP_RANKS = 2
SIDES = (("direct", "-direct"), ("server", "-server"), ("server --compile", "-server-compile"),
         (f"server --tensor_parallel_size {TP_RANKS}", "-server-tp"))


@dataclass(frozen=True)
class Floors:
    """The H200's limits for a model of ``parameters`` weights that take ``weights_bytes``."""

    parameters: int
    weights_bytes: int

    @property
    def decode_ms(self) -> float:
        return self.weights_bytes / H200_BYTES_PER_S * 1000

    def prefill_ms(self, tokens: int) -> float:
        return max(self.decode_ms, 2 * self.parameters * tokens / H200_BF16_FLOPS * 1000)

    def tokens_per_s(self, batch: int) -> float:
        return min(batch * 1000 / self.decode_ms, H200_BF16_FLOPS / (2 * self.parameters))


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured figure as a row: model, figure, side, value, unit, and the floor it is held against."""
    return [row for model in MODELS for row in _model_rows(model, results["stages"])]


def _model_rows(model: str, stages: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    weights = stages.get(f"{model}-direct", {}).get("weights")
    limit = Floors(weights["parameters"], weights["bytes"]) if weights else None

    def add(figure: str, side: str, value: float, unit: str, floor: float | None) -> None:
        rows.append(dict(model=model, figure=figure, side=side, value=value, unit=unit, floor=floor,
                         vs_floor=value / floor if floor else None))

    kv = stages.get(f"{model}-direct", {}).get("kv_cache")
    if kv:
        # the bound here is a cache of the K/V heads alone (vLLM's and TGI's); transformers may store more
        add(f"KV cache bytes per token ({kv['cached_heads']} heads stored; bound: {kv['kv_heads']} K/V heads)",
            "direct", kv["bytes_per_token_stored"], "B", kv["bytes_per_token_kv_heads"])
        add(f"full {kv['context_tokens']}-token sequences in the {kv['free_memory_kind']} memory left "
            "(bound: K/V heads alone)", "direct", kv["full_sequences_fit_stored"], "sequences",
            kv["full_sequences_fit_kv_heads"])
    for side, suffix in SIDES:
        stage = stages.get(model + suffix, {})
        single = stage.get("single_stream")
        if single:
            add("decode ms/token, batch 1", side, single["decode_ms_per_token"], "ms",
                limit and limit.decode_ms)
            add("ms/token over a request, batch 1", side, single["ms_per_token"], "ms",
                limit and limit.decode_ms)
        for row in stage.get("ttft", []):
            add(f"time to first token, {row['prompt_tokens']} prompt tokens", side, row["ms"], "ms",
                limit and limit.prefill_ms(row["prompt_tokens"]))
        for row in stage.get("throughput", []):
            batch = row.get("batch", row.get("concurrency"))
            add(f"generated tokens/s at {batch} sequences", side, row["tokens_per_s"], "tokens/s",
                limit and limit.tokens_per_s(batch))
        if "ready_seconds" in stage:
            add("ready after start", side, stage["ready_seconds"], "s", None)
        if "compile" in stage:
            add(f"compiling {stage['compile']['shapes']} decode-step shapes (server log)", side,
                stage["compile"]["seconds"], "s", None)
        if "memory_after_ready" in stage:
            memory = stage["memory_after_ready"]
            add(f"{memory['kind']} memory when ready", side, memory["bytes"] / 2**30, "GiB",
                weights and weights["bytes"] / 2**30)
    return rows

def format_results(results: dict[str, Any]) -> str:
    """The whole run as Markdown: where it ran, each stage's status, then every figure beside its floor."""
    machine, plan = results["machine"], results["plan"]
    title = "dry run: tiny shapes on the CPU, figures meaningless" if plan["dry_run"] else machine["device_name"]
    lines = [f"## GPU run ({title})", "",
             f"{machine['device_name']}; torch {machine['torch']}, transformers {machine['transformers']}, kserve "
             f"{machine['kserve']}; commit {machine['git_commit']}; started {results['started']}"
             + (f", {results['wall_seconds']:.0f} s in all" if "wall_seconds" in results else ""),
             "", "| stage | status | seconds |", "|---|---|---:|"]
    for name, stage in results["stages"].items():
        seconds = stage.get("seconds", stage.get("wall_seconds"))
        seconds = f"{seconds:.0f}" if seconds is not None else "-"
        lines.append(f"| {name} | {stage.get('status', '-')} | {seconds} |")
    tests = results["stages"].get("gpu-tests", {})
    if "passed" in tests:
        failed = tests["failures"] + tests["errors"]
        lines += ["", f"`pytest -m gpu`: {tests['passed']} passed, {failed} failed, {tests['skipped']} skipped"]
        lines += [f"- not passed: `{test}`" for test in tests.get("not_passed", [])]
    rows = results.get("summary") or summarize(results)
    for model in MODELS:
        mine = [row for row in rows if row["model"] == model]
        if not mine:
            continue
        lines += ["", f"### {model}", "", "| figure | side | measured | floor or bound | measured / floor |",
                  "|---|---|---:|---:|---:|"]
        for row in mine:
            floor = _number(row["floor"]) if row["floor"] is not None else "-"
            times = f"{row['vs_floor']:.2f}" if row["vs_floor"] is not None else "-"
            lines.append(f"| {row['figure']} | {row['side']} | {_number(row['value'])} {row['unit']} | {floor} "
                         f"| {times} |")
        lines += format_throughput(model, results["stages"])
    return "\n".join(lines)


def format_throughput(model: str, stages: dict[str, Any]) -> list[str]:
    """Generated tokens/s per batch size: generate() beside each server, the servers as a fraction of it."""
    by_side = {side: {row.get("batch", row.get("concurrency")): row["tokens_per_s"]
                      for row in stages.get(model + suffix, {}).get("throughput", [])} for side, suffix in SIDES}
    sizes = sorted(set().union(*by_side.values()))
    if not sizes:
        return []
    header = ("| sequences | generate() tok/s | server tok/s | server / generate | --compile tok/s "
              "| --compile / generate |")
    lines = ["", header, "|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        direct = by_side["direct"].get(size)
        cells = [_number(direct) if direct else "-"]
        for side in ("server", "server --compile"):
            value = by_side[side].get(size)
            cells += [_number(value) if value else "-", f"{value / direct:.2f}" if value and direct else "-"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def _number(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
