"""``python -m predictor``: parse the flags, open the HTTP port, load the model, serve.

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

logger = logging.getLogger("predictor")


def main() -> None:
    config = parse_config()
    from kserve import model_server  # noqa: PLC0415 - KServe builds its app on import: after parsing

    from .api.model import FalconModel
    from .api.server import FalconModelServer, install

    model = FalconModel(config)
    install(model_server.app, model, config)
    server = FalconModelServer(model, config.drain_timeout_s, http_port=config.http_port, workers=1)
    _log_like_kserve()
    name_requests(("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "predictor"), config.log_format)
    if model_server.args.workers != 1:
        # More uvicorn workers would each load a copy of the model and lose the routes added here.
        logger.warning("--workers %d ignored: one process serves; batching uses the accelerator fully",
                       model_server.args.workers)
    server.register_model(model)
    threading.Thread(target=_load_or_exit, args=(model,), name="model-loader", daemon=True).start()
    server.start([])  # the model is registered already; start([model]) would insist it be loaded first


def _log_like_kserve() -> None:
    """Send this package's log records through the handlers KServe configured, in its format."""
    kserve_logger = logging.getLogger("kserve")
    logger.setLevel(kserve_logger.getEffectiveLevel())
    for handler in kserve_logger.handlers:
        logger.addHandler(handler)
    logger.propagate = False
    # KServe 0.21 answers with FastAPI's ORJSONResponse, which warns on every request in this FastAPI.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


def _load_or_exit(model) -> None:
    try:
        model.load()
    except BaseException as exc:  # noqa: BLE001 - a pod that cannot load must exit so Kubernetes sees it
        logger.critical("Loading the model failed: %s", exc, exc_info=not isinstance(exc, SystemExit))
        logging.shutdown()
        os._exit(1)


if __name__ == "__main__":
    main()
