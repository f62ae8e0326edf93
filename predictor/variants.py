"""The four Falcon variants this server knows: the one place that describes them.

CLI defaults, the model loader, the start-up checks and the Kubernetes manifests all read this table (what memory
each needs on GPUs or the CPU is worked out here); a test checks that the manifests in ``inferenceservices/``
agree with it, and the documentation's figures about the variants are generated from it (``docs/generate.py``)
or checked against it (``tests/test_docs.py``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from .engine.quantization.schemes import BYTES_PER_WEIGHT

FALCON_CONTEXT_LENGTH = 2048  # every Falcon was trained with a 2048-token context
FALCON_HEAD_DIM = 64
FALCON_VOCAB = 65024  # the embedding, tied with lm_head: kept in bfloat16 whatever the linear layers' scheme
# GPU memory a replica keeps out of the KV cache besides the weights: the CUDA context and torch's allocator, per GPU
GPU_OVERHEAD_GIB = 2.0
KV_CACHE_SHARE = 0.9  # of what the weights leave, as the engine's default budget (GPU_KV_CACHE_SHARE)
# Memory bandwidth of an H100 as measured (FIELD.md): the floor of a decode step, which reads every weight once.
# Figures derived from it are estimates until benchmarks/gpu.sh has measured a GPU.
H100_BANDWIDTH_GB_S = 3000
# What a head of one token takes in the KV cache: bfloat16, or fp8 with a bfloat16 scale (``kv_cache``)
KV_BYTES_PER_HEAD = {"auto": FALCON_HEAD_DIM * 2, "fp8": FALCON_HEAD_DIM + 2}


@dataclass(frozen=True)
class Variant:
    """A published Falcon checkpoint and what it takes to serve it."""

    name: str  # the served model name, e.g. "falcon-7b"
    hf_id: str  # Hugging Face repository id
    revision: str  # pinned commit of that repository
    dtype: str  # dtype the weights are served in on a GPU
    context_length: int  # tokens the model attends over (prompt + generated)
    gpus: int  # GPUs one replica needs
    gpu_memory_gib: int  # GPU memory one replica needs in all, weights plus room for the KV cache
    instruct: bool  # tuned to follow the User:/Assistant: conversation format
    parameters_b: float  # parameters, in billions: what the weights weigh on the CPU (4 bytes each in float32)
    layers: int
    hidden_size: int
    kv_heads: int  # K/V heads per layer: what one token costs in the KV cache
    gpu_gb: int  # the smallest GPU (GB each) the manifests deploy it on

    @property
    def weights_gb(self) -> float:
        """The weights in the 2-byte serving dtype, all GPUs together."""
        return self.weight_bytes() / 1e9

    def weight_bytes(self, scheme: str | None = None) -> float:
        """The weights on GPUs, all together: the linear layers in ``scheme`` (None: bfloat16), the embedding in
        bfloat16."""
        return self.weight_bytes_per_gpu(1, scheme)

    def weight_bytes_per_gpu(self, gpus: int, scheme: str | None = None) -> float:
        """What each of ``gpus`` tensor-parallel ranks holds: its share of every linear layer in ``scheme``, plus
        the embedding (tied to ``lm_head``), which every rank keeps whole in bfloat16."""
        embedding = FALCON_VOCAB * self.hidden_size
        return (self.parameters_b * 1e9 - embedding) * BYTES_PER_WEIGHT[scheme] / gpus + embedding * 2

    @property
    def weights_per_gpu_gb(self) -> float:
        """Each of the variant's ``gpus`` ranks' share of the bfloat16 weights."""
        return self.weight_bytes_per_gpu(self.gpus) / 1e9

    def gpu_memory_gib_in(self, scheme: str | None) -> float:
        """GPU memory one replica needs in ``scheme``: ``gpu_memory_gib`` with the weights in that scheme."""
        return self.gpu_memory_gib - (self.weight_bytes() - self.weight_bytes(scheme)) / 2**30

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer, in the 2-byte serving dtype."""
        return self.kv_bytes_per_token_in("auto")

    def kv_bytes_per_token_in(self, kv_cache_dtype: str) -> int:
        """Keys and values of one token in every layer, stored as ``--kv_cache_dtype`` says."""
        return 2 * self.layers * self.kv_heads * KV_BYTES_PER_HEAD[kv_cache_dtype]

    @property
    def kv_bytes_per_token_per_gpu(self) -> int:
        """Each rank caches its share of the K/V heads."""
        return self.kv_bytes_per_token // self.gpus

    @property
    def decode_floor_ms(self) -> float:
        """A decode step's floor on H100s as the manifests deploy it: each GPU reads its bfloat16 weights once
        (an estimate, not a measurement)."""
        return self.decode_floor_ms_on(self.gpus)

    def decode_floor_ms_on(self, gpus: int, scheme: str | None = None) -> float:
        """The same on ``gpus`` H100s with the weights in ``scheme``."""
        return self.weight_bytes_per_gpu(gpus, scheme) / 1e9 / H100_BANDWIDTH_GB_S * 1e3

    @property
    def kv_rows(self) -> int:
        """Full-context sequences the default KV cache budget holds on the GPUs the manifests deploy it on."""
        return self.rows_on(self.gpus, self.gpu_gb)

    def rows_on(self, gpus: int, gpu_gb: float, scheme: str | None = None, kv_cache_dtype: str = "auto") -> int:
        """Full-context sequences the default KV cache budget holds on ``gpus`` GPUs of ``gpu_gb`` GB each, the
        weights in ``scheme`` and the cache in ``kv_cache_dtype`` (an estimate: the server measures the free memory
        at start-up and logs its own figure): on each GPU, 90% of what its share of the weights and its overhead
        leave, holding its share of every row."""
        free = gpu_gb * 1e9 - GPU_OVERHEAD_GIB * 2**30 - self.weight_bytes_per_gpu(gpus, scheme)
        per_row = self.context_length * self.kv_bytes_per_token_in(kv_cache_dtype) // gpus
        return max(0, int(KV_CACHE_SHARE * free) // per_row)

    @property
    def hf_uri(self) -> str:
        """The KServe storage URI that fetches this checkpoint at its pinned revision."""
        return f"hf://{self.hf_id}:{self.revision}"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("falcon-7b", "tiiuae/falcon-7b", "898df1396f35e447d5fe44e0a3ccaaaa69f30d36",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=1, gpu_memory_gib=14, instruct=False,
                parameters_b=6.9, layers=32, hidden_size=4544, kv_heads=1, gpu_gb=24),
        Variant("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", "cf4b3c42ce2fdfe24f753f0f0d179202fea59c99",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=1, gpu_memory_gib=14, instruct=True,
                parameters_b=6.9, layers=32, hidden_size=4544, kv_heads=1, gpu_gb=24),
        Variant("falcon-40b", "tiiuae/falcon-40b", "4a70170c215b36a3cce4b4253f6d0612bb7d4146",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=2, gpu_memory_gib=90, instruct=False,
                parameters_b=41.3, layers=60, hidden_size=8192, kv_heads=8, gpu_gb=80),
        Variant("falcon-40b-instruct", "tiiuae/falcon-40b-instruct", "ecb78d97ac356d098e79f0db222c9ce7c5d9ee5f",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=2, gpu_memory_gib=90, instruct=True,
                parameters_b=41.3, layers=60, hidden_size=8192, kv_heads=8, gpu_gb=80),
    )
}


