"""The quantization schemes: what each stores per weight, and where it runs.

``int8`` (weight-only, per output row) runs everywhere: on the CPU through PyTorch's int8 x bf16 kernel
(``torch._weight_int8pack_mm``), on GPUs by dequantizing into the matmul. ``fp8`` (weights and activations, per
row) and ``int4`` (weight-only, groups of 128) are torchao's GPU kernels: fp8 needs FP8 tensor cores (compute
capability 8.9: L4, H100, H200), int4 its tinygemm kernel (8.0: A100 and later). Where a scheme cannot run, start-up
stops with one line that says what would (``scheme_refusal``).

Kaito's flags map onto these: ``--load_in_8bit`` is ``int8``, ``--load_in_4bit`` is ``int4``.
"""

from __future__ import annotations

import importlib.util

SCHEMES = ("int8", "fp8", "int4")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: e4m3 with a scale per token and head (kv_cache)
# Bytes one weight of Falcon's four linear layers takes, scales included (a 2-byte scale per row of ~4.5k weights
# for int8/fp8; one per group of 128 for int4, with a zero point): what the memory arithmetic counts.
BYTES_PER_WEIGHT = {None: 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128}
FP8_CAPABILITY = (8, 9)
INT4_CAPABILITY = (8, 0)
INT4_GROUP_SIZE = 128
# Quantized before a tensor-parallel cut (each rank cuts the int8 rows and scales one process holds); the others are
# cut first and quantized on each rank's GPU.
QUANTIZED_BEFORE_THE_CUT = ("int8",)
KAITO_FLAGS = {"load_in_8bit": "int8", "load_in_4bit": "int4"}


def scheme_refusal(scheme: str | None, device: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``scheme`` cannot run on ``device`` ("cpu" or "cuda", with the GPU's compute ``capability``), in one
    line naming what would; None when it can."""
    if scheme is None or scheme == "int8":
        return None
    if scheme not in SCHEMES:
        return f"--quantization {scheme} is not a scheme this server runs; choose one of {', '.join(SCHEMES)}"
    if scheme == "fp8":
        needed, gpus = FP8_CAPABILITY, "a GPU with FP8 tensor cores (compute capability 8.9+: L4, H100, H200)"
    else:
        needed, gpus = INT4_CAPABILITY, "a CUDA GPU of compute capability 8.0+ (A100, L4, H100)"
    if device != "cuda":
        return f"--quantization {scheme} needs {gpus}; on the CPU use --quantization int8"
    if capability is not None and tuple(capability) < needed:
        found = ".".join(map(str, capability))
        return f"--quantization {scheme} needs {gpus}; this GPU is {found}: use --quantization int8"
    if importlib.util.find_spec("torchao") is None:
        return (f"--quantization {scheme} runs on torchao, which is not installed: pip install "
                "'falcon-predictor[gpu]' (the image has it), or use --quantization int8")
    return None
