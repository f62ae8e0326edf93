"""The adapters a server serves: Kaito's adapter directory, merged into the weights at start-up, and the named
adapters a request chooses by its model name (``--lora_modules``, and at run time ``/v1/load_lora_adapter``).

Kaito's directory contract (its transformers /chat server): every subfolder of the adapter directory holding
``adapter_config.json`` is a PEFT adapter; its weight is the float in the environment variable named after the
folder (default 1.0); they are combined as that server combines them (``engine.lora_merge``) and apply to every
request; ``Adapter added: <name>`` is logged for each.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping

from ..config import ServerConfig
from ..engine.lora import CONFIG_FILE, AdapterError, linear_shapes, read_adapter
from ..engine.lora_merge import combined_deltas, merge_into
from ..engine.runner import Engine

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


def load_adapters(engine: Engine, config: ServerConfig) -> None:
    """Merge Kaito's adapters into the weights and register the named ones (before the KV cache is reserved); an
    adapter that cannot be served exits with one line naming it and the problem."""
    shapes = linear_shapes(engine.model)
    dtype = next(p.dtype for p in engine.model.parameters() if p.is_floating_point())
    try:
        kaito = [(read_adapter(name, path, shapes, math.inf, dtype), strength)
                 for name, path, strength in kaito_adapters(config.adapter_dir)]
        if kaito:
            merge_into(engine.model, combined_deltas(kaito))
            for adapter, strength in kaito:
                logger.info("Adapter added: %s", adapter.name)
            logger.info("Merged %d adapter(s) of %s into the weights (strengths %s)", len(kaito), config.adapter_dir,
                        ", ".join(f"{a.name}={s:g}" for a, s in kaito))
        elif Path(config.adapter_dir).is_dir():
            logger.warning("No adapters in %s (no subfolder holds %s): serving the base model", config.adapter_dir,
                           CONFIG_FILE)
        if config.lora_modules or config.runtime_lora_updating:
            bank = engine.enable_lora(config.max_loras, config.max_lora_rank)
            for name, path in config.lora_modules:
                bank.register(read_adapter(name, path, shapes, config.max_lora_rank, dtype))
                logger.info("Adapter added: %s (%s), chosen by model name", name, path)
    except AdapterError as exc:
        raise SystemExit(str(exc)) from None
