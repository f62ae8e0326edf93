"""HTTP wiring: every protocol's routes and the health routes on KServe's app, request guards, error responses,
and the drain.

Every ``PredictorError`` becomes a JSON response here and nowhere else::

    {"detail": "...", "error": "...", "error_type": "invalid_request", "param": "generate_kwargs.top_p",
     "request_id": "..."}

``detail`` is what the Falcon /chat clients read; ``error``/``error_type`` follow text-generation-inference;
``request_id`` is the request's id, also in the ``X-Request-ID`` response header and in its log lines (``tracing``).
The OpenAI-compatible routes (``openai.routes``) answer the same errors in OpenAI's shape.
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
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve import ModelServer, model_server
from starlette.exceptions import HTTPException

from ..config import ServerConfig
from ..errors import (
    BodyTooLarge,
    Draining,
    EngineStopped,
    HeadersTooLarge,
    NotFound,
    NotReady,
    PredictorError,
    Unauthorized,
    error_body,
)
from .chat.routes import install_chat_routes
from .connections import ConnectionLimits, configure_connections
from .model import FalconModel, unknown_model
from .openai.lora_routes import install_lora_routes
from .openai.routes import install_openai_routes, openai_error_response, openai_paths
from .openai.tokenize import install_tokenizer_routes
from .openapi import install_openapi
from .tracing import RequestIdMiddleware, current_request_id
from .v2.routes import install_open_inference_route

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/healthz", "/livez", "/metrics", "/v2/health/", "/docs", "/openapi.json")
# After the drain: time for the cut requests to settle and the generation threads to end, then (uvicorn's graceful
# shutdown) for the answers' last bytes. Both fit in SHUTDOWN_AFTER_DRAIN_S, which the manifests count on.
STOP_WORKERS_S, SEND_GRACE_S = 5.0, 3
GENERATION_ROUTES = ("POST /chat, POST /v1/models/<name>:predict, POST /v2/models/<name>/infer (Open Inference "
                     "Protocol) and the OpenAI routes under /openai/v1/")
# The model name in KServe's model routes: /v1/models/<name>[:verb], /v2/models/<name>[/...].
MODEL_PATH = re.compile(r"^/v[12]/models/([^/:]+)")
GENERATION_VERBS = (":predict", "/infer")


def install(app: FastAPI, model: FalconModel, config: ServerConfig) -> None:
    """Add this server's routes, guards and error handlers to KServe's app (before the server starts)."""
    app.add_exception_handler(PredictorError, predictor_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)  # unknown routes and methods: 404, 405
    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, max_header_bytes=config.max_header_bytes,
                       api_key=config.api_key, model=model, openai_paths=openai_paths())
    app.add_middleware(RequestIdMiddleware)  # added last, so outermost: the guard's refusals carry the id too

    @app.get("/", tags=["falcon"], summary="Liveness in both shapes: KServe's and the replaced service's")
    async def root() -> dict[str, str]:
        return {"status": "alive", "message": "Server is running"}

    async def health() -> JSONResponse:
        state = health_state(model)
        return JSONResponse({"status": state}, status_code=200 if state == "Healthy" else 503)

    for path in ("/health", "/healthz"):
        app.add_api_route(path, health, methods=["GET"], tags=["falcon"],
                          summary="200 once the model is loaded and serving; 503 while loading or draining, or "
                                  "once the engine is broken or stopped")

    @app.get("/livez", tags=["falcon"],
             summary="200 unless the engine stopped (a worker died or hung) or has been broken for --dead_after "
                     "seconds: then restart the pod")
    async def livez() -> JSONResponse:
        batcher = model.batcher
        if batcher is not None and batcher.stopped is not None:
            return JSONResponse({"status": "Dead", "cause": batcher.stopped}, status_code=503)
        broken_for = batcher.unhealthy_for if batcher is not None else 0.0
        if broken_for > config.dead_after_s:
            return JSONResponse({"status": "Dead", "unhealthy_seconds": round(broken_for)}, status_code=503)
        return JSONResponse({"status": "Alive"})

    install_chat_routes(app, model)
    install_open_inference_route(app, model)
    install_openai_routes(app, model)
    install_tokenizer_routes(app, model)
    install_lora_routes(app, model, config)
    install_openapi(app)


def health_state(model: FalconModel) -> str:
    if model.draining:
        return "Draining"
    if not model.ready:
        return "Loading"
    if model.batcher is not None and model.batcher.stopped is not None:
        return "Stopped"
    if model.batcher is not None and not model.batcher.healthy:
        return "Unhealthy"
    return "Healthy"


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
    body = {"detail": message, "error": message, "error_type": error_type, "param": None,
            "request_id": current_request_id()}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _not_ready(model: FalconModel) -> PredictorError:
    """Why KServe's readiness routes answer 503: loading, draining, or (as /health says) the engine stopped."""
    if model.draining:
        return Draining(f"model {model.name} is draining: the server is shutting down")
    if model.batcher is not None and model.batcher.stopped is not None:
        return EngineStopped(f"model {model.name} is not served: its engine stopped ({model.batcher.stopped})")
    return NotReady(f"model {model.name} is not loaded yet")


