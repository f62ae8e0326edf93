"""Text generation on KServe's Open Inference Protocol (v2): ``POST /v2/models/<name>/infer``.

KServe's own v2 route hands the model an ``InferRequest`` of tensors, which a text generator cannot read; this
route, registered ahead of it, reads the prompts from the request's one BYTES input tensor (one prompt per
element; KServe's and Triton's LLM runtimes name it ``text_input``, any name is accepted) and the options from the
request's ``parameters``: the /chat fields (``return_full_text``, ``prefix``, ``seed``, ``handle_long_generation``,
``clean_up_tokenization_spaces``) and the generate options (``max_new_tokens``, ``temperature``, ...), side by side::

    {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["Once upon", "Hello"]}],
     "parameters": {"max_new_tokens": 32, "temperature": 0, "return_full_text": false}}

Each prompt is validated, mapped and generated exactly as /chat's ``prompt`` (same defaults, limits and errors),
all of them concurrently in the shared batch, at most the batch size per request. The answer is one BYTES
output tensor ``text_output`` with a text per prompt (shape ``[prompts, n]`` when ``num_return_sequences`` is
``n`` > 1), and /chat's ``details`` per prompt as parameters::

    {"model_name": "falcon-7b", "id": "...", "outputs": [{"name": "text_output", "datatype": "BYTES",
     "shape": [2], "data": ["Once upon a time", "Hello there"]}],
     "parameters": {"finish_reasons": [["length"], ["stop"]], "prompt_tokens": [2, 1], "generated_tokens": [[4], [2]]}}

Errors are /chat's (``{"detail", "error", "error_type", "param"}``); a client that disconnects cancels every prompt.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ... import metrics
from ...engine.scheduling.tickets import Ticket
from ...errors import Draining, InvalidRequest, PredictorError
from ..chat.schema import ChatRequest, parse_chat_request
from ..json_body import decode_json_body
from ..model import Completion, FalconModel
from ..streaming import unless_disconnected

ROUTE = "/v2/models/{name}/infer"  # the route label in falcon_requests_total
OUTPUT_NAME = "text_output"
# /chat's top-level fields a v2 request may set as parameters; every other parameter is a generate option.
CHAT_FIELDS = frozenset(ChatRequest.model_fields) - {"prompt", "stream", "generate_kwargs"}


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    shape: list[int]
    datatype: Literal["BYTES"]
    data: list[str] | list[list[str]]  # [prompts], or [prompts, 1] nested
    parameters: dict[str, Any] | None = None


class InferRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None  # the outputs asked for: text_output is the only one
    parameters: dict[str, Any] | None = None


def install_open_inference_route(app: FastAPI, model: FalconModel) -> None:
    @app.post("/v2/models/{model_name}/infer", tags=["falcon"],
              summary="Open Inference Protocol: a BYTES tensor of prompts in, a BYTES tensor of texts out")
    async def infer(model_name: str, request: Request) -> Response:
        tickets: list[Ticket] = []
        try:
            model.adapter_for(model_name, param=None)  # an unknown name: 404
            if model.draining:
                raise Draining("the server is shutting down and takes no new requests")
            body = parse_infer_request(decode_json_body(await request.body()))
            model.require_ready()  # the batch size, which bounds the prompts, is decided by loading
            chat_requests = to_chat_requests(body, model.max_batch_size)
            jobs = [await model.prepare(chat_request, model_name) for chat_request in chat_requests]
            tickets = model.submit_all(jobs)
            finished, results = await unless_disconnected(
                request, asyncio.gather(*(ticket.result() for ticket in tickets)))
        except PredictorError as exc:
            _cancel(tickets)  # one prompt failed: the others need not go on
            metrics.REQUESTS.labels(ROUTE, exc.outcome).inc()
            raise
        if not finished:
            _cancel(tickets)
            metrics.REQUESTS.labels(ROUTE, "cancelled").inc()
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        metrics.REQUESTS.labels(ROUTE, "success").inc()
        answers = [model.to_response(Completion(job, result)) for job, result in zip(jobs, results, strict=True)]
        return JSONResponse(to_infer_response(model_name, body.id, answers))


def parse_infer_request(payload: Any) -> InferRequestBody:
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object with 'inputs' (Open Inference Protocol)")
    try:
        return InferRequestBody.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"] if part not in ("str", "list[str]", "list[list[str]]"))
        raise InvalidRequest(f"{param}: {error['msg']}", param=param) from None


def to_chat_requests(body: InferRequestBody, max_prompts: int) -> list[ChatRequest]:
    """One /chat request per prompt of the input tensor, each with the request's parameters."""
    tensor = body.inputs[0]
    prompts = [item for row in tensor.data for item in (row if isinstance(row, list) else [row])]
    if not 1 <= len(prompts) <= max_prompts:
        raise InvalidRequest(f"inputs.0.data: between 1 and {max_prompts} prompts per request (got {len(prompts)})",
                             param="inputs.0.data")
    size = 1
    for dim in tensor.shape:
        size *= dim
    if size != len(prompts):
        raise InvalidRequest(f"inputs.0.shape: {tensor.shape} does not hold {len(prompts)} prompts",
                             param="inputs.0.shape")
    requested = [output.get("name") for output in body.outputs or []]
    if any(name != OUTPUT_NAME for name in requested):
        raise InvalidRequest(f"outputs: the only output is {OUTPUT_NAME!r} (got {requested})", param="outputs")
    parameters = dict(body.parameters or {})
    if "stream" in parameters:
        raise InvalidRequest("parameters.stream: v2 infer does not stream; POST /chat with \"stream\": true does",
                             param="parameters.stream")
    fields = {key: parameters.pop(key) for key in list(parameters) if key in CHAT_FIELDS}
    return [parse_chat_request({**fields, "prompt": prompt, "generate_kwargs": parameters}) for prompt in prompts]


def _cancel(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket.cancel()


def to_infer_response(model_name: str, request_id: str | None, answers: list[dict[str, Any]]) -> dict[str, Any]:
    texts = [answer["Result"] if isinstance(answer["Result"], list) else [answer["Result"]] for answer in answers]
    per_prompt = len(texts[0])
    details = [answer["details"] for answer in answers]
    return {
        "model_name": model_name, "id": request_id or str(uuid.uuid4()),
        "outputs": [{"name": OUTPUT_NAME, "datatype": "BYTES",
                     "shape": [len(texts), per_prompt] if per_prompt > 1 else [len(texts)],
                     "data": [text for row in texts for text in row]}],
        "parameters": {"finish_reasons": [d["finish_reasons"] for d in details],
                       "prompt_tokens": [d["prompt_tokens"] for d in details],
                       "generated_tokens": [d["generated_tokens"] for d in details]},
    }
