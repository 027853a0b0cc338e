"""Checks of LoRA state dicts before diffusers and peft load them (an incomplete one fails there: IndexError)."""

import os

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE


# (down, up) markers of the LoRA layouts diffusers loads: peft / diffusers, kohya, and the attention-processor layout
# (`to_q_lora.down.weight`).
LORA_PAIR_MARKERS = ((".lora_A.", ".lora_B."), (".lora_down.", ".lora_up."), ("lora.down.", "lora.up."))
_SHOWN = 4


def lora_source(pretrained_model_name_or_path_or_dict, weight_name: str | None = None, subfolder: str | None = None):
    """Words for where a LoRA comes from, for error messages: the file (as diffusers resolves a local folder), the
    repository and `weight_name`, or "the LoRA state dict passed in"."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        return "the LoRA state dict passed in"
    path = os.path.join(*[str(p) for p in (pretrained_model_name_or_path_or_dict, subfolder, weight_name) if p])
    if weight_name is None and os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME_SAFE)):
        path = os.path.join(path, LORA_WEIGHT_NAME_SAFE)
    return f"the LoRA file {path}"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_lora_state_dict(state_dict: dict[str, torch.Tensor], source: str, require_weights: bool = False) -> None:
    r"""
    Raises a `ValueError` naming `source` when a LoRA down weight (`lora_A`, `lora_down`) has no up weight (`lora_B`,
    `lora_up`) or the reverse, when a pair's ranks differ, or (with `require_weights`) when there is no LoRA weight
    at all. Biases (`lora_B.bias`, peft's `lora_bias`) need no partner.
    """
    missing, ranks = [], []
    for key, value in state_dict.items():
        if not key.endswith(".weight"):
            continue
        for down, up in LORA_PAIR_MARKERS:
            for mine, other in ((down, up), (up, down)):
                if mine in key:
                    partner = key.replace(mine, other)
                    if partner not in state_dict:
                        missing.append(partner)
                    elif mine == down and value.ndim == 2 and state_dict[partner].ndim == 2:
                        if value.shape[0] != state_dict[partner].shape[1]:
                            ranks.append(f"{key} {tuple(value.shape)} / {partner} {tuple(state_dict[partner].shape)}")
    if missing:
        raise ValueError(
            f"{source[0].upper()}{source[1:]} is incomplete: {len(missing)} LoRA weight(s) lack their partner; "
            f"missing keys: {_listed(sorted(missing))}. Every `lora_A` (`lora_down`) weight needs its `lora_B` "
            "(`lora_up`) weight; re-save the adapter, e.g. with `save_lora_weights(folder, "
            "transformer_lora_layers=get_peft_model_state_dict(transformer))`."
        )
    if ranks:
        raise ValueError(
            f"{source[0].upper()}{source[1:]} holds LoRA pairs whose ranks differ (lora_A rows != lora_B columns): "
            f"{_listed(ranks)}."
        )
    if require_weights and not any(
        marker in key for key in state_dict for pair in LORA_PAIR_MARKERS for marker in pair
    ):
        raise ValueError(
            f"{source[0].upper()}{source[1:]} holds no LoRA weights (no `lora_A` / `lora_B` keys); "
            f"keys found: {_listed(sorted(state_dict)) or 'none'}."
        )


__all__ = ["LORA_PAIR_MARKERS", "check_lora_state_dict", "lora_source"]
