"""What the GPU run measures: transformers' ``generate`` in this process (the direct side), and ``python -m
predictor`` over HTTP (the server side). Each figure is handed to the stage's record as soon as it is measured."""

from __future__ import annotations

import asyncio
import bisect
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import bench
import httpx
import torch
from loadgen import closed_loop, start_server, stop_server

WARM_UP_TOKENS = 4  # a short generation at each new batch shape before it is timed
MARGIN_S = 5.0  # a point is skipped unless this long, or 1.5x the last point, is left of the stage's time box


# -- the direct side -------------------------------------------------------------------------------------------
def direct(plan, model_plan, model_dir: Path, record, deadline: float) -> None:
    """Load the checkpoint on the device; the KV cache's size, single stream, first tokens, batch throughput."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # device_map puts every weight, and so the random initialisation of the missing ones, straight on the device
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, plan.dtype),
                                                 device_map=plan.device, attn_implementation="sdpa").eval()
    _synchronize(plan.device)
    weights = list(model.parameters())
    record["load_seconds"] = time.monotonic() - started
    record["weights"] = dict(parameters=sum(p.numel() for p in weights),
                             bytes=sum(p.numel() * p.element_size() for p in weights),
                             devices=sorted({str(p.device) for p in weights}), dtype=plan.dtype)
    record["kv_cache"] = kv_cache_size(model, plan.device)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pad = model.config.eos_token_id
    prompts = bench.make_prompts(encode, count=max(2, *model_plan.concurrency))
    prompt_ids = [encode(prompts[0])]
    timed_generate(model, prompt_ids, WARM_UP_TOKENS, pad)
    full = median_of(plan.repeats, lambda: timed_generate(model, prompt_ids, model_plan.new_tokens, pad))
    first = median_of(plan.repeats, lambda: timed_generate(model, prompt_ids, 1, pad))
    record["single_stream"] = single_stream(full, first, model_plan.new_tokens, len(prompt_ids[0]))
    if model_plan.ttft_prompt_tokens:
        rows = []
        for target in model_plan.ttft_prompt_tokens:
            ids = [encode(prompt_of_length(encode, target))]
            timed_generate(model, ids, 1, pad)  # a new prompt width
            seconds = median_of(plan.repeats, lambda ids=ids: timed_generate(model, ids, 1, pad))
            rows.append(dict(prompt_tokens=len(ids[0]), ms=1000 * seconds))
            record["ttft"] = rows
    rows, skipped, last_s = [], [], 0.0
    for batch in model_plan.concurrency:
        if not _time_for(deadline, last_s):
            skipped.append(batch)
            record["skipped_for_time"] = dict(batches=skipped)
            continue
        started = time.monotonic()
        ids = [encode(p) for p in prompts[:batch]]
        timed_generate(model, ids, WARM_UP_TOKENS, pad)
        seconds = timed_generate(model, ids, model_plan.new_tokens, pad)
        rows.append(dict(batch=batch, seconds=seconds, tokens_per_s=batch * model_plan.new_tokens / seconds))
        record["throughput"] = rows
        last_s = time.monotonic() - started


def kv_cache_size(model, device: str) -> dict[str, Any]:
    """Bytes per token as transformers' cache holds them (a prefill's), as the K/V heads need, and how many
    full-context sequences fit in the memory the weights leave free."""
    from transformers import DynamicCache

    config = model.config
    ids = torch.full((1, 8), config.eos_token_id, device=model.device)
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    stored = sum((layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()
                 for layer in cache.layers)
    kv_heads = (config.num_kv_heads if config.new_decoder_architecture
                else 1 if config.multi_query else config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    needed = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    del cache
    free = free_memory(device)
    context = config.max_position_embeddings
    return dict(bytes_per_token_stored=stored, bytes_per_token_kv_heads=needed, kv_heads=kv_heads,
                cached_heads=stored // (2 * config.num_hidden_layers * head_dim * element),
                context_tokens=context, free_bytes_after_weights=free, free_memory_kind=_memory_kind(device),
                full_sequences_fit_stored=free // (stored * context),
                full_sequences_fit_kv_heads=free // (needed * context))


@torch.inference_mode()
def timed_generate(model, prompts: list[list[int]], new_tokens: int, pad: int) -> float:
    """Seconds for one greedy ``generate`` of exactly ``new_tokens`` tokens per row, on left-padded prompts."""
    ids, mask = bench.left_pad(prompts, pad_id=pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    _synchronize(model.device.type)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad)
    _synchronize(model.device.type)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return elapsed


# -- the server side -------------------------------------------------------------------------------------------
def server(plan, model_plan, model_dir: Path, record, deadline: float, compile: bool, ranks: int = 1) -> None:
    """``python -m predictor --model_dir`` on the checkpoint (``--tensor_parallel_size ranks``): ready time, memory,
    first tokens, single stream, closed-loop throughput per concurrency."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if compile:
        concurrency = [c for c in model_plan.concurrency if c <= model_plan.compile_max_batch_size]
        max_batch = model_plan.compile_max_batch_size
    else:  # the default batch: as many sequences as the memory holds
        concurrency, max_batch = [*model_plan.concurrency, *model_plan.server_concurrency], None
    flags = ["--drain_timeout", "5", *model_plan.server_flags] + (["--compile"] if compile else [])
    name = f"gpu-{model_plan.name}-{'compiled' if compile else 'eager'}"
    if ranks > 1:
        flags += ["--tensor_parallel_size", str(ranks)]
        name += f"-tp{ranks}"
    record["flags"] = (["--max_batch_size", str(max_batch)] if max_batch else []) + flags
    record["log"] = str(plan.workdir / f"server-{name}.log")
    before = used_memory(plan.device)
    started = time.monotonic()
    process = start_server(model_dir, name=name, dtype=plan.dtype, device=plan.device, max_batch_size=max_batch,
                           threads=None, log_dir=plan.workdir, cwd=bench.REPO, extra_args=flags)
    try:
        record["ready_seconds"] = time.monotonic() - started
        rows = re.search(r"Running up to (\d+) sequences at once", process.log_tail(20000))
        record["max_running_sequences"] = int(rows[1]) if rows else None
        compiled = re.search(r"Compiled the decode step for (\d+) shapes.* in ([\d.]+) s", process.log_tail(20000))
        if compiled:
            record["compile"] = dict(shapes=int(compiled[1]), seconds=float(compiled[2]))
        record["memory_after_ready"] = memory_delta(plan.device, before, process.process.pid)
        # the first token is a prefill, run eagerly with or without --compile: measured on the default server only
        ttft = () if compile else model_plan.ttft_prompt_tokens
        _measure_server(plan, model_plan, process.url, encode, concurrency, ttft, record, deadline)
        record["memory_after_load"] = memory_delta(plan.device, before, process.process.pid)
    finally:
        stop_server(process)


