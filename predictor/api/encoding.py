"""A request's text to token ids, on the event loop when that is cheaper than leaving it.

Encoding a short prompt takes about 0.1 ms; sending it to a worker thread and back costs more than that, and
hands the GIL around twice, each time on a busy server waiting for the decode worker to let it go. A long text
(past ``INLINE_CHARS``: about 1.5 ms to encode) goes to a worker thread, so the event loop can interleave other
requests while it is encoded.
"""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

INLINE_CHARS = 4096

T = TypeVar("T")


async def encode_text(encode: Callable[..., T], text: str, *args: object, **kwargs: object) -> T:
    """``encode(text, *args, **kwargs)``: here for a short text, on a worker thread for a long one."""
    if len(text) <= INLINE_CHARS:
        return encode(text, *args, **kwargs)
    return await asyncio.to_thread(encode, text, *args, **kwargs)
