"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` in vLLM's shapes, with the served model's
tokenizer.

Clients use them to count a prompt's tokens before sending it (``count`` against ``max_model_len``) or to build
``logit_bias`` and ``stop_token_ids``; lm-evaluation-harness's remote tokenizer reads ``/tokenizer_info`` (its
special tokens, and the chat template it renders conversations with: the server's own) and encodes through
``/tokenize``. Errors have OpenAI's shape, as vLLM's do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ...errors import InvalidRequest, ModelNotFound, PredictorError
from ..chat_format import FALCON_CHAT_TEMPLATE, render_chat
from ..encoding import encode_text
from ..generation import token_ids
from ..json_body import decode_json_body
from ..model import FalconModel
from ..openapi import errors, json_body
from .routes import openai_error_response
from .schema import DetokenizeRequest, TokenizeRequest, parse_openai_request


def install_tokenizer_routes(app: FastAPI, model: FalconModel) -> None:
    @app.post("/tokenize", tags=["openai"], summary="A prompt's (or a conversation's) token ids, as vLLM's",
              openapi_extra=json_body(TokenizeRequest), responses=errors((400, 401, 404, 413, 503)))
    async def tokenize(request: Request) -> Response:
        try:
            body = parse_openai_request(decode_json_body(await request.body()), TokenizeRequest)
            return JSONResponse(await _tokenize(model, body))
        except PredictorError as exc:
            return openai_error_response(exc)

    @app.get("/tokenizer_info", tags=["openai"],
             summary="The tokenizer's special tokens, sizes and the chat template, as vLLM's")
    async def tokenizer_info() -> Response:
        try:
            return JSONResponse(describe_tokenizer(model))
        except PredictorError as exc:
            return openai_error_response(exc)

    @app.post("/detokenize", tags=["openai"], summary="The text of token ids, as vLLM's",
              openapi_extra=json_body(DetokenizeRequest), responses=errors((400, 401, 404, 413, 503)))
    async def detokenize(request: Request) -> Response:
        try:
            body = parse_openai_request(decode_json_body(await request.body()), DetokenizeRequest)
            _check_model(model, body.model)
            engine = model.require_ready()
            ids = token_ids(body.tokens, "tokens", engine.info)
            return JSONResponse({"prompt": await asyncio.to_thread(engine.decode, list(ids))})
        except PredictorError as exc:
            return openai_error_response(exc)


async def _tokenize(model: FalconModel, body: TokenizeRequest) -> dict[str, Any]:
    _check_model(model, body.model)
    engine = model.require_ready()
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("send prompt or messages (exactly one of them)", param="prompt")
    if body.messages is not None:
        messages = [message.to_turn() for message in body.messages]
        text = render_chat(engine.tokenizer, messages, body.add_generation_prompt)
    else:
        text = body.prompt
    ids = (await encode_text(engine.tokenizer, text, add_special_tokens=body.add_special_tokens))["input_ids"]
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": model.limits.context_length, "tokens": ids, "token_strs": strs}


def describe_tokenizer(model: FalconModel) -> dict[str, Any]:
    """What a remote tokenizer needs: the special tokens, the vocabulary and context sizes, and the chat template
    the server renders conversations with (Falcon-instruct's, whatever the checkpoint carries)."""
    tokenizer = model.require_ready().tokenizer
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
            "vocab_size": len(tokenizer), "model_max_length": model.limits.context_length,
            "chat_template": FALCON_CHAT_TEMPLATE}


def _check_model(model: FalconModel, name: str | None) -> None:
    if name is not None and not model.serves(name):
        raise ModelNotFound(f"the model {name!r} does not exist; this server serves {model.name!r}", param="model")
