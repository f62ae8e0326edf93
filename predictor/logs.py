"""Log lines that name the request they are about, as text or as JSON.

The request id lives in a context variable (``REQUEST_ID``), set by the API's middleware for the duration of one
request; asyncio tasks and ``asyncio.to_thread`` copy the context, so every log line written while serving it —
ours, KServe's and uvicorn's access line — carries it as the record attribute ``request_id`` (``-`` outside one).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Iterable

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(process)s %(name)s %(levelname)s [%(request_id)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LOG_FORMATS = ("text", "json")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (a filter on a handler sees every record it writes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, request_id, message, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def name_requests(loggers: Iterable[str], log_format: str) -> None:
    """Make every handler of ``loggers`` add the request id and write ``log_format`` ("text" or "json") lines.
    Call it after KServe configured logging (``ModelServer()`` does), which would replace these handlers."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT, DATE_FORMAT)
    handlers = {handler for name in loggers for handler in logging.getLogger(name).handlers}  # some are shared
    for handler in handlers:
        handler.addFilter(RequestIdFilter())
        if log_format == "json" or not _is_access_log(handler):
            handler.setFormatter(formatter)
        else:  # uvicorn's access line keeps its own fields (client, request line, status) and gains the id
            handler.setFormatter(_access_text_formatter())


def _is_access_log(handler: logging.Handler) -> bool:
    from uvicorn.logging import AccessFormatter

    return isinstance(handler.formatter, AccessFormatter)


def _access_text_formatter() -> logging.Formatter:
    from uvicorn.logging import AccessFormatter

    return AccessFormatter('%(asctime)s.%(msecs)03d %(name)s %(levelprefix)s [%(request_id)s] %(client_addr)s '
                           '"%(request_line)s" %(status_code)s', DATE_FORMAT)
