"""HTTP connections a hostile or broken client cannot hold open: a bounded header block, a deadline for it, and
idle keep-alive connections closed.

KServe runs uvicorn with its defaults, under which a client can send headers without end (uvicorn's default parser,
httptools, buffers them all) or open a connection and send half a request line, holding it for ever: uvicorn's
only timer, ``timeout_keep_alive``, runs between requests, never before the first one or inside one's headers.
``GuardedH11Protocol`` is uvicorn's h11 protocol with both bounds:

- h11 refuses a header block still incomplete past ``h11_max_incomplete_event_size`` (so at most that and one
  read are buffered); this answers that with a 431 in the server's error shape (uvicorn would send a plain-text
  400) and closes the connection. A complete block that came in one read is measured exactly by ``RequestGuard``;
- a connection that has not sent a complete header block within ``header_timeout_s`` of its first byte (or of
  opening, for the first request) is closed.

Idle keep-alive connections are closed by uvicorn after KServe's ``--timeout-keep-alive``. The bodies that follow
the headers are bounded by ``RequestGuard`` (413).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import HeadersTooLarge, error_body


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int  # request line and headers together; past it: 431
    header_timeout_s: float  # time to send them; past it the connection is closed


def configure_connections(config: uvicorn.Config, limits: ConnectionLimits) -> None:
    """Make ``config`` (not yet loaded: before the server starts) serve with ``GuardedH11Protocol``."""
    config.http = functools.partial(GuardedH11Protocol, header_timeout_s=limits.header_timeout_s)
    config.h11_max_incomplete_event_size = limits.max_header_bytes


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Start the header deadline when a request begins; stop it once its headers are in. A connection idle
        between requests is not timed here: that is uvicorn's keep-alive timer."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._stop_header_timer()
        elif self._header_deadline is None and (self.cycle is None or self.conn.trailing_data[0]):
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_timed_out(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.warning("Closing a connection that sent no complete request headers in %g s",
                                self.header_timeout_s)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse: a 431 when the header block is what was too long."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is None or len(self.conn.trailing_data[0]) <= limit:
            return super().send_400_response(msg)
        body = orjson.dumps(error_body(HeadersTooLarge(
            f"the request's headers are larger than this server's limit of {limit} bytes")))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        response = h11.Response(status_code=431, headers=headers, reason=b"Request Header Fields Too Large")
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
