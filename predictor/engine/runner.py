"""The model and its tokenizer: loading, and the tensor work of batched generation.

The engine knows nothing of HTTP or KServe. The batcher drives it step by step: ``prefill`` starts sequences,
``decode_step`` advances every running sequence by one token, ``join`` and ``select`` let sequences join and leave a
running batch between steps (iteration-level scheduling). The running batch's KV cache is a ``KVBatch`` that grows
and shrinks with it, or, after ``use_static_cache``, the fixed-shape ``SlotCache`` whose decode step is compiled.
Beam search, which keeps several hypotheses per request, runs through transformers' ``generate`` in
``generate_beams``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from .group_beam_search import group_beam_search
from .options import GenerationOptions, ModelInfo
from .static_cache import SlotCache

logger = logging.getLogger(__name__)

# Prompt tokens decoded in front of generated ones: enough for a UTF-8 character (at most 4 bytes) split over
# byte-level tokens at the boundary.
PROMPT_CONTEXT_TOKENS = 4


@dataclass(frozen=True)
class LoadSpec:
    """Where the weights come from and how to place them."""

    source: str  # local directory or Hugging Face id
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_in_8bit: bool = False


@dataclass
class KVBatch:
    """The running sequences' attention state: KV cache, padding mask and next positions."""

    cache: DynamicCache
    mask: torch.Tensor  # [batch, cached] 1 where a real token sits, 0 for left padding
    positions: torch.Tensor  # [batch] position of each sequence's next token

    @property
    def size(self) -> int:
        return self.mask.shape[0]


@dataclass(frozen=True)
class BeamOutput:
    """Beam search results: each returned sequence's generated ids and (when asked) log-probabilities."""

    sequences: list[list[int]]
    logprobs: list[list[float]] | None
    finished: list[bool]  # ended with eos rather than by length


