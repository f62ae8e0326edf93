"""``python -m predictor``: parse the flags, check that the model can be found (``preflight``), open the HTTP port,
load the model, serve.

The port opens before the model loads so that probes see 503 (not a refused connection) while a large model
loads; ``/health`` and KServe's readiness routes turn 200 once it is ready.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

from .config import parse_config
from .logs import name_requests
from .preflight import check_accelerator, check_model_source, check_tensor_parallel

logger = logging.getLogger("predictor")


def main() -> None:
    given = parse_config()
    config = check_model_source(given)
    check_accelerator(config)
    check_tensor_parallel(config)
    from kserve import model_server  # noqa: PLC0415 - KServe builds its app on import: after parsing

    from .api.model import FalconModel
    from .api.server import FalconModelServer, install

    model = FalconModel(config)
    install(model_server.app, model, config)
    server = FalconModelServer(model, config.drain_timeout_s, http_port=config.http_port, workers=1,
                               enable_grpc=config.enable_grpc, grpc_port=config.grpc_port)
    _log_like_kserve(config.log_requests)
    name_requests(("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "predictor"), config.log_format)
    if config.model_dir != given.model_dir:
        logger.info("Serving %s from the Hugging Face cache: %s", config.model_id, config.model_dir)
    server.register_model(model)
    threading.Thread(target=_load_or_exit, args=(model,), name="model-loader", daemon=True).start()
    server.start([])  # the model is registered already; start([model]) would insist it be loaded first


def _log_like_kserve(log_requests: bool) -> None:
    """Send this package's log records through the handlers KServe configured, in its format; per-request lines
    only with ``--log_requests``; no line that says something untrue of this server."""
    kserve_logger = logging.getLogger("kserve")
    logger.setLevel(kserve_logger.getEffectiveLevel())
    for handler in kserve_logger.handlers:
        logger.addHandler(handler)
    logger.propagate = False
    kserve_logger.addFilter(_drop_openai_not_registered)
    if not log_requests:
        # uvicorn's access line and KServe's two timing lines (wall and CPU time) for every request.
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # KServe 0.21 answers with FastAPI's ORJSONResponse, which warns on every request in this FastAPI.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


def _drop_openai_not_registered(record: logging.LogRecord) -> bool:
    """KServe logs "OpenAI endpoints not registered" when its own OpenAI module cannot be imported (it needs
    vLLM). This server serves the OpenAI routes itself (``api/openai/``), so that line would mislead."""
    return record.getMessage() != "OpenAI endpoints not registered"


def _load_or_exit(model) -> None:
    try:
        model.load()
    except BaseException as exc:  # noqa: BLE001 - a pod that cannot load must exit so Kubernetes sees it
        logger.critical("Loading the model failed: %s", exc, exc_info=not isinstance(exc, SystemExit))
        logging.shutdown()
        os._exit(1)


if __name__ == "__main__":
    main()
