"""LoRA distillation: the student is the frozen teacher plus a PEFT LoRA adapter (like LCM-LoRA).

The one-step model is then `teacher + LoRA`: the adapter is saved in diffusers' LoRA format
(`SanaSprintPipeline.save_lora_weights(dir, transformer_lora_layers=lora_state_dict(student))`) and loads onto the
teacher with `pipe.load_lora_weights(dir)`; `pipe.fuse_lora()` merges it.

Because the base is the teacher, the LoRA student has **no guidance embedder**: it cannot read the CFG scale `w`, so
it learns the teacher's guided flow at the scales it is trained on (pass a single `guidance_scales` value to distil
one scale; several scales are averaged). Sample it with `guidance_scale=None`. The adaptive-weight `logvar` head of
the sCM loss is a training-only module: it is trained with the adapter (and checkpointed) but not part of the LoRA
weights, and sampling never uses it.
"""

from collections.abc import Sequence

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ..models.transformer_sana_sprint import SanaSprintTransformer2DModel


DEFAULT_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
_LOGVAR_PREFIX = "logvar_linear."


def build_lora_student(
    teacher: SanaSprintTransformer2DModel,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
    logvar_head: bool = True,
    init_lora_weights: bool | str = "gaussian",
) -> SanaSprintTransformer2DModel:
    r"""
    A copy of `teacher` (same config and weights, frozen) with a LoRA adapter and, optionally, a logvar head.

    Trainable parameters: the adapter's `lora_A` / `lora_B` and the logvar head. With peft's default initialisations
    (`lora_B = 0`) the student's output equals the teacher's at the start. The teacher is not modified and shares no
    storage with the student.

    Args:
        teacher ([`SanaSprintTransformer2DModel`]): The (Sprint or flow-matching) teacher, without guidance embedder.
        rank (`int`): LoRA rank `r`.
        alpha (`float`, *optional*): LoRA alpha (scale `alpha / r`); defaults to `rank`.
        target_modules (`Sequence[str]`, defaults to `("to_q", "to_k", "to_v", "to_out.0")`): Module names (peft
            matching) that get an adapter.
        logvar_head (`bool`, defaults to `True`): Add the adaptive-weight head (needed by the sCM loss's adaptive
            weight), zero-initialised.
        init_lora_weights (`bool` or `str`, defaults to `"gaussian"`): peft's LoRA initialisation.
    """
    if teacher.config.guidance_embeds:
        raise ValueError("The LoRA base must be a teacher without guidance embedder (`guidance_embeds=False`).")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
    config = {key: value for key, value in teacher.config.items() if not key.startswith("_")}
    config["logvar_head"] = logvar_head
    reference = next(teacher.parameters())
    with torch.device(reference.device):
        student = SanaSprintTransformer2DModel.from_config(config)
    if student.dtype != reference.dtype:
        student = student.to(reference.dtype)
    state = {key: value for key, value in teacher.state_dict().items() if not key.startswith(_LOGVAR_PREFIX)}
    result = student.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(_LOGVAR_PREFIX)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Teacher weights do not map onto the student: missing {missing}, unexpected {result.unexpected_keys} "
            "(merge or remove LoRA adapters of the teacher first)."
        )
    student.requires_grad_(False)
    student.add_adapter(
        LoraConfig(
            r=int(rank),
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=list(target_modules),
            init_lora_weights=init_lora_weights,
        )
    )
    if student.logvar_linear is not None:
        student.logvar_linear.requires_grad_(True)
    return student.train(teacher.training)


def lora_state_dict(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (peft keys) for `SanaSprintPipeline.save_lora_weights(transformer_lora_layers=...)`."""
    return get_peft_model_state_dict(student)


__all__ = ["DEFAULT_LORA_TARGET_MODULES", "build_lora_student", "lora_state_dict"]
