"""Command-line configuration: KServe's flags plus this server's, parsed once into a frozen ``ServerConfig``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Sequence

from .engine.options import Limits, SpeculativeConfig, parse_speculative_config
from .engine.quantization.schemes import KAITO_FLAGS, KV_CACHE_DTYPES, SCHEMES
from .logs import LOG_FORMATS
from .variants import VARIANTS, closest_variant, find_variant

DEMO_MODEL_NAME = "falcon-tiny-demo"
KSERVE_DEFAULT_MODEL_NAME = "model"  # KServe's default --model_name: no model was named
SHUTDOWN_AFTER_DRAIN_S = 10  # the most the process takes to exit once --drain_timeout is over
DEFAULT_ADAPTER_DIR = "/mnt/adapter"  # where Kaito mounts a workspace's adapters

# KServe's flags, grouped as ``--help`` shows them. Those of a KServe transformer (a process that calls a predictor)
# do nothing in this server: they are accepted, as KServe's parser takes them, and hidden from ``--help``.
KSERVE_GROUPS: dict[str, tuple[str, ...]] = {
    "server (KServe's flags)": ("--http_port", "--model_name", "--ssl_certfile", "--ssl_keyfile",
                                "--timeout-keep-alive", "--event-loop", "--max_asyncio_workers",
                                "--enable_docs_url"),
    "gRPC (KServe's flags; off by default)": ("--enable_grpc", "--grpc_port", "--max_threads",
                                              "--grpc_max_send_message_length",
                                              "--grpc_max_receive_message_length"),
    "KServe's logging": ("--configure_logging", "--log_config_file", "--access_log_format",
                         "--enable_latency_logging"),
}
# KServe's help where it says too little about what the flag does in this server
KSERVE_HELP = {
    "--grpc_port": "the port of the gRPC service, with --enable_grpc true",
    "--max_asyncio_workers": "threads of the event loop's default executor, where prompts are tokenized and "
                             "adapters read; default: min(32, CPUs + 4)",
    "--enable_latency_logging": "KServe's timing line per request (preprocess/predict/postprocess); logged only "
                                "with --log_requests",
}
KSERVE_TRANSFORMER_FLAGS = ("--predictor_host", "--protocol", "--predictor_protocol", "--predictor_use_ssl",
                            "--predictor_request_timeout_seconds", "--predictor_request_retries",
                            "--enable_predictor_health_check")
# One process serves: more uvicorn workers would each load a copy of the model and lose the routes added to
# KServe's app. Only 1 is accepted, and the flag is hidden from --help.
KSERVE_REFUSED_FLAGS = ("--workers",)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know, after defaults and environment variables are applied."""

    model_name: str
    model_aliases: tuple[str, ...]  # other names the OpenAI routes answer to (KServe's publishers/<ns>/models/<name>)
    model_id: str | None  # Hugging Face id (loaded from the local Hugging Face cache or the Hub)
    model_dir: str | None  # local Hugging Face-format checkpoint; wins over model_id
    revision: str | None
    dtype: str  # "auto": bfloat16 on a GPU, float32 on the CPU
    device: str  # "auto": every visible GPU if there is one, else the CPU
    http_port: int
    enable_grpc: bool  # KServe's v2 gRPC service on grpc_port: health and metadata; it generates no text
    grpc_port: int
    limits: Limits
    max_batch_size: int | None  # sequences decoded together in one forward pass; None: as many as memory holds
    max_queue: int  # requests waiting for a batch slot before new ones get 429
    request_timeout_s: float  # generation time one request may take before it is cut short
    max_body_bytes: int
    max_header_bytes: int  # request line and headers; larger ones get 431
    header_timeout_s: float  # how long a client may take to send them before its connection is closed
    drain_timeout_s: float  # how long SIGTERM waits for in-flight requests
    dead_after_s: float  # how long the engine may stay broken before liveness fails
    api_key: str | None
    log_prompts: bool
    quantization: str | None  # "int8", "fp8" or "int4": the linear layers' weights; None: the model's dtype
    compile: bool  # a compiled decode step over static shapes
    kv_cache_memory_gib: float | None  # None: derived from the free memory
    max_prefill_tokens: int  # prompt tokens one step computes
    prefix_caching: bool  # reuse the KV cache of a prompt's cached prefix
    log_format: str  # "text" or "json" (one object per line); either way each line names its request
    log_requests: bool  # a log line per request (uvicorn's access log and KServe's timings)
    adapter_dir: str  # Kaito's adapter directory: every adapter in it is merged into the weights, when it exists
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path): adapters a request chooses by its model name
    max_loras: int = 4  # adapters one step serves
    max_lora_rank: int = 16
    runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_root: str | None = None  # where those may load from; None: adapter_dir
    kv_cache_dtype: str = "auto"  # "fp8": keys and values in 8 bits
    tensor_parallel_size: int = 1  # ranks (processes, one per GPU) every layer is split over
    collective_timeout_s: float = 60.0  # how long a rank may keep the others waiting before the server ends
    speculative: SpeculativeConfig | None = None  # speculative decoding (n-gram drafts); None: off

    @property
    def is_demo(self) -> bool:
        """No model was chosen: serve a tiny Falcon built on this machine."""
        return self.model_dir is None and self.model_id is None


