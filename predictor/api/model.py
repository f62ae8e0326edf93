"""The KServe model: loads a Falcon, turns /chat payloads into generation jobs and results into responses.

``prepare`` validates and tokenizes, ``submit`` queues the job with the batcher, ``to_response`` shapes the Falcon
/chat response: ``POST /chat`` and ``POST /v1/models/<name>:predict`` (both routes in ``server``) use them, so
that each can cancel on a client's disconnect. ``preprocess``, ``predict`` and ``postprocess`` are the same steps
behind KServe's ``kserve.Model`` interface, for the routes KServe itself serves (gRPC).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import kserve
import torch

from .. import metrics
from ..config import ServerConfig
from ..cpu_threads import set_operator_threads
from ..engine import faults
from ..engine.scheduling.batcher import Batcher
from ..engine.scheduling.drafting import DraftModel, draft_fit_refusal, tokenizer_mismatch
from ..engine.scheduling.speculating import Speculator
from ..engine.model.kv_cache import BLOCK_SIZE
from ..engine.options import GenerationJob, Limits
from ..engine.parallel.ranks import ParallelSpec, ShardedEngine, load_sharded_engine
from ..engine.model.layerwise import planned_weight_bytes
from ..engine.model.runner import Engine
from ..engine.model.loading import LoadSpec, load_engine, resolve_device_and_dtype
from ..engine.scheduling.tickets import GenerationResult, Ticket
from ..errors import GenerationFailed, InvalidRequest, ModelNotFound, NotReady
from ..tiny import build_tiny_falcon, default_cache_dir
from ..variants import cpu_memory_warning, find_variant
from .chat.mapping import to_generation_job
from .encoding import encode_text
from .chat.schema import ChatRequest, parse_chat_request
from .adapters import merged_adapters, register_adapters
from .chat_format import CHAT_STOP, render_chat
from .json_body import decode_json_body

logger = logging.getLogger(__name__)

# A lost tensor-parallel rank ends the process this long after its requests were failed: their 503s and the
# probes' get out first, then Kubernetes restarts the pod.
LOST_EXIT_AFTER_S = 2.0


@dataclass(frozen=True)
class Completion:
    """A finished job and its result, ready to be shaped into a response."""

    job: GenerationJob
    result: GenerationResult


class FalconModel(kserve.Model):
    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config.model_name)
        self.config = config
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.limits: Limits = config.limits
        self.max_batch_size: int | None = None  # sequences run at once: decided when the KV cache is reserved
        self.draining = False
        self._live: set[Ticket] = set()  # submitted and not yet answered

    def is_base(self, name: str) -> bool:
        """Whether ``name`` names the base model: its served name or one of its ``--model_alias``es."""
        return name == self.name or name in self.config.model_aliases

    def serves(self, name: str) -> bool:
        """Whether a request's ``model`` names this model or one of its adapters."""
        return self.is_base(name) or name in self.adapter_names

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self) -> bool:
        spec = self._load_spec()
        warn_on_cpu(self.config)
        if self.config.tensor_parallel_size > 1:
            self.engine = load_sharded_engine(spec, ParallelSpec(self.config.tensor_parallel_size,
                                                                 self.config.collective_timeout_s))
            self.engine.on_lost = self._engine_lost
        else:
            self.engine = load_engine(spec)
            if self.engine.device.type == "cpu":
                set_operator_threads()
        register_adapters(self.engine, self.config)
        self.limits = dataclasses.replace(
            self.config.limits, context_length=min(self.config.limits.context_length, self.engine.context_length))
        draft = self._load_draft(spec)  # before the cache's budget is measured: its weights take their room first
        self._reserve_cache(draft)
        self.engine.probe()  # the first request does not pay for lazy initialisation
        self.batcher = Batcher(self.engine, self.max_batch_size, self.config.max_queue,
                               self.config.request_timeout_s, prepare=self._compile if self.config.compile else None,
                               max_prefill_tokens=self.config.max_prefill_tokens,
                               prefix_caching=self.config.prefix_caching, dead_after_s=self.config.dead_after_s,
                               speculator=self._speculator(draft))
        self.batcher.start()
        metrics.WAITING.set_function(lambda: self.batcher.waiting)
        metrics.RUNNING.set_function(lambda: self.batcher.running_sequences)
        metrics.KV_CACHE_USAGE.set_function(lambda: self.engine.cache.usage)
        if (lora := self.engine.lora) is not None:
            metrics.LORA_INFO.source = lambda: (lora.running(), self.batcher.waiting_adapters, lora.max_loras)
        # The loaded model and libraries are ~500k long-lived objects: a full garbage collection over them stops
        # every thread for ~200 ms, health probes included. Freezing them keeps collections to new objects.
        gc.collect()
        gc.freeze()
        self.ready = True
        logger.info("Model %s is ready", self.name)
        return self.ready

    def _engine_lost(self, reason: str) -> None:
        """A rank died or hung: stop the engine as a dead worker does (every request waiting or running gets a 503,
        the probes fail), and end the process non-zero (the other ranks with it) ``LOST_EXIT_AFTER_S`` later."""
        if self.batcher is not None:
            self.batcher.stop_engine(f"the tensor-parallel engine is lost: {reason}")
        threading.Timer(LOST_EXIT_AFTER_S, self._exit_lost, args=(reason,)).start()

    def _exit_lost(self, reason: str) -> None:
        logger.critical("Exiting: the tensor-parallel engine is lost (%s)", reason)
        self.engine.kill_followers()
        logging.shutdown()
        os._exit(1)

    def _reserve_cache(self, draft: Engine | None = None) -> None:
        """Reserve the KV cache: a row per sequence that may run at once. By default as many as the memory budget
        holds, up to the device's cap (``default_row_cap``); ``--max_batch_size`` caps them explicitly. With a
        ``draft`` model, each row is one of the target's and one of the draft's, out of the same budget."""
        engine, config = self.engine, self.config
        budget = engine.kv_cache_budget(config.kv_cache_memory_gib)
        per_token = engine.cache_shape.bytes_per_token
        fit = budget // (engine.row_bytes + (draft.row_bytes if draft is not None else 0))
        logger.info("KV cache: %s bytes per token (%d layers x %d K/V heads x %d, stored as %s), %.1f MiB per "
                    "%d-token row; a budget of %.2f GiB holds %d rows", f"{per_token:,}", engine.cache_shape.layers,
                    engine.shape.kv_heads, engine.shape.head_dim, engine.cache_shape.storage,
                    engine.row_bytes / 2**20, engine.context_length, budget / 2**30, fit)
        if engine.cache_shape.fp8:
            unquantized = dataclasses.replace(engine.cache_shape, fp8=False).bytes_per_token
            logger.info("KV cache in fp8: %.2fx the rows the same budget holds in %s (%d)", unquantized / per_token,
                        str(engine.cache_shape.dtype).removeprefix("torch."),
                        budget // (engine.context_length * unquantized))
        if fit < self.limits.max_num_return_sequences:
            raise SystemExit(f"the KV cache budget of {budget / 2**30:.2f} GiB holds {fit} full-context sequences, "
                             f"fewer than --max_num_return_sequences ({self.limits.max_num_return_sequences}): "
                             "raise --kv_cache_memory or lower --max_num_return_sequences")
        if config.max_batch_size is not None:
            cap, why = config.max_batch_size, "--max_batch_size"
        else:
            cap, why = engine.row_cap()
        self.max_batch_size = min(cap, fit)
        logger.info("Running up to %d sequences at once: the KV cache budget holds %d rows, %s is %d",
                    self.max_batch_size, fit, why, cap)
        if config.max_batch_size is not None and fit < config.max_batch_size:
            logger.warning("The KV cache budget holds %d sequences: at most %d run at once, not --max_batch_size %d",
                           fit, fit, config.max_batch_size)
        # A request with more sequences than the batch size runs alone: the cache has rows for it.
        rows = max(self.max_batch_size, self.limits.max_num_return_sequences)
        cache = engine.reserve(rows, compile=config.compile)
        metrics.CACHE_CONFIG.labels(block_size=str(BLOCK_SIZE),
                                    num_gpu_blocks=str(rows * cache.capacity // BLOCK_SIZE)).set(1)
        logger.info("KV cache reserved: %d rows x %d tokens, %.0f MiB", rows, cache.capacity, cache.nbytes / 2**20)
        if draft is not None:
            logger.info("The draft model's KV cache: %.0f MiB", draft.reserve(rows).nbytes / 2**20)

    def _speculator(self, draft: Engine | None) -> Speculator | None:
        """Speculative decoding as ``--speculative_config`` asks (drafting with ``draft``, when loaded)."""
        config = self.config.speculative
        if config is None:
            return None
        if draft is None:
            return Speculator(config)
        logger.info("Speculative decoding: %s drafts %d tokens per step", config.model,
                    config.num_speculative_tokens)
        return Speculator(config, propose_all=DraftModel(draft))

    def _load_draft(self, spec: LoadSpec) -> Engine | None:
        """The draft model of ``{"method": "draft_model"}``, loaded as the target is (dtype, device; with tensor
        parallelism, whole, in rank 0's process), its tokenizer checked against the target's; None for other
        methods."""
        config = self.config.speculative
        if config is None or config.method != "draft_model":
            return None
        self._check_draft_fits(config.model, spec)
        try:
            draft = load_engine(dataclasses.replace(spec, source=config.model, revision=None, merged_adapters=()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--speculative_config: the draft model {config.model} could not be loaded: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if (why := tokenizer_mismatch(draft, self.engine)) is not None:
            raise SystemExit(f"--speculative_config: the draft model {config.model} cannot draft for this model: "
                             f"{why}")
        return draft

    def _check_draft_fits(self, model: str, spec: LoadSpec) -> None:
        """Stop start-up in one line when the draft model's weights cannot fit the GPU memory the target left:
        that of the first GPU for a quantized draft (it goes to one), of every visible GPU otherwise
        (``device_map="auto"`` spreads it). A draft that cannot be read fails its load as before."""
        device, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
        if device != "cuda":
            return  # host memory: the load itself says when it is short
        try:
            need = planned_weight_bytes(model, dtype, spec.quantization)
        except (OSError, ValueError):
            return
        gpus = [0] if spec.quantization is not None else range(torch.cuda.device_count())
        free = sum(torch.cuda.mem_get_info(gpu)[0] for gpu in gpus)
        if (refusal := draft_fit_refusal(model, need, free)) is not None:
            raise SystemExit(refusal)

    def _load_spec(self) -> LoadSpec:
        config = self.config
        if config.model_dir:
            source, revision = config.model_dir, None
        elif config.model_id:
            source, revision = config.model_id, config.revision
        else:
            source = str(build_tiny_falcon(default_cache_dir() / "tiny-falcon-7b", "7b"))
            revision = None
            logger.warning("No model chosen: serving a tiny Falcon with random weights built at %s. Its text is "
                           "noise; it shows the API works. To serve a real model pass --model_name falcon-7b "
                           "(or falcon-7b-instruct, falcon-40b, falcon-40b-instruct), or --model_dir DIR with a "
                           "Hugging Face-format Falcon checkpoint.", source)
        return LoadSpec(source=source, revision=revision, dtype=config.dtype, device=config.device,
                        quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype,
                        merged_adapters=merged_adapters(config.adapter_dir))

    def _compile(self) -> None:
        """Compile the decode step for every static shape it can take (on the batcher's decode thread: CUDA graphs
        are recorded per thread)."""
        total = len(self.engine.compiled_shapes)
        logger.info("Compiling the decode step for %d shapes (rows x columns); the model reports ready when done",
                    total)

        def progress(done: int, total: int) -> None:
            logger.info("Compiled %d of %d shapes", done, total)

        seconds = self.engine.warm_up(progress)
        logger.info("Compiled the decode step for %d shapes in %.1f s", total, seconds)

    # -- request handling ------------------------------------------------------------------------------------
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> GenerationJob:
        if isinstance(payload, kserve.InferRequest):  # KServe's gRPC ModelInfer (--enable_grpc): tensors, no text
            raise kserve.errors.InvalidInput(
                "gRPC ModelInfer does not generate text on this server: POST /v2/models/<name>/infer over HTTP "
                "takes the prompts as a BYTES tensor, or use /chat or the OpenAI routes")
        if isinstance(payload, (bytes, str)):  # KServe passes bodies not labelled as JSON through undecoded
            payload = decode_json_body(payload.encode() if isinstance(payload, str) else payload)
        return await self.prepare(parse_chat_request(payload))

    async def prepare(self, request: ChatRequest, model_name: str | None = None) -> GenerationJob:
        """Render ``messages`` in the conversation format, tokenize (off the event loop: prompts can be long) and
        map the request onto a job, with the adapter the request's ``model`` (else the route's ``model_name``)
        names. A conversation's answer is the assistant's reply, up to its next turn."""
        engine = self.require_ready()
        adapter = self.adapter_for(request.model if request.model is not None else model_name)
        prompt, stops = request.prompt or "", ()
        if request.messages is not None:
            prompt = render_chat(engine.tokenizer, [message.model_dump() for message in request.messages])
            stops = (CHAT_STOP,)
        prompt_ids = await encode_text(engine.encode, (request.prefix or "") + prompt)
        if self.config.log_prompts:
            logger.info("prompt: %r", prompt)
        return self.with_adapter(to_generation_job(request, prompt_ids, engine.info, self.limits, prompt, stops),
                                 adapter)

    # -- adapters --------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """The adapters a request may choose by name."""
        lora = self.engine.lora if self.engine is not None else None
        return lora.names() if lora is not None else []

    def adapter_for(self, name: str | None, param: str | None = "model") -> str | None:
        """The adapter a request's model name chooses: None for the base model's names (or none given);
        ``ModelNotFound`` for a name that is neither."""
        if name is None or self.is_base(name):
            return None
        if name in self.adapter_names:
            return name
        if not self.ready:
            raise NotReady(f"model {self.name} is not loaded yet")
        raise ModelNotFound(unknown_model(name, self.name).message + self._adapters_note(), param=param)

    def _adapters_note(self) -> str:
        names = self.adapter_names
        return f" and the adapters {', '.join(names)}" if names else ""

    @staticmethod
    def with_adapter(job: GenerationJob, adapter: str | None) -> GenerationJob:
        if adapter is None:
            return job
        if job.options.uses_beams:
            raise InvalidRequest("num_beams: beam search is not served with a LoRA adapter; choose the base model "
                                 "or num_beams 1", param="num_beams")
        return dataclasses.replace(job, adapter=adapter)

    async def predict(self, job: GenerationJob, headers: dict[str, str] | None = None) -> Completion:
        ticket = self.submit(job)
        return Completion(job, await ticket.result())

    def submit(self, job: GenerationJob, *, stream: bool = False) -> Ticket:
        self.require_ready()
        ticket = self.batcher.submit(job, stream=stream)
        self._live.add(ticket)
        ticket.on_settled(lambda: self._live.discard(ticket))
        return ticket

    def submit_all(self, jobs: list[GenerationJob], *, stream: bool = False) -> list[Ticket]:
        """Queue every job of a request with several prompts, or none: a full queue part way cancels those already
        queued."""
        tickets: list[Ticket] = []
        try:
            for job in jobs:
                tickets.append(self.submit(job, stream=stream))
        except BaseException:
            for ticket in tickets:
                ticket.cancel()
            raise
        return tickets

    def interrupt(self, reason: str) -> int:
        """End every request not yet answered with the text it has so far and ``reason`` as its finish reason;
        how many there were."""
        live = list(self._live)
        for ticket in live:
            ticket.cancel(reason)
        return len(live)

    def postprocess(self, completion: Completion, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self.to_response(completion)

    def to_response(self, completion: Completion) -> dict[str, Any]:
        """The Falcon /chat response: ``Result`` is a string, or a list for several sequences; ``details`` adds
        token counts, finish reasons and (when asked) per-token log-probabilities."""
        job, result = completion.job, completion.result
        texts = [cut_at_stop(detokenized(job, lambda: self.engine.continuation(
            job.prompt_ids, seq.token_ids, job.clean_up_tokenization_spaces)), job.stop_texts)
            for seq in result.sequences]
        if job.return_full_text:
            texts = [job.prompt + text for text in texts]
        details: dict[str, Any] = {
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": [len(seq.token_ids) for seq in result.sequences],
            "finish_reasons": [seq.finish_reason for seq in result.sequences],
        }
        if job.truncated_tokens:
            details["truncated_prompt_tokens"] = job.truncated_tokens
        if job.options.logprobs:
            details["logprobs"] = [[token.logprob for token in seq.logprobs or ()] for seq in result.sequences]
        if self.config.log_prompts:
            logger.info("generated: %r", texts)
        return {"Result": texts[0] if len(texts) == 1 else texts, "details": details}

    def require_ready(self) -> Engine:
        if not self.ready or self.engine is None or self.batcher is None:
            raise NotReady(f"model {self.name} is not loaded yet")
        return self.engine

    def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            self.batcher.close()
        if isinstance(self.engine, ShardedEngine):
            self.engine.close()


def detokenized(job: GenerationJob, decode: Callable[[], str]) -> str:
    """The text ``decode`` makes of some of ``job``'s tokens; if that raises, this request alone fails, with a 500
    that names the stage."""
    try:
        faults.inject("detokenization", job.prompt_ids)
        return decode()
    except Exception as exc:  # noqa: BLE001 - a tokenizer's fault on these ids, not the server's
        logger.error("Detokenizing a request's tokens failed", exc_info=exc)
        raise GenerationFailed(f"the generated tokens could not be turned into text ({type(exc).__name__})",
                               stage="detokenization") from exc


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the first of ``stops`` in it."""
    return text[:min((text.find(stop) for stop in stops if stop in text), default=len(text))]


def warn_on_cpu(config: ServerConfig) -> None:
    """A real Falcon on the CPU: say what its weights need (the GPUs were checked before start-up, in preflight)."""
    import torch

    variant = find_variant(config.model_id) or find_variant(config.model_name)
    if variant is not None and (config.device == "cpu" or not torch.cuda.is_available()):
        logger.warning(cpu_memory_warning(variant, config.dtype))


def unknown_model(requested: str, served: str) -> ModelNotFound:
    return ModelNotFound(f"model {requested} is not served here; this server serves {served}")
