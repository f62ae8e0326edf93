"""HTTP: the /chat and health routes on KServe's app, request guards, error responses, and graceful drain.

Every ``PredictorError`` becomes a JSON response here and nowhere else::

    {"detail": "...", "error": "...", "error_type": "invalid_request", "param": "generate_kwargs.top_p"}

``detail`` is what the Falcon /chat clients read; ``error``/``error_type`` follow text-generation-inference.
The OpenAI-compatible routes (``openai_api``) answer the same errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import signal
import time
from http import HTTPStatus
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve import ModelServer
from starlette.exceptions import HTTPException

from .. import metrics
from ..config import ServerConfig
from ..errors import BodyTooLarge, Draining, ModelNotFound, NotFound, NotReady, PredictorError, Unauthorized
from .model import Completion, FalconModel
from .openai_api import install_openai_routes
from .schema import decode_json_body, parse_chat_request
from .streaming import stream_chat, unless_disconnected

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/healthz", "/livez", "/metrics", "/v2/health/", "/docs", "/openapi.json")
# The model name in KServe's model routes: /v1/models/<name>[:verb], /v2/models/<name>[/...].
MODEL_PATH = re.compile(r"^/v[12]/models/([^/:]+)")


def install(app: FastAPI, model: FalconModel, config: ServerConfig) -> None:
    """Add this server's routes, guards and error handlers to KServe's app (before the server starts)."""
    app.add_exception_handler(PredictorError, predictor_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)  # unknown routes and methods: 404, 405
    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=config.api_key, model=model)

    @app.get("/", tags=["falcon"], summary="Liveness in both shapes: KServe's and the replaced service's")
    async def root() -> dict[str, str]:
        return {"status": "alive", "message": "Server is running"}

    @app.post("/chat", tags=["falcon"], summary="Generate text for a prompt (the Falcon /chat API)")
    async def chat(request: Request) -> Any:
        return await _chat(request, model, "/chat")

    # Added before KServe adds its own route for this path, so this one answers: the same strict decoding,
    # errors and streaming as /chat (KServe's decodes the body itself, losing duplicate keys, and cannot stream).
    @app.post("/v1/models/{model_name}:predict", tags=["falcon"], summary="The /chat API on KServe's v1 route")
    async def predict(model_name: str, request: Request) -> Any:
        if model_name != model.name:
            raise _unknown_model(model_name, model.name)
        return await _chat(request, model, "/v1/models/:predict")

    async def health() -> JSONResponse:
        state = health_state(model)
        return JSONResponse({"status": state}, status_code=200 if state == "Healthy" else 503)

    for path in ("/health", "/healthz"):
        app.add_api_route(path, health, methods=["GET"], tags=["falcon"],
                          summary="200 once the model is loaded and serving; 503 while loading or draining")

    @app.get("/livez", tags=["falcon"],
             summary="200 unless the engine has been broken for --dead_after seconds (then restart the pod)")
    async def livez() -> JSONResponse:
        broken_for = model.batcher.unhealthy_for if model.batcher is not None else 0.0
        if broken_for > config.dead_after_s:
            return JSONResponse({"status": "Dead", "unhealthy_seconds": round(broken_for)}, status_code=503)
        return JSONResponse({"status": "Alive"})

    install_openai_routes(app, model)


def health_state(model: FalconModel) -> str:
    if model.draining:
        return "Draining"
    if not model.ready:
        return "Loading"
    if model.batcher is not None and not model.batcher.healthy:
        return "Unhealthy"
    return "Healthy"


async def _chat(request: Request, model: FalconModel, route: str) -> Any:
    try:
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        chat_request = parse_chat_request(decode_json_body(await request.body()))
        job = await model.prepare(chat_request)
        ticket = model.submit(job, stream=chat_request.stream)
        if chat_request.stream:
            return stream_chat(model, job, ticket)
        finished, result = await unless_disconnected(request, ticket.result())
    except PredictorError as exc:
        metrics.REQUESTS.labels(route, exc.error_type).inc()
        raise
    if not finished:
        ticket.cancel()
        metrics.REQUESTS.labels(route, "cancelled").inc()
        return JSONResponse({"detail": "client disconnected"}, status_code=499)
    metrics.REQUESTS.labels(route, "success").inc()
    return model.to_response(Completion(job, result))


async def predictor_error_handler(_: Request, exc: PredictorError) -> JSONResponse:
    return error_response(exc)


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (method not allowed), in this server's error shape."""
    error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail
    if message == HTTPStatus(exc.status_code).phrase:  # Starlette's default: say which route and method
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
        message = (f"{request.url.path} does not accept {request.method}; it accepts {allowed}" if allowed else
                   f"{request.method} {request.url.path} is not a route of this server")
    body = {"detail": message, "error": message, "error_type": error_type, "param": None}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _not_ready(model: FalconModel) -> PredictorError:
    if model.draining:
        return Draining(f"model {model.name} is draining: the server is shutting down")
    return NotReady(f"model {model.name} is not loaded yet")


