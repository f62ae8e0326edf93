"""Checks made before anything heavy loads: can the model named on the command line be found at all?

Each failure here is a user's mistake (a wrong path, an incomplete download, no network), so it ends start-up at
once with one line saying what to do, rather than with a traceback from deep inside transformers a minute later.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from .config import ServerConfig
from .engine.quantization.schemes import scheme_refusal
from .variants import find_variant, memory_shortfall

HUB_TIMEOUT_S = 3.0  # a reachable Hub answers in well under a second; an unreachable one should not cost a minute
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILE = "tokenizer.json"  # what every Falcon checkpoint ships (a fast BPE tokenizer)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def check_model_source(config: ServerConfig) -> ServerConfig:
    """The configuration to load with: as given, or pointing at the Hugging Face cache's copy of the checkpoint
    when that copy can be served. Exits with one line when the model cannot be found."""
    if config.model_dir is not None:
        problem = checkpoint_problem(Path(config.model_dir))
        if problem:
            raise SystemExit(f"--model_dir {config.model_dir} {problem}.{_how_to_fetch(config)}")
        return config
    if config.model_id is None:
        return config  # the demo, built on this machine
    from huggingface_hub import constants  # noqa: PLC0415 - only when a model comes from the Hub

    offline = constants.HF_HUB_OFFLINE
    # A pinned commit never changes: its cached copy is the checkpoint, and loading it needs no network.
    cached = _cached_snapshot(config) if offline or _COMMIT.match(config.revision or "") else None
    problem = checkpoint_problem(cached) if cached is not None else None
    if cached is not None and problem is None:
        return dataclasses.replace(config, model_dir=str(cached))
    wanted = f"{config.model_id} at revision {config.revision or 'main'}"
    if offline and cached is not None:  # an interrupted download
        raise SystemExit(f"HF_HUB_OFFLINE is set and the cached copy of {wanted} ({cached}) {problem}. "
                         f"{_how_to_download(config, _local_dir(config))}")
    if offline:
        raise SystemExit(f"HF_HUB_OFFLINE is set and {wanted} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}). {_how_to_download(config, _local_dir(config))}")
    unreachable = hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise SystemExit(f"The Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({unreachable}) to fetch "
                         f"{wanted}. {_how_to_download(config, _local_dir(config))}")
    return config


def check_accelerator(config: ServerConfig) -> None:
    """Exit with one line when the GPUs asked for are not there, the quantization scheme cannot run on them, or a
    variant's weights cannot fit the visible GPUs in the scheme asked for (saying which scheme would)."""
    variant = find_variant(config.model_id) or find_variant(config.model_name)
    gpu_scheme = scheme_refusal(config.quantization, "cpu") is not None  # fp8, int4: GPUs only
    if config.device == "cpu" and gpu_scheme:
        raise SystemExit(scheme_refusal(config.quantization, "cpu"))
    if config.device == "cpu" or (config.device == "auto" and variant is None and not gpu_scheme):
        return  # nothing to check: no need to import torch before the port opens
    import torch  # noqa: PLC0415 - only when there is a GPU to check

    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA GPU is visible (torch.cuda.is_available() is "
                         "False); use --device auto or --device cpu")
    gpu = torch.cuda.is_available()
    refusal = scheme_refusal(config.quantization, "cuda" if gpu else "cpu",
                             torch.cuda.get_device_capability() if gpu else None)
    if refusal:
        raise SystemExit(refusal)
    if variant is None or not gpu:
        return
    gpu_gib = [torch.cuda.mem_get_info(i)[1] / 2**30 for i in range(torch.cuda.device_count())]
    problem = memory_shortfall(variant, gpu_gib, config.quantization)
    if problem:
        raise SystemExit(problem)