def find_variant(name_or_id: str | None) -> Variant | None:
    """The variant named by a served name ("falcon-7b") or a Hugging Face id ("tiiuae/falcon-7b"), if any."""
    if not name_or_id:
        return None
    for variant in VARIANTS.values():
        if name_or_id in (variant.name, variant.hf_id):
            return variant
    return None


def closest_variant(name: str) -> str | None:
    """The variant name a mistyped ``name`` most likely meant ("falcon-7" -> "falcon-7b"), if any is close."""
    matches = difflib.get_close_matches(name.lower(), VARIANTS, n=1, cutoff=0.5)
    return matches[0] if matches else None


def cpu_memory_warning(variant: Variant, dtype: str, memory_gib: float | None = None) -> str:
    """How much memory ``variant``'s weights take on the CPU (float32 unless another dtype was asked for), and
    how much this machine has (``memory_gib``, read from the system when None)."""
    bytes_per_parameter = 4 if dtype in ("auto", "float32") else 2
    weights_gib = variant.parameters_b * 1e9 * bytes_per_parameter / 2**30
    if memory_gib is None:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    shown = "float32" if bytes_per_parameter == 4 else dtype
    return (f"{variant.name} on the CPU: {variant.parameters_b} B parameters in {shown} need about "
            f"{weights_gib:.0f} GiB of memory for the weights alone; this machine has {memory_gib:.0f} GiB. "
            f"On GPUs it is served in {variant.dtype} ({variant.gpus} GPU(s), about {variant.gpu_memory_gib} GiB).")


def memory_shortfall(variant: Variant, gpu_gib: list[float], scheme: str | None = None) -> str | None:
    """Why ``variant`` cannot be served on GPUs of these sizes with its weights in ``scheme`` (None: bfloat16), and
    what would work, naming the scheme that fits; None when it fits."""
    needed = variant.gpu_memory_gib_in(scheme)
    total = sum(gpu_gib)
    if total >= needed:
        return None
    held = f"--quantization {scheme}" if scheme else variant.dtype
    ways = []
    for fewer in SMALLER_SCHEMES[scheme]:
        if variant.gpu_memory_gib_in(fewer) <= total:
            ways.append(f"{SCHEME_NAMES[fewer]} (about {variant.gpu_memory_gib_in(fewer):.0f} GiB)")
            break
    if scheme is None:
        ways.append(f"{variant.gpus} GPUs of 80 GB (--tensor_parallel_size {variant.gpus})" if variant.gpus > 1
                    else "a GPU of 24 GB or more")
    ways.append("one GPU with more memory (e.g. 141 GB)")
    return (f"{variant.name} needs about {needed:.0f} GiB of GPU memory in {held}; this machine has "
            f"{len(gpu_gib)} GPU(s) with {total:.0f} GiB in all. Ways that work: {', '.join(ways)}.")


# The schemes that take less memory than each, fewest bits last; and how to ask for them.
SMALLER_SCHEMES: dict[str | None, tuple[str, ...]] = {None: ("fp8", "int4"), "int8": ("int4",), "fp8": ("int4",),
                                                      "int4": ()}
SCHEME_NAMES = {"fp8": "--quantization fp8 (H100, H200, L4; int8 on other GPUs)",
                "int4": "--quantization int4"}
