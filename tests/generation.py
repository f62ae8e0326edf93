"""In-process generation helpers shared by the engine tests: jobs from /chat payloads, a batcher run, and
transformers' own greedy generation as the reference."""

from __future__ import annotations

import asyncio

import torch

from predictor.api.chat.mapping import to_generation_job
from predictor.api.chat.schema import parse_chat_request
from predictor.engine.scheduling.batcher import Batcher
from predictor.engine.options import Limits
from predictor.engine.model.runner import Engine
from predictor.engine.model.loading import LoadSpec, load_engine


def reserved_engine(model_dir, rows: int = 32, **spec) -> Engine:
    """A loaded engine with its KV cache reserved, as the server prepares it."""
    engine = load_engine(LoadSpec(str(model_dir), **spec))
    engine.reserve(rows)
    return engine


def make_job(engine: Engine, prompt, **kwargs):
    seed = kwargs.pop("seed", None)
    request = parse_chat_request({"prompt": prompt, "seed": seed, "generate_kwargs": kwargs})
    return to_generation_job(request, engine.encode(prompt), engine.info, Limits())


def run(engine: Engine, jobs, *, max_batch_size: int = 32, stagger_s: float = 0.0, **batcher_kwargs):
    """Submit ``jobs`` (optionally one by one, ``stagger_s`` apart) and return their results in order."""
    async def main():
        batcher = Batcher(engine, max_batch_size=max_batch_size, **batcher_kwargs)
        batcher.start()
        tickets = []
        for job in jobs:
            tickets.append(batcher.submit(job))
            if stagger_s:
                await asyncio.sleep(stagger_s)
        results = await asyncio.gather(*(t.result() for t in tickets))
        batcher.close()
        return results
    return asyncio.run(main())


def generated(result) -> list[list[int]]:
    return [list(seq.token_ids) for seq in result.sequences]


def hf_greedy(model, prompt_ids: list[int], **kwargs) -> list[int]:
    """transformers' greedy ``generate`` on its own forward and cache: the reference every path must match."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=11, **kwargs)
    return out[0, ids.shape[1]:].tolist()
