"""OpenAI-compatible routes: ``completions``, ``chat/completions`` and ``models`` under ``/openai/v1`` and ``/v1``.

``/openai/v1`` is KServe's prefix (``$KSERVE_OPENAI_ROUTE_PREFIX``); ``/v1`` is where OpenAI-compatible servers
(vLLM, ``transformers serve``, the Kubernetes AI Toolchain Operator's current one) serve them. The implementation is
not KServe's: KServe 0.21's ``kserve.protocol.rest.openai`` takes its wire types and request cancellation from vLLM
(the ``kserve[llm]`` extra: vllm 0.24, which pins torch 2.11 and CUDA wheels against this project's torch), and it
adds its routes only for a model that is an ``OpenAIModel``, which counts as ready from construction while ours
must answer 503 until its weights are loaded. So the same routes are served here, for the same ``FalconModel``,
with small pydantic wire models of their own (``schema``), mapped straight onto the engine's options
(``mapping``) and answered by ``reply``.

``GET /v1/models`` answers KServe's ``{"models": [...]}`` and OpenAI's ``{"object": "list", "data": [...]}`` in one
body, so both kinds of client read it.

``finish_reason`` is OpenAI's ``"stop"`` or ``"length"``, or ``"shutdown"`` (not one of OpenAI's) when the
server's drain ran out before the answer was complete.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: client mistakes are 400 (a prompt
that does not fit the context too, as OpenAI has it), an unknown model 404, a loading or draining server 503. Once a
stream has begun, an error is sent as a ``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from transformers import PreTrainedTokenizerBase

from ... import metrics
from ...errors import Draining, ModelNotFound, NotReady, PredictorError
from ..chat_format import CHAT_STOP, render_chat
from ..json_body import decode_json_body
from ..model import FalconModel
from ..streaming import sse_response, stream_text, unless_disconnected
from ..tracing import current_request_id
from .mapping import to_generation_job
from .reply import ChatCompletionsApi, CompletionsApi, Reply, echoed_tokens
from .schema import ChatCompletionRequest, CompletionRequest, GenerationFields, parse_openai_request

logger = logging.getLogger(__name__)


def install_openai_routes(app: FastAPI, model: FalconModel, prefix: str | None = None) -> None:
    """Add the OpenAI routes under ``{prefix}/v1`` (the prefix defaults to KServe's: $KSERVE_OPENAI_ROUTE_PREFIX,
    else ``/openai``) and under ``/v1``, where ``GET /v1/models`` replaces KServe's v1 model list with one body
    that holds both."""
    started = int(time.time())
    bases = dict.fromkeys([openai_base(prefix), "/v1"])
    for base in bases:
        _install_under(app, model, base, started)
    # KServe added its own GET /v1/models and /v1/models/{name} when it built the app; ours must be matched first.
    ours = [route for route in app.router.routes if getattr(route, "path", None) in ("/v1/models",
                                                                                     "/v1/models/{model_id}")
            and getattr(route, "endpoint", None) is not None and route.endpoint.__module__ == __name__]
    app.router.routes[:] = ours + [route for route in app.router.routes if route not in ours]


def _install_under(app: FastAPI, model: FalconModel, base: str, started: int) -> None:
    router = APIRouter(prefix=base, tags=["openai"])
    completions, chat = CompletionsApi(f"{base}/completions"), ChatCompletionsApi(f"{base}/chat/completions")

    @router.post("/completions", summary="OpenAI completions, from the same engine as /chat")
    async def create_completion(request: Request) -> Response:
        return await create(request, model, completions, CompletionRequest)

    @router.post("/chat/completions", summary="OpenAI chat completions in Falcon-instruct's conversation format")
    async def create_chat_completion(request: Request) -> Response:
        return await create(request, model, chat, ChatCompletionRequest)

    def card(name: str) -> dict[str, Any]:
        """A model's card; an adapter's names its base model as ``parent`` (vLLM's cards)."""
        card = {"id": name, "object": "model", "created": started, "owned_by": "kserve"}
        if name != model.name:
            card |= {"root": name, "parent": model.name}
        return card

    @router.get("/models", summary="The served model and its adapters, in OpenAI's shape and KServe's at once")
    async def list_models() -> dict[str, Any]:
        names = [model.name, *model.adapter_names]
        return {"object": "list", "data": [card(name) for name in names], "models": names}

    @router.get("/models/{model_id}", summary="The served model or an adapter: 200 once it is loaded, 503 before")
    async def retrieve_model(model_id: str) -> Response:
        if not model.ready:
            if model_id != model.name:
                return openai_error_response(ModelNotFound(f"the model {model_id!r} does not exist", param="model"))
            return openai_error_response(NotReady(f"model {model.name} is not loaded yet"))
        if not model.serves(model_id):
            return openai_error_response(ModelNotFound(f"the model {model_id!r} does not exist", param="model"))
        # On /v1 this is also KServe's v1 readiness route: one body with both kinds of keys.
        return JSONResponse({**card(model_id), "name": model_id, "ready": True})

    app.include_router(router)


def openai_base(prefix: str | None = None) -> str:
    """Where the OpenAI routes are: ``{prefix}/v1``, the prefix KServe's ($KSERVE_OPENAI_ROUTE_PREFIX, else
    ``/openai``) unless given."""
    if prefix is None:
        prefix = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai")
    return f"/{prefix.strip('/')}/v1" if prefix.strip("/") else "/v1"


def openai_paths() -> tuple[str, ...]:
    """The path prefixes of the OpenAI generation routes, whose clients read OpenAI's error shape."""
    return (openai_base() + "/", "/v1/completions", "/v1/chat/completions")


async def create(request: Request, model: FalconModel, api: CompletionsApi,
                 request_type: type[GenerationFields]) -> Response:
    """Validate, map, queue, and answer with a JSON body or a stream of chunks."""
    try:
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        body = parse_openai_request(decode_json_body(await request.body()), request_type)
        adapter = model.adapter_for(body.model)
        engine = model.require_ready()
        prompt, stops = _prompt(body, engine.tokenizer)
        if model.config.log_prompts:
            logger.info("prompt: %r", prompt)
        prompt_ids = await asyncio.to_thread(engine.encode, prompt)
        job = model.with_adapter(to_generation_job(body, prompt, prompt_ids, stops, engine.info, model.limits),
                                 adapter)
        ticket = model.submit(job, stream=True)
    except PredictorError as exc:
        return _failed(api, exc)
    prefixes = [prompt if job.return_full_text else ""] * body.n
    token_text = _token_id_text if body.return_tokens_as_token_ids else lambda token_id: engine.decode([token_id])
    echoed = None  # an echoed prompt with log-probabilities: its tokens, scored by the engine before it generates
    if job.options.prompt_logprobs is not None:
        echoed = lambda: echoed_tokens(job.prompt_ids, ticket.prompt_logprobs,  # noqa: E731
                                       lambda token_id: engine.decode([token_id]))
    reply = Reply(api, body.model, len(job.prompt_ids), prefixes, token_text, job.options.logprobs, echoed)
    deltas = stream_text(model, job, ticket)
    if body.stream:
        return sse_response(reply.chunks(deltas, body.include_usage), api.route, openai_error_body)
    try:
        finished, answer = await unless_disconnected(request, reply.collect(deltas))
    except PredictorError as exc:
        return _failed(api, exc)
    metrics.REQUESTS.labels(api.route, "success" if finished else "cancelled").inc()
    return JSONResponse(answer) if finished else Response(status_code=499)  # 499: the client closed the request


def _prompt(body: GenerationFields, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str]]:
    """The text to generate from and the texts the answer stops before."""
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        return render_chat(tokenizer, messages), [*body.stops(), CHAT_STOP]
    return body.text(), body.stops()


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _failed(api: CompletionsApi, exc: PredictorError) -> Response:
    metrics.REQUESTS.labels(api.route, exc.error_type).inc()
    return openai_error_response(exc)


def openai_error_response(exc: PredictorError) -> JSONResponse:
    status = 400 if exc.status == 422 else exc.status  # OpenAI reports a context overflow as a 400
    return JSONResponse(openai_error_body(exc), status_code=status, headers=exc.headers)


def openai_error_body(exc: PredictorError) -> dict[str, Any]:
    """``{"error": {...}}`` in OpenAI's shape; the message and param already name the OpenAI field."""
    if exc.status >= 500:
        logger.error("%s: %s", exc.error_type, exc.message)
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.error_type},
            "request_id": current_request_id()}
