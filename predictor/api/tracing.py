"""Each request's id: the client's ``X-Request-ID`` when it sends a usable one, else a new one.

The id is set in ``logs.REQUEST_ID`` while the request is served (so every log line about it names it), comes back
in the ``X-Request-ID`` response header, and is put in error bodies (``server.error_response``, OpenAI's errors).
A client's id is cut to ``MAX_REQUEST_ID_LENGTH`` characters and anything but letters, digits and ``-._:`` is
replaced, so that it cannot forge log lines or headers.
"""

from __future__ import annotations

import random
import re

from ..logs import REQUEST_ID

HEADER = b"x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
_NAMES_SOMETHING = re.compile(r"[A-Za-z0-9]")


def request_id_from(sent: bytes | None) -> str:
    """The id to use for a request whose ``X-Request-ID`` header was ``sent`` (None: none was)."""
    text = _UNSAFE.sub("_", (sent or b"").decode("latin-1")[:MAX_REQUEST_ID_LENGTH])
    return text if _NAMES_SOMETHING.search(text) else random_hex_id()  # an id of only "_" would name nothing


def random_hex_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` gives, without its ``os.urandom`` call: that lets go of the GIL,
    and on a busy server the event loop then waits for the decode worker to hand it back, once per request."""
    return f"{random.getrandbits(128):032x}"


def current_request_id() -> str:
    return REQUEST_ID.get()


class RequestIdMiddleware:
    """ASGI middleware around this server's guards and routes: sets the request's id for everything inside it and
    adds the response header."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = next((value for name, value in scope["headers"] if name == HEADER), None)
        request_id = request_id_from(sent)
        # Not reset afterwards: uvicorn runs each request in a task of its own, whose context ends with it, and the
        # middlewares KServe adds around this one (its timing log) then name the request too.
        REQUEST_ID.set(request_id)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)
