"""OpenAI-compatible routes: ``completions``, ``chat/completions``, ``responses`` and ``models`` under ``/openai/v1``
and ``/v1``.

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

import functools
import logging
import os
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ... import metrics
from ...engine.options import GenerationJob
from ...engine.model.runner import Engine
from ...engine.scheduling.tickets import Ticket
from ...errors import Draining, ModelNotFound, NotFound, NotReady, PredictorError
from ..chat_format import CHAT_STOP, render_chat
from ..encoding import encode_text
from ..json_body import decode_json_body
from ..model import FalconModel
from ..openapi import errors, json_body
from ..streaming import sse_response, stream_text, unless_disconnected
from ..tracing import current_request_id
from .mapping import check_sequences, to_generation_job
from .prompts import merge_streams, prompt_texts_and_ids
from .reply import (
    ChatCompletionsApi,
    CompletionsApi,
    LoggedToken,
    Reply,
    ReplyPrompt,
    echoed_tokens,
)
from .response_reply import ResponseReply
from .responses import NEUTRAL, ResponsesRequest, check_input_items
from .responses import to_generation_job as to_response_job
from .schema import (
    NEUTRAL_VALUES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    parse_openai_request,
)

logger = logging.getLogger(__name__)
GENERATION_ERRORS = errors((400, 401, 404, 413, 429, 500, 503))


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

    @router.post("/completions", summary="OpenAI completions, from the same engine as /chat",
                 openapi_extra=json_body(CompletionRequest, NEUTRAL_VALUES), responses=GENERATION_ERRORS)
    async def create_completion(request: Request) -> Response:
        return await create(request, model, completions, CompletionRequest)

    @router.post("/chat/completions", summary="OpenAI chat completions in Falcon-instruct's conversation format",
                 openapi_extra=json_body(ChatCompletionRequest, NEUTRAL_VALUES), responses=GENERATION_ERRORS)
    async def create_chat_completion(request: Request) -> Response:
        return await create(request, model, chat, ChatCompletionRequest)

    @router.post("/responses", summary="OpenAI's Responses API: a conversation's answer, whole or as typed events",
                 openapi_extra=json_body(ResponsesRequest, NEUTRAL), responses=GENERATION_ERRORS)
    async def create_response(request: Request) -> Response:
        return await respond(request, model, f"{base}/responses")

    @router.get("/responses/{response_id}", summary="Stored responses: none are stored, so always 404")
    async def retrieve_response(response_id: str) -> Response:
        return openai_error_response(NotFound(
            f"no response {response_id[:64]!r}: responses are not stored here (the answer to POST {base}/responses "
            "is all there is)", param="response_id"))

    def card(name: str) -> dict[str, Any]:
        """A model's card, as vLLM's: ``root`` the model it is served from (an adapter's own name, its base model as
        ``parent``), ``max_model_len`` the context a prompt and its answer share (what benchmark clients read)."""
        base = model.is_base(name)
        return {"id": name, "object": "model", "created": started, "owned_by": "kserve",
                "root": model.name if base else name, "parent": None if base else model.name,
                "max_model_len": model.limits.context_length}

    @router.get("/models", summary="The served model and its adapters, in OpenAI's shape and KServe's at once")
    async def list_models() -> dict[str, Any]:
        # Each name a request may use, as vLLM lists each of its served names; KServe's list names the model once,
        # and each adapter (a model of its own on KServe's routes).
        adapters = model.adapter_names
        names = [model.name, *model.config.model_aliases, *adapters]
        return {"object": "list", "data": [card(name) for name in names], "models": [model.name, *adapters]}

    @router.get("/models/{model_id}", summary="The served model or an adapter: 200 once it is loaded, 503 before")
    async def retrieve_model(model_id: str) -> Response:
        if not model.serves(model_id):
            return openai_error_response(ModelNotFound(f"the model {model_id!r} does not exist", param="model"))
        if not model.ready:
            return openai_error_response(NotReady(f"model {model.name} is not loaded yet"))
        # On /v1 this is also KServe's v1 readiness route: one body with both kinds of keys.
        shown = model.name if model.is_base(model_id) else model_id
        return JSONResponse({**card(shown), "name": shown, "ready": True})

    app.include_router(router)


def openai_base(prefix: str | None = None) -> str:
    """Where the OpenAI routes are: ``{prefix}/v1``, the prefix KServe's ($KSERVE_OPENAI_ROUTE_PREFIX, else
    ``/openai``) unless given."""
    if prefix is None:
        prefix = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai")
    return f"/{prefix.strip('/')}/v1" if prefix.strip("/") else "/v1"


def openai_paths() -> tuple[str, ...]:
    """The path prefixes of the OpenAI generation routes, whose clients read OpenAI's error shape."""
    return (openai_base() + "/", "/v1/completions", "/v1/chat/completions", "/v1/responses")