def check_tensor_parallel(config: ServerConfig) -> None:
    """Exit with one line when ``--tensor_parallel_size`` cannot split this checkpoint on this machine: heads or
    K/V groups it does not divide (falcon-7b: replicas are the way), more ranks than visible GPUs, no gloo for
    the CPU. A Hub checkpoint not yet downloaded is checked once its config has loaded."""
    if config.tensor_parallel_size == 1:
        return
    import torch  # noqa: PLC0415 - only with tensor parallelism
    from transformers import AutoConfig  # noqa: PLC0415

    from .engine.parallel.sharding import tensor_parallel_refusal  # noqa: PLC0415
    from .tiny import tiny_config  # noqa: PLC0415

    if config.model_dir is not None:
        falcon = AutoConfig.from_pretrained(config.model_dir)
    elif config.is_demo:
        falcon = tiny_config("7b")  # the demo is falcon-7b-shaped
    else:
        return
    gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    problem = tensor_parallel_refusal(falcon, config.tensor_parallel_size, "cuda" if gpu else "cpu",
                                      torch.cuda.device_count() if gpu else 0)
    if problem:
        raise SystemExit(problem)


def checkpoint_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a Hugging Face-format Falcon checkpoint directory; None when nothing does."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a directory"
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights_missing = _weights_missing(path)
    if weights_missing:
        missing.append(weights_missing)
    if not (path / TOKENIZER_FILE).is_file():
        missing.append(f"the tokenizer, {TOKENIZER_FILE}")
    if not missing:
        return None
    return (f"is not a complete Falcon checkpoint, missing: {'; '.join(missing)}. A checkpoint directory holds "
            f"config.json, the weights as *.safetensors or *.bin files, and {TOKENIZER_FILE}")


def _weights_missing(path: Path) -> str | None:
    """What is missing of the weights: all of them, or shards of a sharded checkpoint. Checkpoints often carry
    the weights twice (*.safetensors and *.bin, each with an index); one complete copy is enough."""
    absent_by_index = {index.name: _absent_shards(path, index) for index in path.glob("*.index.json")}
    if absent_by_index:
        if any(not absent for absent in absent_by_index.values()):
            return None
        name, absent = min(absent_by_index.items(), key=lambda item: len(item[1]))
        return f"{len(absent)} of the weight files {name} lists (e.g. {absent[0]})"
    if not any(name for pattern in WEIGHT_PATTERNS for name in path.glob(pattern)):
        return "the weights, *.safetensors or *.bin"
    return None


def _absent_shards(path: Path, index: Path) -> list[str]:
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return [index.name]  # an index that cannot be read lists nothing to load
    return sorted(name for name in shards if not (path / name).is_file())


def hub_unreachable(endpoint: str, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached within ``timeout_s``; None when it answers at all."""
    import httpx  # noqa: PLC0415 - only when a model comes from the Hub

    try:
        httpx.head(endpoint, timeout=timeout_s)  # any HTTP answer, even an error status, means it is reachable
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def download_command(model_id: str, revision: str | None, local_dir: str) -> str:
    """The command that copies ``model_id`` (at ``revision``, when pinned) into ``local_dir``."""
    pin = f" --revision {revision}" if revision else ""
    return f"hf download {model_id}{pin} --local-dir {local_dir}"


def _how_to_download(config: ServerConfig, local_dir: str) -> str:
    return (f"To serve a local copy, download it where the Hub is reachable with "
            f"`{download_command(config.model_id, config.revision, local_dir)}` and start with "
            f"--model_dir {local_dir} --model_name {config.model_name}.")


def _how_to_fetch(config: ServerConfig) -> str:
    variant = find_variant(config.model_id) or find_variant(config.model_name)
    if variant is None:
        return ""
    return f" To fetch {variant.name}: `{download_command(variant.hf_id, variant.revision, config.model_dir)}`."


def _local_dir(config: ServerConfig) -> str:
    return config.model_id.rsplit("/", 1)[-1]


def _cached_snapshot(config: ServerConfig) -> Path | None:
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only when a model comes from the Hub
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(snapshot_download(config.model_id, revision=config.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None

