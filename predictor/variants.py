"""The four Falcon variants this server knows: the one place that describes them.

CLI defaults, the model loader and the Kubernetes manifests all read this table; a test checks that the
manifests in ``inferenceservices/`` agree with it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

FALCON_CONTEXT_LENGTH = 2048  # every Falcon was trained with a 2048-token context


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

    @property
    def hf_uri(self) -> str:
        """The KServe storage URI that fetches this checkpoint at its pinned revision."""
        return f"hf://{self.hf_id}:{self.revision}"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("falcon-7b", "tiiuae/falcon-7b", "898df1396f35e447d5fe44e0a3ccaaaa69f30d36",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=1, gpu_memory_gib=14, instruct=False,
                parameters_b=6.9),
        Variant("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", "cf4b3c42ce2fdfe24f753f0f0d179202fea59c99",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=1, gpu_memory_gib=14, instruct=True,
                parameters_b=6.9),
        Variant("falcon-40b", "tiiuae/falcon-40b", "4a70170c215b36a3cce4b4253f6d0612bb7d4146",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=2, gpu_memory_gib=90, instruct=False,
                parameters_b=41.3),
        Variant("falcon-40b-instruct", "tiiuae/falcon-40b-instruct", "ecb78d97ac356d098e79f0db222c9ce7c5d9ee5f",
                "bfloat16", FALCON_CONTEXT_LENGTH, gpus=2, gpu_memory_gib=90, instruct=True,
                parameters_b=41.3),
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
