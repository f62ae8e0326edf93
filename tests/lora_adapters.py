"""LoRA adapters made locally by PEFT for the tiny Falcons, and PEFT's own greedy generation as the reference."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def make_adapter(base_dir: Path, out_dir: Path, *, r: int = 8, lora_alpha: int = 8,
                 targets: tuple[str, ...] = ("query_key_value",), use_rslora: bool = False, seed: int = 0,
                 **config) -> Path:
    """Save a PEFT LoRA adapter for the checkpoint in ``base_dir``, with random non-zero ``lora_B`` (PEFT's own
    initialisation makes it zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import FalconForCausalLM

    if (out_dir / "adapter_config.json").exists():
        return out_dir
    base = FalconForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets), use_rslora=use_rslora,
                      init_lora_weights=False, **config)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # large enough that an adapter changes the greedy choices
                param.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def peft_model(base_dir: Path, adapters: dict[str, Path] | None = None, weights: dict[str, float] | None = None):
    """The base model with ``adapters`` loaded by PEFT; with ``weights`` they are combined as Kaito's server does
    (``add_weighted_adapter``, default combination) into the active adapter."""
    from peft import PeftModel
    from transformers import FalconForCausalLM

    model = FalconForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if not adapters:
        return model
    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    if weights is not None:
        model.add_weighted_adapter(adapters=names, weights=[weights[n] for n in names],
                                   adapter_name="combined_adapter")
        model.set_adapter("combined_adapter")
    return model.eval()


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=11,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    return out[0, ids.shape[1]:].tolist()
