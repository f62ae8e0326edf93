"""The adapters a server serves: Kaito's adapter directory, merged into the weights at start-up, and the named
adapters a request chooses by its model name (``--lora_modules``, and at run time ``/v1/load_lora_adapter``).

Kaito's directory contract (its transformers /chat server): every subfolder of the adapter directory holding
``adapter_config.json`` is a PEFT adapter; its weight is the float in the environment variable named after the
folder (default 1.0); they are combined as that server combines them (``engine.lora_merge``, as the weights load) and
apply to every request; ``Adapter added: <name>`` is logged for each.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping

from ..config import ServerConfig
from ..engine.lora.adapter import CONFIG_FILE, AdapterError, read_adapter
from ..engine.model.runner import Engine

logger = logging.getLogger(__name__)


def kaito_adapters(adapter_dir: str | Path, environ: Mapping[str, str] = os.environ) -> list[tuple[str, Path, float]]:
    """(name, folder, strength) of each adapter in ``adapter_dir``, by name; a strength that is not a finite number
    exits with one line."""
    folder = Path(adapter_dir)
    found = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (sub / CONFIG_FILE).is_file():
            continue
        value = environ.get(sub.name, "1.0")
        try:
            strength = float(value)
        except ValueError:
            strength = math.nan
        if not math.isfinite(strength):
            raise SystemExit(f"adapter {sub.name}: its strength, environment variable {sub.name}={value!r}, is not a "
                             "number (Kaito's adapters[].strength, 0 to 1)")
        found.append((sub.name, sub, strength))
    return found


def merged_adapters(adapter_dir: str) -> tuple[tuple[str, str, float], ...]:
    """Kaito's adapters, (name, folder, strength), for the engine to merge into the weights as they load (see
    ``LoadSpec.merged_adapters``); a directory without any serves the base model, with a warning."""
    found = tuple((name, str(path), strength) for name, path, strength in kaito_adapters(adapter_dir))
    if not found and Path(adapter_dir).is_dir():
        logger.warning("No adapters in %s (no subfolder holds %s): serving the base model", adapter_dir, CONFIG_FILE)
    return found


def register_adapters(engine: Engine, config: ServerConfig) -> None:
    """Register the adapters a request chooses by name (before the KV cache is reserved); one that cannot be
    served exits with one line naming it and the problem."""
    if not (config.lora_modules or config.runtime_lora_updating):
        return
    bank = engine.enable_lora(config.max_loras, config.max_lora_rank)
    try:
        for name, path in config.lora_modules:
            bank.register(read_adapter(name, path, engine.adapter_shapes, config.max_lora_rank, bank.dtype))
            logger.info("Adapter added: %s (%s), chosen by model name", name, path)
    except AdapterError as exc:
        raise SystemExit(str(exc)) from None