class Engine:
    """A loaded Falcon model and tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        config = model.config
        generation = model.generation_config
        eos = _first(generation.eos_token_id) if generation is not None else None
        self.info = ModelInfo(vocab_size=config.vocab_size,
                              eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id,
                              generation_defaults=generation.to_diff_dict() if generation is not None else {})
        self.context_length = getattr(config, "max_position_embeddings", 2048)
        self.slots: SlotCache | None = None  # the static cache, when used

    def use_static_cache(self, slots: int, capacity: int, compile: bool, smallest_tier: int = 128) -> float:
        """Decode from here on with a static KV cache of ``slots`` rows and ``capacity`` columns, compiled when
        ``compile``; every shape a step can take is run (and compiled) now. Returns the seconds that took."""
        layout, _ = self.prefill([[self.info.eos_token_id or 0]])
        self.slots = SlotCache(self.model, layout.cache, slots, capacity, self._pad_token_id, compile, smallest_tier)
        logger.info("Static KV cache: %d rows x %d columns, %.0f MiB", slots, capacity, self.slots.nbytes / 2**20)
        return self.slots.warm_up()

    @property
    def _pad_token_id(self) -> int:
        pad = self.info.pad_token_id if self.info.pad_token_id is not None else self.info.eos_token_id
        return pad or 0

    # -- text ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int], clean_up_tokenization_spaces: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if clean_up_tokenization_spaces:
            # transformers 5 ignores this flag for BPE tokenizers such as Falcon's; the /chat service this replaces
            # ran on transformers 4, where it removed spaces before punctuation. Clients asking for it get that.
            text = self.tokenizer.clean_up_tokenization(text)
        return text

    def continuation(self, prompt_ids: Sequence[int], generated_ids: Sequence[int],
                     clean_up_tokenization_spaces: bool = False) -> str:
        """The text ``generated_ids`` add after the prompt. The last few prompt tokens are decoded with them and
        their text cut off again, so a character whose bytes straddle the boundary comes out whole."""
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        before = self.decode(context, clean_up_tokenization_spaces)
        return self.decode(context + list(generated_ids), clean_up_tokenization_spaces)[len(before):]

    # -- batched decoding ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
        """Run the prompts (left-padded together) and return their state and next-token logits [n, vocab]."""
        width = max(len(p) for p in prompts)
        pad = self._pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # [n, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not advance positions
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1, :]
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return KVBatch(cache, mask, positions), logits

    def join(self, running: KVBatch | SlotCache | None, joining: KVBatch) -> KVBatch | SlotCache:
        """The running batch with a prefill's sequences added after its own rows (``running`` None: no batch)."""
        if self.slots is not None:
            if running is None:
                self.slots.clear()
            self.slots.add(joining.cache, joining.mask, joining.positions)
            return self.slots
        return joining if running is None else self.merge(running, joining)

    @torch.inference_mode()
    def decode_step(self, batch: KVBatch | SlotCache, tokens: list[int]) -> torch.Tensor:
        """Feed each sequence its last chosen token; return next-token logits [batch, vocab]."""
        if isinstance(batch, SlotCache):
            return batch.step(tokens)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)  # [batch, 1]
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.size, 1)], dim=1)
        logits = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=batch.positions.unsqueeze(1),
                            cache=batch.cache, use_cache=True).logits[:, -1, :]
        batch.positions = batch.positions + 1
        return logits

    @staticmethod
    def merge(running: KVBatch, joining: KVBatch) -> KVBatch:
        """One batch holding both; the shorter cache is left-padded so every row ends at the same column."""
        width = max(running.mask.shape[1], joining.mask.shape[1])
        for batch in (running, joining):
            missing = width - batch.mask.shape[1]
            if missing:
                batch.mask = torch.nn.functional.pad(batch.mask, (missing, 0))
                for layer in batch.cache.layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))
        for mine, theirs in zip(running.cache.layers, joining.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        return KVBatch(running.cache, torch.cat([running.mask, joining.mask]),
                       torch.cat([running.positions, joining.positions]))

    @staticmethod
    def select(batch: KVBatch | SlotCache, keep: list[int]) -> KVBatch | SlotCache | None:
        """Keep only rows ``keep`` (ascending; None when empty) and drop cache columns that are padding for every
        remaining row."""
        if isinstance(batch, SlotCache):
            batch.keep(keep)
            return batch if keep else None
        if not keep:
            return None
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask[index]
        first_used = int(mask.any(dim=0).int().argmax())  # leading columns no row attends to
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]
        return KVBatch(batch.cache, mask[:, first_used:], batch.positions[index])

    # -- beam search -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_beams(self, prompt_ids: list[int], options: GenerationOptions,
                       should_stop: Callable[[], bool]) -> BeamOutput:
        """Beam search (diverse when num_beam_groups > 1) for one prompt with transformers' ``generate``."""
        ids = torch.tensor([prompt_ids], device=self.device)
        kwargs = options.to_generate_kwargs()
        if options.stop_strings:
            kwargs["tokenizer"] = self.tokenizer  # generate matches stop strings with it
        if options.num_beam_groups > 1:
            kwargs["custom_generate"] = group_beam_search  # the project's own: transformers 5 moved it to the Hub
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a seed affects this request only
            if options.seed is not None:
                torch.manual_seed(options.seed)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      stopping_criteria=StoppingCriteriaList([_StopWhen(should_stop)]), **kwargs)
        sequences = _strip(out.sequences[:, ids.shape[1]:], options)
        logprobs = None
        if options.logprobs:
            scores = self.model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                          normalize_logits=False)
            logprobs = [row[: len(seq)].tolist() for row, seq in zip(scores, sequences)]
        eos = set(options.eos_token_ids)
        finished = [bool(seq) and seq[-1] in eos for seq in sequences]
        return BeamOutput(sequences=sequences, logprobs=logprobs, finished=finished)


def _strip(generated: torch.Tensor, options: GenerationOptions) -> list[list[int]]:
    """Generated ids up to and including the first eos (beam outputs are padded after it)."""
    eos = set(options.eos_token_ids)
    result = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:end])
    return result


class _StopWhen(StoppingCriteria):
    """Stops generate() when the request was cancelled or ran out of time."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _first(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """``auto`` picks CUDA with bfloat16 when a GPU is visible, else the CPU with float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible")
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def load_engine(spec: LoadSpec) -> Engine:
    """Load the tokenizer and model with transformers (native Falcon code; remote code is never run)."""
    device, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    if spec.load_in_8bit and (device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        raise SystemExit("--load_in_8bit needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes)")
    logger.info("Loading %s (revision %s) on %s as %s", spec.source, spec.revision or "default", device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec.source, revision=spec.revision, trust_remote_code=False)
    # PyTorch's scaled-dot-product attention (fused kernels on GPUs); named so a transformers default cannot change it
    kwargs: dict = dict(revision=spec.revision, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa")
    if device == "cuda":
        kwargs["device_map"] = "auto"  # splits the layers over every visible GPU (falcon-40b needs two)
        if spec.load_in_8bit:
            from transformers import BitsAndBytesConfig  # noqa: PLC0415 - needs bitsandbytes, GPU only

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs)
    if device == "cpu":
        model = model.to("cpu")
    model.eval()
    logger.info("Loaded %s: %s parameters", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}")
    return Engine(model, tokenizer)