def _measure_server(plan, model_plan, url: str, encode: Callable[[str], list[int]], concurrency: list[int],
                    ttft: tuple[int, ...], record, deadline: float) -> None:
    prompts = bench.make_prompts(encode, count=max(2, *concurrency))
    with httpx.Client(base_url=url, timeout=600) as client:
        chat(client, prompts[0], WARM_UP_TOKENS)
        full = median_of(plan.repeats, lambda: chat(client, prompts[0], model_plan.new_tokens))
        first = median_of(plan.repeats, lambda: chat(client, prompts[0], 1))
        record["single_stream"] = single_stream(full, first, model_plan.new_tokens, len(encode(prompts[0])))
        if ttft:
            rows = []
            for target in ttft:
                prompt = prompt_of_length(encode, target)
                chat(client, prompt, 1)
                seconds = median_of(plan.repeats, lambda prompt=prompt: chat(client, prompt, 1))
                rows.append(dict(prompt_tokens=len(encode(prompt)), ms=1000 * seconds))
                record["ttft"] = rows
    rows, skipped, last_s = [], [], 0.0
    for workers in concurrency:
        if not _time_for(deadline, last_s):
            skipped.append(workers)
            record["skipped_for_time"] = dict(concurrency=skipped)
            continue
        started = time.monotonic()
        asyncio.run(closed_loop(url, prompts, workers, WARM_UP_TOKENS, 1, 0.0))
        load = asyncio.run(closed_loop(url, prompts, workers, model_plan.new_tokens, plan.requests_per_worker, 0.0))
        rows.append(dict(concurrency=workers, **load))
        record["throughput"] = rows
        last_s = time.monotonic() - started


def chat(client: httpx.Client, prompt: str, new_tokens: int) -> float:
    """Seconds for one greedy ``POST /chat`` of exactly ``new_tokens`` tokens."""
    body = {"prompt": prompt, "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
    start = time.perf_counter()
    response = client.post("/chat", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    assert response.json()["details"]["generated_tokens"] == [new_tokens], response.text[:300]
    return elapsed


# -- shared ----------------------------------------------------------------------------------------------------
def single_stream(full_s: float, first_s: float, new_tokens: int, prompt_tokens: int) -> dict[str, float]:
    """Per token over a whole request, and decode alone: (t(N tokens) - t(1 token)) / (N - 1)."""
    return dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, request_ms=full_s * 1000,
                ms_per_token=full_s * 1000 / new_tokens, first_token_ms=first_s * 1000,
                decode_ms_per_token=(full_s - first_s) * 1000 / (new_tokens - 1))


def prompt_of_length(encode: Callable[[str], list[int]], tokens: int) -> str:
    """Benchmark words, as few as make at least ``tokens`` tokens (found by bisection: long prompts are slow to
    grow one word at a time)."""
    words = bench.make_prompts(lambda text: text.split(), count=2, lengths=(tokens, tokens))[0].split()
    while len(encode(" ".join(words))) < tokens:
        words += words
    count = bisect.bisect_left(range(len(words) + 1), tokens, key=lambda n: len(encode(" ".join(words[:n]))))
    return " ".join(words[:count])


def _time_for(deadline: float, last_point_s: float) -> bool:
    """Whether the next point (a larger batch: longer than the last) can finish within the stage's time box."""
    return time.monotonic() + max(MARGIN_S, 1.5 * last_point_s) < deadline


def median_of(repeats: int, timed: Callable[[], float]) -> float:
    return statistics.median(timed() for _ in range(repeats))


def free_memory(device: str) -> int:
    """Bytes free on the GPU, or (the dry run) available host memory."""
    if device == "cuda":
        torch.cuda.empty_cache()  # blocks the allocator keeps from loading are free for the KV cache too
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def used_memory(device: str) -> int | None:
    """Bytes in use on the whole GPU (None on the CPU)."""
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def memory_delta(device: str, before: int | None, pid: int) -> dict[str, Any]:
    """What the server holds: GPU memory in use now less before it started, or (the dry run) its resident set."""
    if device == "cuda":
        return dict(bytes=used_memory(device) - before, kind=_memory_kind(device))
    status = Path(f"/proc/{pid}/status").read_text()
    return dict(bytes=int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024, kind=_memory_kind(device))


def _memory_kind(device: str) -> str:
    return "gpu" if device == "cuda" else "host (dry run)"


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
