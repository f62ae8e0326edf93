"""vLLM's routes for adapters at run time: ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter {"lora_name"}``, served only with ``--runtime_lora_updating``.

A path must lie under ``--lora_root`` (default: the adapter directory), else 403. Loading reads and checks the files
on a worker thread, never on the batch's: the running batch goes on meanwhile, and a bad adapter is a 400 naming the
problem that leaves the served ones as they were. Unloading stops new requests from choosing the adapter; those
already admitted finish with it. Both answer vLLM's plain-text success line; errors have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ...config import ServerConfig
from ...engine.lora.adapter import AdapterError, read_adapter
from ...errors import Forbidden, InvalidRequest, ModelNotFound, PredictorError
from ..json_body import decode_json_body
from ..model import FalconModel
from .routes import openai_error_response
from .schema import parse_openai_request

logger = logging.getLogger(__name__)


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)


def install_lora_routes(app: FastAPI, model: FalconModel, config: ServerConfig) -> None:
    if not config.runtime_lora_updating:
        return
    root = Path(os.path.realpath(config.lora_root or config.adapter_dir))

    @app.post("/v1/load_lora_adapter", tags=["openai"], summary="Serve a LoRA adapter from under --lora_root")
    async def load_lora_adapter(request: Request) -> Response:
        try:
            body = parse_openai_request(decode_json_body(await request.body()), LoadLoraAdapterRequest)
            await load(model, root, body)
        except PredictorError as exc:
            return openai_error_response(exc)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", tags=["openai"], summary="Stop serving a LoRA adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        try:
            body = parse_openai_request(decode_json_body(await request.body()), UnloadLoraAdapterRequest)
            engine = model.require_ready()
            if not engine.lora.unregister(body.lora_name):
                raise ModelNotFound(f"the LoRA adapter {body.lora_name!r} is not loaded", param="lora_name")
        except PredictorError as exc:
            return openai_error_response(exc)
        logger.info("Adapter removed: %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def load(model: FalconModel, root: Path, body: LoadLoraAdapterRequest) -> None:
    """Read and check the adapter off the event loop and the batch thread; register it if it is good."""
    engine = model.require_ready()
    if model.serves(body.lora_name):
        raise InvalidRequest(f"lora_name: {body.lora_name!r} is already served", param="lora_name")
    path = Path(os.path.realpath(body.lora_path))
    if not path.is_relative_to(root):
        raise Forbidden(f"lora_path: {body.lora_path} is outside --lora_root {root}; adapters load only from "
                        "under it", param="lora_path")
    shapes = engine.adapter_shapes
    try:
        adapter = await asyncio.to_thread(read_adapter, body.lora_name, path, shapes, engine.lora.max_rank,
                                          engine.lora.dtype)
    except AdapterError as exc:
        raise InvalidRequest(str(exc), param="lora_path") from None
    engine.lora.register(adapter)
    logger.info("Adapter added: %s (%s), chosen by model name", body.lora_name, path)
