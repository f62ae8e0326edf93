"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes, with the served model's tokenizer.

Clients use them to count a prompt's tokens before sending it (``count`` against ``max_model_len``) or to build
``logit_bias`` and ``stop_token_ids``. Errors have OpenAI's shape, as vLLM's do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ...errors import InvalidRequest, ModelNotFound, PredictorError
from ..chat_format import render_chat
from ..generation import token_ids
from ..json_body import decode_json_body
from ..model import FalconModel
from .routes import openai_error_response
from .schema import DetokenizeRequest, TokenizeRequest, parse_openai_request


def install_tokenizer_routes(app: FastAPI, model: FalconModel) -> None:
    @app.post("/tokenize", tags=["openai"], summary="A prompt's (or a conversation's) token ids, as vLLM's")
    async def tokenize(request: Request) -> Response:
        try:
            body = parse_openai_request(decode_json_body(await request.body()), TokenizeRequest)
            return JSONResponse(await _tokenize(model, body))
        except PredictorError as exc:
            return openai_error_response(exc)

    @app.post("/detokenize", tags=["openai"], summary="The text of token ids, as vLLM's")
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
    ids = (await asyncio.to_thread(engine.tokenizer, text, add_special_tokens=body.add_special_tokens))["input_ids"]
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": model.limits.context_length, "tokens": ids, "token_strs": strs}


def _check_model(model: FalconModel, name: str | None) -> None:
    if name is not None and not model.serves(name):
        raise ModelNotFound(f"the model {name!r} does not exist; this server serves {model.name!r}", param="model")