def build_parser() -> argparse.ArgumentParser:
    """KServe's model-server parser extended with this server's flags (``--help`` lists both)."""
    from kserve import model_server  # importing KServe parses sys.argv and builds its app: only when asked

    parser = argparse.ArgumentParser(
        prog="python -m predictor", parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a Falcon model with KServe: POST /chat, KServe's v1/v2 routes and OpenAI-compatible "
                    "routes. With no model chosen it serves a tiny random Falcon built locally, as a demo.")
    add_predictor_arguments(parser)
    group_kserve_arguments(parser)
    # KServe's flags, whose meaning or default this server changes. Each action is shared with KServe's parser
    # (argparse parents share actions), which has parsed sys.argv already when this runs.
    parser.set_defaults(enable_grpc=False)
    parser._option_string_actions["--enable_grpc"].help = (
        "serve KServe's v2 gRPC service on --grpc_port: health (ServerLive, ServerReady, ModelReady) and model "
        "metadata only, since its ModelInfer carries tensors, not text (it answers INVALID_ARGUMENT; text "
        "generation is HTTP's: /chat, /v1/..., /v2/models/<name>/infer). Off unless a gRPC health check needs it")
    parser._option_string_actions["--model_name"].help = (
        "the name the model is served under (URL paths, OpenAI 'model'). Alone it selects the Falcon variant to "
        f"serve from the Hugging Face Hub at its pinned revision: {', '.join(VARIANTS)}; with --model_dir or "
        f"--model_id it is only the served name. Not given (KServe's default '{KSERVE_DEFAULT_MODEL_NAME}'): the "
        f"tiny random-weight demo, served as {DEMO_MODEL_NAME}")
    return parser