def error_response(exc: PredictorError) -> JSONResponse:
    if exc.status >= 500 and exc.status != 503:  # 503 (loading, draining) is a state to wait out, not a fault
        logger.error("%s: %s", exc.error_type, exc.message)
    body = {**error_body(exc), "request_id": current_request_id()}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


class RequestGuard:
    """ASGI middleware: a header-size limit (431), optional bearer-token auth on inference routes, 404 for a model
    this server does not serve and for KServe routes it does not serve, 503 for a readiness probe while the model
    loads or drains or once its engine has stopped, and a body-size limit (413) enforced before the body is parsed, with or without
    Content-Length."""

    def __init__(self, app, max_body_bytes: int, max_header_bytes: int, api_key: str | None, model: FalconModel,
                 openai_paths: tuple[str, ...]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.api_key = api_key.encode() if api_key else None
        self.openai_paths = openai_paths  # where clients read OpenAI's error shape
        self.model = model

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if _header_bytes(scope) > self.max_header_bytes:
            too_large = HeadersTooLarge(f"the request's headers are larger than this server's limit of "
                                        f"{self.max_header_bytes} bytes")
            return await error_response(too_large)(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and _needs_auth(path) and not self._authorized(headers):
            refusal = Unauthorized("this route needs 'Authorization: Bearer <api key>'")
            if path.startswith(self.openai_paths):
                return await openai_error_response(refusal)(scope, receive, send)
            return await error_response(refusal)(scope, receive, send)
        if (unserved := unserved_kserve_route(path, scope["query_string"])) is not None:
            return await error_response(unserved)(scope, receive, send)
        named = MODEL_PATH.match(path)
        if named and not path.endswith(GENERATION_VERBS):  # generation routes answer (and count) these themselves
            # Answered here because KServe's handlers for its ModelNotFound and ModelNotReady log an ERROR with a
            # traceback: a client asking for a model this server does not have, or a probe while it loads, is not
            # a server fault.
            if not self.model.serves(named.group(1)):
                return await error_response(unknown_model(named.group(1), self.model.name))(scope, receive, send)
            if _is_readiness(path) and (not self.model.ready or health_state(self.model) == "Stopped"):
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


def _header_bytes(scope: dict[str, Any]) -> int:
    """The size of the request line and headers as sent (near enough: the separators are counted, not read)."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def unserved_kserve_route(path: str, query: bytes) -> NotFound | None:
    """KServe routes this server refuses with a 404 naming what to use instead: they would fail (a text generator
    has no model versions or explanations: KServe answers 501) or harm (the model repository's routes would let any
    client unload the one model served). Unversioned v2 infer is served (``v2.routes``)."""
    if path.startswith("/v2/repository/"):
        return NotFound("model repository operations are disabled: this server serves one model, loaded at start-up")
    if path.endswith(":explain"):
        return NotFound(f"this server has no explainer: text generation is served by {GENERATION_ROUTES}")
    versioned = "/versions/" in path or "model_version" in parse_qs(query.decode("latin-1"))
    if path.startswith("/v2/models/") and versioned:
        return NotFound("model versions are not served: this server serves one unversioned model "
                        "(GET /v2/models/<name> and /v2/models/<name>/ready)")
    return None


def _needs_auth(path: str) -> bool:
    return path != "/" and not path.startswith(OPEN_PATHS) and not _is_readiness(path)


def _is_readiness(path: str) -> bool:
    # GET /v1/models/<name> and /v2/models/<name>/ready are probes; :predict and /infer are inference.
    return (path.startswith("/v1/models") and ":" not in path) or path.endswith("/ready")


class FalconModelServer(ModelServer):
    """KServe's model server with HTTP connections bounded (``connections``) and a drain on SIGTERM that keeps its
    word: readiness turns 503 at once and new requests get 503; requests in flight run on for up to
    ``drain_timeout_s``; those still running then end with the text they have and finish_reason "shutdown"
    (streams with their final event and ``[DONE]``); the generation threads stop, and the process exits 0 at most
    ``SHUTDOWN_AFTER_DRAIN_S`` later."""

    def __init__(self, model: FalconModel, drain_timeout_s: float, **kwargs: Any) -> None:
        # grace_period is uvicorn's timeout_graceful_shutdown: once the drain is over, every answer has been
        # given, so this is only for the last bytes to be sent.
        super().__init__(grace_period=SEND_GRACE_S, **kwargs)
        self._model = model
        self._drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task | None = None

    def register_signal_handler(self) -> None:
        super().register_signal_handler()
        config = self._model.config  # the REST server exists by now, and has not loaded its uvicorn config yet
        configure_connections(self._rest_server.config, ConnectionLimits(config.max_header_bytes,
                                                                         config.header_timeout_s))
        uvicorn_server = self._rest_server._server  # uvicorn installs its own handlers while it serves
        stop_uvicorn = uvicorn_server.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            if sig != signal.SIGTERM or self._model.draining:
                return stop_uvicorn(sig, frame)
            logger.info("SIGTERM: draining (%d request(s) in flight)", self._in_flight())
            begin_drain(self._model)
            self._drain = asyncio.get_event_loop().create_task(  # held: the loop keeps only a weak reference
                drain(self._model, self._drain_timeout_s, lambda: stop_uvicorn(sig, frame)))

        uvicorn_server.handle_exit = handle_exit
        if not config.log_requests:
            self._without_request_timings()

    def _without_request_timings(self) -> None:
        """KServe times every request (``TimingMiddleware``: a ``getrusage`` before and after, and a log record)
        for its ``kserve.trace`` lines, which only ``--log_requests`` shows. Without them it is work on the event
        loop for nothing, and the event loop shares the GIL with the decode worker: it is left out of the app
        KServe builds when the server starts."""
        rest = self._rest_server
        create_application = rest.create_application

        def create_without_timings() -> None:
            create_application()
            drop_request_timings(model_server.app)

        rest.create_application = create_without_timings

    def _in_flight(self) -> int:
        return self._model.batcher.in_flight if self._model.batcher else 0


def drop_request_timings(app: FastAPI) -> None:
    """Take KServe's per-request ``TimingMiddleware`` out of ``app`` (before its middleware stack is built)."""
    app.user_middleware = [entry for entry in app.user_middleware
                           if (entry.cls.__module__, entry.cls.__name__) != ("timing_asgi.middleware", "TimingMiddleware")]


def begin_drain(model: FalconModel) -> None:
    model.draining = True
    model.ready = False  # KServe's readiness routes answer 503 from now on
    if model.batcher is not None:
        model.batcher.close()


async def drain(model: FalconModel, timeout_s: float, then: Callable[[], None]) -> None:
    """Wait up to ``timeout_s`` for the requests in flight, end those still running, stop the generation threads
    (so that no thread is inside torch when the interpreter exits), then call ``then`` (stop serving)."""
    batcher = model.batcher
    if batcher is not None:
        await _until(lambda: batcher.in_flight == 0, timeout_s)
        if cut := model.interrupt("shutdown"):
            logger.warning("Drain timeout (%g s): ended %d request(s) with finish_reason 'shutdown'", timeout_s, cut)
        stop_by = time.monotonic() + STOP_WORKERS_S
        await _until(lambda: batcher.in_flight == 0, STOP_WORKERS_S)
        if not await asyncio.to_thread(batcher.join, max(0.0, stop_by - time.monotonic())):
            logger.error("The generation threads did not stop within %g s of the drain", STOP_WORKERS_S)
    await asyncio.to_thread(model.stop)  # tensor-parallel ranks end with the drain
    logger.info("Drained; stopping the server")
    then()


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
