"""OpenAI-compatible routes: ``/openai/v1/completions``, ``/openai/v1/chat/completions`` and ``/openai/v1/models``.

The paths are KServe's (prefix ``$KSERVE_OPENAI_ROUTE_PREFIX``, default ``/openai``), the implementation is not:
KServe 0.21's ``kserve.protocol.rest.openai`` takes its wire types and request cancellation from vLLM (the
``kserve[llm]`` extra: vllm 0.24, which pins torch 2.11 and CUDA wheels against this project's torch), and it adds
its routes only for a model that is an ``OpenAIModel``, which counts as ready from construction while ours must
answer 503 until its weights are loaded. So the same routes are served here, for the same ``FalconModel``, with
small pydantic wire models of their own (``openai_schema``).

An OpenAI request becomes a /chat request (``to_chat_request``) and goes on through ``to_generation_job``: the
validation, limits, batching and seeds are those of /chat. The choices made in that mapping:

- ``temperature`` 0 is greedy decoding; above 0 it samples with that temperature and ``top_p``, and no top-k (OpenAI
  has none, so /chat's ``top_k=10`` default does not apply). OpenAI's default temperature is 1.
- ``max_tokens`` defaults to 16 for completions, as OpenAI's; for chat, to what the context has left, up to the
  server's ``--max_new_tokens``. ``max_completion_tokens`` is chat's newer name for it.
- ``stop`` (at most 4 strings) is applied to the text as it is generated (``streaming.StopMatcher``). Chat also
  stops at ``"\\nUser:"`` (``chat_format.CHAT_STOP``), so the model does not write the user's next turn.
- The engine has nothing to honour ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``,
  ``top_logprobs``, ``best_of``, ``echo`` or ``suffix`` with (``repetition_penalty`` is a different, multiplicative
  penalty): they are accepted at their neutral values, otherwise refused with a 400 naming them. Other fields
  OpenAI knows (tools, response_format, ...) are refused as unsupported.
- ``finish_reason`` is ``"stop"`` (eos or a stop string) or ``"length"`` (max_tokens, or the server's time limit);
  ``"shutdown"`` (not one of OpenAI's) when the server's drain ran out before the answer was complete.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: client mistakes are 400 (a prompt
that does not fit the context too, as OpenAI has it), an unknown model 404, a loading or draining server 503. Once a
stream has begun, an error is sent as a ``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from transformers import PreTrainedTokenizerBase

from .. import metrics
from ..engine.options import Limits
from ..errors import ContextLengthExceeded, Draining, InvalidRequest, ModelNotFound, NotReady, PredictorError
from .chat_format import CHAT_STOP, render_chat
from .mapping import to_generation_job
from .model import FalconModel
from .openai_schema import ChatCompletionRequest, CompletionRequest, GenerationFields, parse_openai_request
from .schema import ChatRequest, decode_json_body, parse_chat_request
from .streaming import TextDelta, sse_response, stream_text, unless_disconnected
from .tracing import current_request_id

logger = logging.getLogger(__name__)

# /chat's names for the options an OpenAI request sets, to name the OpenAI field in an error from the mapping.
OPENAI_PARAMS = {"generate_kwargs.max_new_tokens": "max_tokens", "generate_kwargs.num_return_sequences": "n",
                 "generate_kwargs.temperature": "temperature", "generate_kwargs.top_p": "top_p"}
FINISH_REASONS = {"stop": "stop", "length": "length", "shutdown": "shutdown"}  # others (time_limit, cancelled)
# were cut short: "length"

# -- the mapping onto /chat --------------------------------------------------------------------------------------
def to_chat_request(request: GenerationFields, prompt: str, max_new_tokens: int) -> ChatRequest:
    """The /chat request that generates what ``request`` asks for (see the module docstring for the choices)."""
    if request.n > 1 and request.temperature == 0:
        raise InvalidRequest(f"n: temperature 0 (greedy decoding) gives one completion, not {request.n}: set a "
                             "temperature above 0", param="n")
    return parse_chat_request({
        "prompt": prompt, "return_full_text": False, "seed": request.seed,
        "generate_kwargs": {"max_new_tokens": max_new_tokens, "do_sample": request.temperature > 0,
                            "temperature": request.temperature, "top_k": 0, "top_p": request.top_p,
                            "num_return_sequences": request.n}})


def resolve_max_tokens(asked: int | None, prompt_tokens: int, limits: Limits, prompt_param: str = "prompt") -> int:
    """New tokens to generate: ``asked``, or (None) what the context has left up to the server's limit."""
    room = limits.context_length - prompt_tokens
    if asked is None and room >= 1:
        return min(room, limits.max_new_tokens)
    if asked is None or asked > room:
        raise ContextLengthExceeded(
            f"this model's context holds {limits.context_length} tokens, but the prompt has {prompt_tokens} and "
            f"{asked or 'at least 1'} more were asked for: shorten the prompt or lower max_tokens",
            param=prompt_param if asked is None or room < 1 else "max_tokens")
    return asked