def _unknown_model(requested: str, served: str) -> ModelNotFound:
    return ModelNotFound(f"model {requested} is not served here; this server serves {served}")


def error_response(exc: PredictorError) -> JSONResponse:
    if exc.status >= 500 and exc.status != 503:  # 503 (loading, draining) is a state to wait out, not a fault
        logger.error("%s: %s", exc.error_type, exc.message)
    body = {"detail": exc.message, "error": exc.message, "error_type": exc.error_type, "param": exc.param}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


class RequestGuard:
    """ASGI middleware: optional bearer-token auth on inference routes, 404 for a model this server does not
    serve, 503 for a readiness probe while the model loads or drains, and a body-size limit (413) enforced before
    the body is parsed, with or without Content-Length."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None, model: FalconModel) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.model = model

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.api_key is not None and _needs_auth(path) and not self._authorized(headers):
            return await error_response(Unauthorized(
                "this route needs 'Authorization: Bearer <api key>'"))(scope, receive, send)
        if path.startswith("/v2/repository/"):
            # KServe's model-repository routes would let any client unload the one model this server exists for.
            return await error_response(NotFound("model repository operations are disabled: this server "
                                                 "serves one model, loaded at start-up"))(scope, receive, send)
        named = MODEL_PATH.match(path)
        if named:
            # Answered here because KServe's handlers for its ModelNotFound and ModelNotReady log an ERROR with a
            # traceback: a client asking for a model this server does not have, or a probe while it loads, is not
            # a server fault.
            if named.group(1) != self.model.name:
                return await error_response(_unknown_model(named.group(1), self.model.name))(scope, receive, send)
            if not self.model.ready and _is_readiness(path):
                return await error_response(_not_ready(self.model))(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyLimitExceeded()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyLimitExceeded:
            await self._too_large(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, scope, receive, send) -> None:
        await error_response(BodyTooLarge(f"the request body is larger than this server's limit of "
                                          f"{self.max_body_bytes} bytes"))(scope, receive, send)


class _BodyLimitExceeded(Exception):
    pass


def _needs_auth(path: str) -> bool:
    return path != "/" and not path.startswith(OPEN_PATHS) and not _is_readiness(path)


def _is_readiness(path: str) -> bool:
    # GET /v1/models/<name> and /v2/models/<name>/ready are probes; :predict and /infer are inference.
    return (path.startswith("/v1/models") and ":" not in path) or path.endswith("/ready")


class FalconModelServer(ModelServer):
    """KServe's model server with a graceful drain on SIGTERM: readiness turns 503 at once, new requests get
    503, in-flight requests finish (up to ``drain_timeout_s``), then the process exits 0."""

    def __init__(self, model: FalconModel, drain_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model = model
        self._drain_timeout_s = drain_timeout_s

    def register_signal_handler(self) -> None:
        super().register_signal_handler()
        uvicorn_server = self._rest_server._server  # uvicorn installs its own handlers while it serves
        stop_uvicorn = uvicorn_server.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            if sig != signal.SIGTERM or self._model.draining:
                return stop_uvicorn(sig, frame)
            logger.info("SIGTERM: draining (%d request(s) in flight)", self._in_flight())
            begin_drain(self._model)
            asyncio.get_event_loop().create_task(
                _after_drain(self._model, self._drain_timeout_s, lambda: stop_uvicorn(sig, frame)))

        uvicorn_server.handle_exit = handle_exit

    def _in_flight(self) -> int:
        return self._model.batcher.in_flight if self._model.batcher else 0


def begin_drain(model: FalconModel) -> None:
    model.draining = True
    model.ready = False  # KServe's readiness routes answer 503 from now on
    if model.batcher is not None:
        model.batcher.close()


async def _after_drain(model: FalconModel, timeout_s: float, then: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while model.batcher is not None and model.batcher.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    logger.info("Drained; stopping the server")
    then()


