"""Strict JSON request bodies, for every protocol: invalid UTF-8, NaN/Infinity, repeated keys and deep nesting are
client errors (400), never server faults."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest


def decode_json_body(raw: bytes) -> Any:
    """Decode a request body strictly: invalid UTF-8, NaN/Infinity literals, a key repeated within one object and
    nesting deeper than about 1000 levels (no field of a request nests more than 3) are client errors, not server
    faults."""
    import orjson

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if isinstance(body, (dict, list)):
        _refuse_duplicate_keys(raw)
    return body


def _refuse_duplicate_keys(raw: bytes) -> None:
    """orjson keeps the last of repeated keys silently; the standard library's parser shows each pair, so it
    checks (only checks: orjson's result, strict about NaN and UTF-8, is the one used)."""
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except RecursionError:  # orjson allows 1024 levels, Python's parser somewhat fewer
        raise InvalidRequest("the request body is nested too deeply") from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise InvalidRequest(f"the key {key!r} appears twice in one JSON object of the request body; each key "
                                 "may appear once (parsers disagree on which value would win)", param=key)
        seen.add(key)
    return {}  # the check needs no result