# -- the two APIs ----------------------------------------------------------------------------------------------------
class CompletionsApi:
    """How an OpenAI API reads its request and shapes its answer; chat completions differ only in these."""

    request_type: type[GenerationFields] = CompletionRequest
    object_name, chunk_object_name, id_prefix, prompt_param = "text_completion", "text_completion", "cmpl-", "prompt"

    def __init__(self, route: str) -> None:
        self.route = route

    def prompt(self, request: CompletionRequest, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str]]:
        return request.text(), request.stops()

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return []

    chunk_choice = choice


class ChatCompletionsApi(CompletionsApi):
    request_type = ChatCompletionRequest
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"
    id_prefix, prompt_param = "chatcmpl-", "messages"

    def prompt(self, request: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str]]:
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        return render_chat(tokenizer, messages), [*request.stops(), CHAT_STOP]

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def chunk_choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}


class Reply:
    """One answer being put together: its id, the choices' text so far, finish reasons and token counts."""

    def __init__(self, api: CompletionsApi, model_name: str, prompt_tokens: int, n: int) -> None:
        self.api = api
        self.id = f"{api.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self.texts = [""] * n
        self.finish_reasons: list[str | None] = [None] * n
        self.tokens = [0] * n

    def add(self, delta: TextDelta) -> str | None:
        """Record a delta; return its OpenAI finish reason if it ends its choice."""
        self.texts[delta.index] += delta.text
        self.tokens[delta.index] = delta.tokens
        if delta.finish_reason is not None:
            self.finish_reasons[delta.index] = FINISH_REASONS.get(delta.finish_reason, "length")
        return self.finish_reasons[delta.index]

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name}

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def body(self) -> dict[str, Any]:
        choices = [self.api.choice(i, text, reason)
                   for i, (text, reason) in enumerate(zip(self.texts, self.finish_reasons, strict=True))]
        return {**self.head(self.api.object_name), "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head(self.api.chunk_object_name), "choices": choices}

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> dict[str, Any]:
        async with aclosing(deltas):
            async for delta in deltas:
                self.add(delta)
        return self.body()

    async def chunks(self, deltas: AsyncIterator[TextDelta], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        if first := self.api.first_chunks(len(self.texts)):
            yield self.chunk(first)
        async with aclosing(deltas):
            async for delta in deltas:
                finish_reason = self.add(delta)
                if delta.text or delta.finish_reason is not None:
                    yield self.chunk([self.api.chunk_choice(delta.index, delta.text, finish_reason)])
        if include_usage:
            yield {**self.chunk([]), "usage": self.usage()}


# -- routes ----------------------------------------------------------------------------------------------------------
def install_openai_routes(app: FastAPI, model: FalconModel, prefix: str | None = None) -> None:
    """Add the OpenAI routes under ``{prefix}/v1``; the prefix defaults to KServe's: $KSERVE_OPENAI_ROUTE_PREFIX,
    else ``/openai``. An empty prefix serves ``/v1/models``, in place of KServe's v1 model list."""
    base = openai_base(prefix)
    router = APIRouter(prefix=base, tags=["openai"])
    started = int(time.time())
    completions, chat = CompletionsApi(f"{base}/completions"), ChatCompletionsApi(f"{base}/chat/completions")

    @router.post("/completions", summary="OpenAI completions, from the same engine as /chat")
    async def create_completion(request: Request) -> Response:
        return await create(request, model, completions)

    @router.post("/chat/completions", summary="OpenAI chat completions in Falcon-instruct's conversation format")
    async def create_chat_completion(request: Request) -> Response:
        return await create(request, model, chat)

    def card() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": started, "owned_by": "kserve"}

    @router.get("/models", summary="The served model")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @router.get("/models/{model_id}", summary="The served model: 200 once it is loaded, 503 before")
    async def retrieve_model(model_id: str) -> Response:
        if model_id != model.name:
            return openai_error_response(ModelNotFound(f"the model {model_id!r} does not exist", param="model"))
        if not model.ready:
            return openai_error_response(NotReady(f"model {model.name} is not loaded yet"))
        return JSONResponse(card())

    app.include_router(router)


def openai_base(prefix: str | None = None) -> str:
    """Where the OpenAI routes are: ``{prefix}/v1``, the prefix KServe's ($KSERVE_OPENAI_ROUTE_PREFIX, else
    ``/openai``) unless given."""
    if prefix is None:
        prefix = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai")
    return f"/{prefix.strip('/')}/v1" if prefix.strip("/") else "/v1"


async def create(request: Request, model: FalconModel, api: CompletionsApi) -> Response:
    """Validate, map, queue, and answer with a JSON body or a stream of chunks."""
    try:
        if model.draining:
            raise Draining("the server is shutting down and takes no new requests")
        body = parse_openai_request(decode_json_body(await request.body()), api.request_type)
        if body.model != model.name:
            raise ModelNotFound(f"the model {body.model!r} does not exist; this server serves {model.name!r}",
                                param="model")
        engine = model.require_ready()
        prompt, stops = api.prompt(body, engine.tokenizer)
        if model.config.log_prompts:
            logger.info("prompt: %r", prompt)
        # Tokenized here rather than in model.prepare: chat's default max_tokens depends on the prompt's length.
        prompt_ids = await asyncio.to_thread(engine.encode, prompt)
        max_new = resolve_max_tokens(body.asked_tokens, len(prompt_ids), model.limits, api.prompt_param)
        job = to_generation_job(to_chat_request(body, prompt, max_new), prompt_ids, engine.info, model.limits)
        ticket = model.submit(job, stream=True)
    except PredictorError as exc:
        return _failed(api, exc)
    reply = Reply(api, model.name, len(job.prompt_ids), body.n)
    deltas = stream_text(model, job, ticket, stops)
    if body.stream:
        return sse_response(reply.chunks(deltas, body.include_usage), api.route,
                            lambda exc: openai_error_body(exc, api.prompt_param))
    try:
        finished, answer = await unless_disconnected(request, reply.collect(deltas))
    except PredictorError as exc:
        return _failed(api, exc)
    metrics.REQUESTS.labels(api.route, "success" if finished else "cancelled").inc()
    return JSONResponse(answer) if finished else Response(status_code=499)  # 499: the client closed the request


def _failed(api: CompletionsApi, exc: PredictorError) -> Response:
    metrics.REQUESTS.labels(api.route, exc.error_type).inc()
    return openai_error_response(exc, api.prompt_param)


def openai_error_response(exc: PredictorError, prompt_param: str = "prompt") -> JSONResponse:
    status = 400 if exc.status == 422 else exc.status  # OpenAI reports a context overflow as a 400
    return JSONResponse(openai_error_body(exc, prompt_param), status_code=status, headers=exc.headers)


def openai_error_body(exc: PredictorError, prompt_param: str = "prompt") -> dict[str, Any]:
    """``{"error": {...}}`` in OpenAI's shape, naming the OpenAI field where the error names a /chat one."""
    if exc.status >= 500:
        logger.error("%s: %s", exc.error_type, exc.message)
    names = {**OPENAI_PARAMS, "prompt": prompt_param}
    message = exc.message
    for chat_name, name in OPENAI_PARAMS.items():
        message = message.replace(chat_name, name)
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": names.get(exc.param, exc.param),
                      "code": exc.error_type}, "request_id": current_request_id()}