def group_kserve_arguments(parser: argparse.ArgumentParser) -> None:
    """Move KServe's flags from argparse's one "options" list into ``KSERVE_GROUPS``, shown before this server's
    own groups, and hide those that do nothing here."""
    options = parser._optionals
    groups = []
    for title, flags in KSERVE_GROUPS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            action = parser._option_string_actions[flag]
            options._group_actions.remove(action)
            group._group_actions.append(action)
        groups.append(parser._action_groups.pop())
    after = parser._action_groups.index(options) + 1
    parser._action_groups[after:after] = groups
    for flag, help_text in KSERVE_HELP.items():
        parser._option_string_actions[flag].help = help_text
    for flag in KSERVE_TRANSFORMER_FLAGS + KSERVE_REFUSED_FLAGS:
        parser._option_string_actions[flag].help = argparse.SUPPRESS


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """This server's own flags; the defaults shown by ``--help`` are the ones in force."""
    model = parser.add_argument_group("model")
    model.add_argument("--model_id", default=None,
                       help="Hugging Face model id; defaults to the variant named by --model_name "
                            "(falcon-7b, falcon-7b-instruct, falcon-40b, falcon-40b-instruct)")
    model.add_argument("--model_dir", default=None,
                       help="local directory with a Hugging Face-format Falcon checkpoint, e.g. /mnt/models where "
                            "KServe's storage initializer puts weights; takes precedence over --model_id")
    model.add_argument("--model_alias", action="append", default=[], metavar="NAME",
                       help="another name the OpenAI routes accept in 'model' (repeatable), as vLLM's extra "
                            "--served-model-name: KServe's LLMInferenceService routes by "
                            "publishers/<namespace>/models/<name>. Answers still name --model_name")
    model.add_argument("--revision", default=None, help="revision of --model_id; defaults to the variant's pin")
    model.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="weights dtype; auto is bfloat16 on a GPU, float32 on the CPU")
    model.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                       help="auto uses every visible GPU (layers split across them) if any, else the CPU")
    model.add_argument("--quantization", default=None, choices=SCHEMES,
                       help="store Falcon's linear layers in fewer bits: int8 (weight-only, per row; the CPU and "
                            "every GPU), fp8 (weights and activations; GPUs with FP8, compute capability 8.9+: "
                            "L4, H100, H200), int4 (weight-only, groups of 128; GPUs of compute capability 8.0+). "
                            "falcon-40b fits one 80 GB GPU in int8 or fp8. Default: the model's dtype")
    model.add_argument("--load_in_8bit", action=argparse.BooleanOptionalAction, default=False,
                       help="Kaito's flag: the same as --quantization int8")
    model.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=False,
                       help="Kaito's flag: the same as --quantization int4 (GPUs only)")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="decode with a torch.compile'd step over a few static shapes of the KV cache, "
                            "replayed as CUDA graphs on a GPU; every shape is compiled while loading, before the "
                            "model reports ready (the log counts the shapes and says how long it took)")

    limits = parser.add_argument_group("limits")
    defaults = Limits()
    limits.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens,
                        help="most tokens one sequence may generate")
    limits.add_argument("--max_num_beams", type=int, default=defaults.max_num_beams,
                        help="most beams (num_beams) one request may ask for")
    limits.add_argument("--max_num_return_sequences", type=int, default=defaults.max_num_return_sequences,
                        help="most sequences (num_return_sequences) one request may ask for")
    limits.add_argument("--max_sequences_per_request", type=int, default=defaults.max_sequences,
                        help="cap on num_beams * num_return_sequences (/chat) and on prompts * n (OpenAI completions)")
    limits.add_argument("--max_batch_size", type=int, default=None,
                        help="sequences decoded together; default: as many as the KV cache budget holds, up to "
                             "1024 on GPUs of 70 GiB or more other than the A100 and 256 elsewhere (the CPU "
                             "included)")
    limits.add_argument("--max_queue", type=int, default=128,
                        help="requests waiting for a batch slot; past it requests get 429 with Retry-After")
    limits.add_argument("--request_timeout", type=float, default=300.0,
                        help="seconds of generation one request may use; then it stops with finish_reason "
                             "'time_limit' and returns what it has. A request still waiting for a slot after as "
                             "long gets 504")
    limits.add_argument("--max_body_bytes", type=int, default=2 * 1024 * 1024,
                        help="largest request body; larger ones get 413 before parsing")
    limits.add_argument("--max_header_bytes", type=int, default=64 * 1024,
                        help="largest request line and headers together; larger ones get 431 and the connection "
                             "is closed (idle keep-alive connections close after --timeout-keep-alive)")
    limits.add_argument("--header_timeout", type=float, default=10.0,
                        help="seconds a client may take to send a request's headers (from its first byte, or from "
                             "connecting); then the connection is closed")
    limits.add_argument("--drain_timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for in-flight requests; then those still running end with "
                             "their text so far and finish_reason 'shutdown', and the process exits 0 within "
                             f"{SHUTDOWN_AFTER_DRAIN_S} s")
    limits.add_argument("--dead_after", type=float, default=120.0,
                        help="seconds the engine may stay broken (failing its self-check, e.g. a lost GPU), or a "
                             "worker with work may make no progress, before GET /livez answers 503 so that "
                             "Kubernetes restarts the pod")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--kv_cache_memory", type=float, default=None, metavar="GIB",
                        help="GiB reserved at start-up for the KV cache, which holds a row of the full context per "
                             "running sequence; default: 90%% of the GPU memory the weights leave free, 4 GiB on "
                             "the CPU. Rows are capped at --max_batch_size")
    engine.add_argument("--kv_cache_dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="how the KV cache stores keys and values: auto, in the model's dtype; fp8, as float8 "
                             "e4m3 with a scale per token and head (CPU and GPU), so the same --kv_cache_memory "
                             "holds about twice the rows (attention still computes in the model's dtype)")
    engine.add_argument("--max_prefill_tokens", type=int, default=512,
                        help="prompt tokens computed in one step beside the running sequences' next tokens: a "
                             "longer prompt is computed in chunks over several steps, so running streams never "
                             "wait long for it; larger values reach a long prompt's first token sooner")
    engine.add_argument("--tensor_parallel_size", type=int, default=1, metavar="N",
                        help="split every layer over N processes, one per GPU, started by this server (rank 0 "
                             "serves, the others follow each step; NCCL on GPUs, gloo on the CPU): the K/V groups "
                             "of attention and the MLP are divided, so each GPU holds 1/N of the weights and of the "
                             "KV cache. N must divide the model's K/V groups (falcon-40b: 1, 2, 4, 8); falcon-7b "
                             "(one K/V head) scales by replicas instead. Beam search is refused when N > 1")
    engine.add_argument("--collective_timeout", type=float, default=60.0, metavar="SECONDS",
                        help="with --tensor_parallel_size above 1: how long a rank may keep the others waiting in a "
                             "step; a rank that dies or hangs fails the running requests with 503 and ends the "
                             "server non-zero")
    engine.add_argument("--prefix_caching", action=argparse.BooleanOptionalAction, default=True,
                        help="a prompt that begins with a prefix the KV cache still holds (an earlier turn of a "
                             "conversation, a shared system prompt) copies its keys and values instead of "
                             "computing them again; cached prefixes live in free rows only")
    engine.add_argument("--speculative_config", default=None, metavar="JSON",
                        help="speculative decoding, with vLLM's keys: '{\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4, "
                             "\"disable_by_batch_size\": 32}' or '{\"method\": \"draft_model\", \"model\": "
                             "DIR, \"num_speculative_tokens\": 4}'. Each step a running sequence drafts up to k "
                             "tokens (by finding its last n-gram earlier in its prompt and output, or from a smaller "
                             "model with the same tokenizer) and the model checks them all in one pass; the output "
                             "is the same as without (docs/speculative-decoding.md). Off above "
                             "disable_by_batch_size running sequences; a sequence whose drafts fail drafts fewer, "
                             "then none. Default: off")

    adapters = parser.add_argument_group("LoRA adapters")
    adapters.add_argument("--adapter_dir", default=DEFAULT_ADAPTER_DIR,
                          help="Kaito's adapter directory, used when it exists: each subfolder holding "
                               "adapter_config.json is a PEFT LoRA adapter, weighted by the environment variable "
                               "named after the folder (default 1.0), all combined as Kaito's server combines them "
                               "and merged into the weights for every request")
    adapters.add_argument("--lora_modules", nargs="+", default=[], metavar="NAME=PATH",
                          help="PEFT LoRA adapters a request chooses by name (OpenAI's and /chat's 'model', "
                               "KServe's model routes), each served beside the base model in the shared batch")
    adapters.add_argument("--max_loras", type=int, default=4,
                          help="adapters one step serves; requests for further adapters wait for a slot")
    adapters.add_argument("--max_lora_rank", type=int, default=16, help="largest adapter rank served")
    adapters.add_argument("--runtime_lora_updating", action=argparse.BooleanOptionalAction, default=False,
                          help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes)")
    adapters.add_argument("--lora_root", default=None,
                          help="the folder runtime loading may read adapters from; default: --adapter_dir")

    security = parser.add_argument_group("security")
    security.add_argument("--api_key", default=None,
                          help="if set (or $PREDICTOR_API_KEY), /chat and inference routes need "
                               "'Authorization: Bearer <key>'; health and metrics stay open")
    security.add_argument("--log_prompts", action=argparse.BooleanOptionalAction, default=False,
                          help="log prompts and generated text (off: they may hold personal data)")

    logs = parser.add_argument_group("logs")
    logs.add_argument("--log_format", default="text", choices=LOG_FORMATS,
                      help="text lines, or one JSON object per line (time, level, logger, request_id, message) for a "
                           "log collector; every line about a request names its id (the client's X-Request-ID, "
                           "else a new one)")
    logs.add_argument("--log_requests", action=argparse.BooleanOptionalAction, default=False,
                      help="log a line per request (uvicorn's access log and KServe's per-request timings); off, "
                           "a probe every few seconds or a burst of bad requests does not flood the log")


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse the command line (``sys.argv`` when ``argv`` is None) into a ``ServerConfig``."""
    args = build_parser().parse_args(argv)
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Apply defaults and the variants table; a flag that cannot be served exits with one line saying why."""
    variant = find_variant(args.model_id) or find_variant(args.model_name)
    model_id = args.model_id or (variant.hf_id if variant else None)
    revision = args.revision or (variant.revision if variant and model_id == variant.hf_id else None)
    model_name = args.model_name
    if args.model_dir is None and model_id is None:
        if model_name not in (KSERVE_DEFAULT_MODEL_NAME, DEMO_MODEL_NAME):
            raise SystemExit(unknown_variant_message(model_name))
        model_name = DEMO_MODEL_NAME
    limits = Limits(
        context_length=variant.context_length if variant else Limits.context_length,
        max_new_tokens=args.max_new_tokens, max_num_beams=args.max_num_beams,
        max_num_return_sequences=args.max_num_return_sequences, max_sequences=args.max_sequences_per_request,
        beams_refused=(f"beam search is not served with --tensor_parallel_size {args.tensor_parallel_size}: use "
                       "num_beams 1 (greedy or sampling)" if args.tensor_parallel_size > 1 else None))
    for flag in ("max_new_tokens", "max_num_beams", "max_num_return_sequences", "max_sequences_per_request",
                 "max_batch_size", "max_queue", "max_body_bytes", "max_header_bytes", "max_prefill_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be at least 1")
    for flag in ("max_loras", "max_lora_rank"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be at least 1")
    lora_modules = parse_lora_modules(args.lora_modules, (model_name, *args.model_alias))
    if args.header_timeout <= 0:
        raise SystemExit("--header_timeout must be above 0 seconds")
    if args.tensor_parallel_size < 1:
        raise SystemExit(f"--tensor_parallel_size must be at least 1, not {args.tensor_parallel_size}")
    if args.collective_timeout <= 0:
        raise SystemExit("--collective_timeout must be above 0 seconds")
    if any(not alias.strip() for alias in args.model_alias):
        raise SystemExit("--model_alias must not be empty")
    speculative = None
    if args.speculative_config is not None:
        try:
            speculative = parse_speculative_config(args.speculative_config)
        except ValueError as exc:
            raise SystemExit(f"--speculative_config: {exc}") from None
    if args.workers != 1:
        raise SystemExit(f"--workers {args.workers}: one process serves (more would each load the model and "
                         "lose this server's routes); the batch shares one model, so scale with replicas")
    return ServerConfig(
        model_name=model_name, model_aliases=tuple(dict.fromkeys(args.model_alias)), model_id=model_id,
        model_dir=args.model_dir, revision=revision, dtype=args.dtype, device=args.device, http_port=args.http_port,
        enable_grpc=args.enable_grpc, grpc_port=args.grpc_port, limits=limits, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes, header_timeout_s=args.header_timeout,
        drain_timeout_s=args.drain_timeout, dead_after_s=args.dead_after,
        api_key=args.api_key or os.environ.get("PREDICTOR_API_KEY") or None, log_prompts=args.log_prompts,
        quantization=quantization_from_args(args), compile=args.compile, kv_cache_memory_gib=args.kv_cache_memory,
        max_prefill_tokens=args.max_prefill_tokens, prefix_caching=args.prefix_caching,
        log_format=args.log_format, log_requests=args.log_requests, adapter_dir=args.adapter_dir,
        lora_modules=lora_modules, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        runtime_lora_updating=args.runtime_lora_updating, lora_root=args.lora_root,
        tensor_parallel_size=args.tensor_parallel_size, collective_timeout_s=args.collective_timeout,
        kv_cache_dtype=args.kv_cache_dtype, speculative=speculative)


def quantization_from_args(args: argparse.Namespace) -> str | None:
    """The scheme ``--quantization`` names, or Kaito's ``--load_in_8bit`` / ``--load_in_4bit`` mean; two that
    disagree exit with one line."""
    asked = {f"--{flag}": scheme for flag, scheme in KAITO_FLAGS.items() if getattr(args, flag)}
    if args.quantization is not None:
        asked[f"--quantization {args.quantization}"] = args.quantization
    if len(set(asked.values())) > 1:
        raise SystemExit(f"{' and '.join(asked)} ask for different weights; give one of them")
    return next(iter(asked.values()), None)


def parse_lora_modules(values: Sequence[str], model_names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=PATH`` pairs, each name new and none of the served model's ``model_names`` (its name, aliases)."""
    modules: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora_modules {value}: expected NAME=PATH")
        if name in model_names or name in modules:
            raise SystemExit(f"--lora_modules {value}: the name {name} is already served")
        modules[name] = path
    return tuple(modules.items())


def unknown_variant_message(model_name: str) -> str:
    """Why ``--model_name`` alone cannot be served, and the two ways that work."""
    closest = closest_variant(model_name)
    guess = f" Did you mean {closest}?" if closest else ""
    return (f"--model_name {model_name} names no Falcon variant ({', '.join(VARIANTS)}).{guess} To serve a "
            f"checkpoint directory under this name, add --model_dir DIR (a Hugging Face-format Falcon checkpoint); "
            f"with no --model_name the server runs its demo, {DEMO_MODEL_NAME}.")

