"""A completions request's prompts: OpenAI's four shapes as texts with their token ids, and their answers' streams
merged into one in OpenAI's choice order.

OpenAI's completions API (and vLLM's) takes a string, a list of strings, a list of token ids or a list of lists of
token ids. Token ids are generated from as they are, never decoded and encoded again (lm-evaluation-harness sends
them so that the log-likelihoods it reads are of exactly its tokens); their text is what an echo shows. Every
prompt is a job of its own in the shared batch, and choice ``index`` is prompt x ``n`` + sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import aclosing
from typing import AsyncIterator, Callable

from ...engine.options import ModelInfo
from ..encoding import encode_text
from ..generation import token_ids
from ..streaming import TextDelta

_END = object()  # a merged stream's end marker


async def prompt_texts_and_ids(prompts: list[tuple[str, str | list[int]]], encode: Callable[[str], list[int]],
                               decode: Callable[[list[int]], str], model: ModelInfo) -> list[tuple[str, list[int]]]:
    """Each prompt's text and token ids, from ``(param, prompt)`` pairs: a text is encoded (off the event loop:
    prompts can be long), token ids are checked against the vocabulary (a 400 naming ``param``, ``prompt[1]``) and
    decoded for their text."""
    resolved = []
    for param, prompt in prompts:
        if isinstance(prompt, str):
            resolved.append((prompt, await encode_text(encode, prompt)))
        else:
            ids = list(token_ids(prompt, param, model))
            resolved.append((decode(ids), ids))
    return resolved


async def merge_streams(streams: list[AsyncIterator[TextDelta]], n: int) -> AsyncIterator[TextDelta]:
    """The deltas of every prompt's stream as they come, each re-indexed as choice prompt x ``n`` + sequence. An
    error in one stream ends the merged one with it; closing the merged stream closes every stream (which cancels
    its ticket)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(prompt: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put(dataclasses.replace(delta, index=prompt * n + delta.index))
            await queue.put(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(prompt, stream)) for prompt, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