async def create(request: Request, model: FalconModel, api: CompletionsApi,
                 request_type: type[GenerationFields]) -> Response:
    """Validate, map, queue every prompt, and answer with a JSON body or a stream of chunks."""
    try:
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        body = parse_openai_request(decode_json_body(await request.body()), request_type)
        adapter = model.adapter_for(body.model)
        engine = model.require_ready()
        prompts, stops = await _prompts(body, engine)
        check_sequences(len(prompts), body.n, model.limits)
        if model.config.log_prompts:
            for prompt, _ in prompts:
                logger.info("prompt: %r", prompt)
        jobs = [model.with_adapter(to_generation_job(body, prompt, prompt_ids, stops, engine.info, model.limits),
                                   adapter) for prompt, prompt_ids in prompts]
        tickets = model.submit_all(jobs, stream=True)
    except PredictorError as exc:
        return _failed(api, exc)
    token_text = _token_id_text if body.return_tokens_as_token_ids else lambda token_id: engine.decode([token_id])
    reply_prompts = [_reply_prompt(job, ticket, engine) for job, ticket in zip(jobs, tickets, strict=True)]
    reply = Reply(api, adapter or model.name, reply_prompts, body.n, token_text, jobs[0].options.logprobs,
                  tools=bool(body.tool_mode()[0]))
    deltas = merge_streams([stream_text(model, job, ticket) for job, ticket in zip(jobs, tickets, strict=True)],
                           body.n)
    if body.stream:
        return sse_response(reply.chunks(deltas, body.include_usage, body.continuous_usage), api.route,
                            openai_error_body)
    try:
        finished, answer = await unless_disconnected(request, reply.collect(deltas))
    except PredictorError as exc:
        return _failed(api, exc)
    metrics.REQUESTS.labels(api.route, "success" if finished else "cancelled").inc()
    return JSONResponse(answer) if finished else Response(status_code=499)  # 499: the client closed the request


async def _prompts(body: GenerationFields, engine: Engine) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """Each prompt's text and token ids (a chat's one rendered conversation), and the texts the answer stops
    before."""
    if isinstance(body, ChatCompletionRequest):
        prompt = render_chat(engine.tokenizer, body.turns())
        return ([(prompt, await encode_text(engine.encode, prompt, body.add_special_tokens))],
                [*body.stops(), CHAT_STOP])
    assert isinstance(body, CompletionRequest)
    encode = functools.partial(engine.encode, add_special_tokens=body.add_special_tokens)
    prompts = await prompt_texts_and_ids(body.prompts(), encode, engine.decode, engine.info)
    return prompts, body.stops()


def _reply_prompt(job: GenerationJob, ticket: Ticket, engine: Engine) -> ReplyPrompt:
    """A prompt as its answer needs it; an echoed prompt with log-probabilities is scored by the engine before it
    generates, and its tokens are read from the ticket then."""
    echoed = None
    if job.options.prompt_logprobs is not None:
        def echoed() -> list[LoggedToken]:
            return echoed_tokens(job.prompt_ids, ticket.prompt_logprobs, lambda token_id: engine.decode([token_id]))
    return ReplyPrompt(len(job.prompt_ids), job.prompt if job.return_full_text else "", echoed,
                       lambda: ticket.cached_tokens)


async def respond(request: Request, model: FalconModel, route: str) -> Response:
    """The Responses API: validate, render the conversation, queue, and answer with the response object or its
    event stream."""
    try:
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        payload = decode_json_body(await request.body())
        check_input_items(payload)
        body = parse_openai_request(payload, ResponsesRequest)
        adapter = model.adapter_for(body.model)
        engine = model.require_ready()
        prompt = render_chat(engine.tokenizer, body.messages())
        if model.config.log_prompts:
            logger.info("prompt: %r", prompt)
        prompt_ids = await encode_text(engine.encode, prompt)
        job = model.with_adapter(to_response_job(body, prompt, prompt_ids, engine.info, model.limits), adapter)
        ticket = model.submit(job, stream=True)
    except PredictorError as exc:
        metrics.REQUESTS.labels(route, exc.outcome).inc()
        return openai_error_response(exc)
    reply = ResponseReply(body, adapter or model.name, len(job.prompt_ids), lambda: ticket.cached_tokens)
    deltas = stream_text(model, job, ticket)
    if body.stream:
        return sse_response(reply.events(deltas), route, reply.error_event, typed=True)
    try:
        finished, answer = await unless_disconnected(request, reply.collect(deltas))
    except PredictorError as exc:
        metrics.REQUESTS.labels(route, exc.outcome).inc()
        return openai_error_response(exc)
    metrics.REQUESTS.labels(route, "success" if finished else "cancelled").inc()
    return JSONResponse(answer) if finished else Response(status_code=499)


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _failed(api: CompletionsApi, exc: PredictorError) -> Response:
    metrics.REQUESTS.labels(api.route, exc.outcome).inc()
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
    return {"object": "error", "error": {"message": exc.message, "type": kind, "param": exc.param,
                                         "code": exc.error_type},
            "request_id": current_request_id()}
