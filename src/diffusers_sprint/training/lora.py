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
TEACHER_LORA_ADAPTER = "teacher_lora"
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


@torch.no_grad()
def fuse_teacher_lora(
    teacher: SanaSprintTransformer2DModel, lora: str, scale: float = 1.0, argument: str = "--teacher_lora"
) -> SanaSprintTransformer2DModel:
    r"""
    Merges a diffusers-format LoRA (a user's DreamBooth or style adapter of the teacher) into `teacher`, in place:
    `W <- W + scale * (alpha / r) B A` for every adapted layer, then removes the adapter layers, so the teacher is a
    plain transformer again (a LoRA student that peft builds on it, [`build_lora_student`], does not clash with it).

    The personalised teacher's output equals the teacher with the adapter active at `scale` (diffusers'
    `set_adapters(..., scale)`); distilling it gives a one-step student of the personalised model.

    Args:
        teacher ([`SanaSprintTransformer2DModel`]): The frozen teacher transformer.
        lora (`str`): What `pipe.load_lora_weights` takes: a folder holding `pytorch_lora_weights.safetensors`, a
            `.safetensors` file, or a Hub id. Only its `transformer.` weights are used (as Sana's loader does).
        scale (`float`, defaults to 1.0): The LoRA scale, `> 0`.
        argument (`str`): The flag named in error messages.

    Raises:
        `ValueError` naming `argument` when `lora` cannot be read, holds no LoRA weights for the transformer, or does
        not fit it.
    """
    from ..pipelines.pipeline_sana_sprint import SanaSprintPipeline

    if not scale > 0:
        raise ValueError(f"`{argument}_scale` must be > 0, got {scale!r}.")
    try:
        state_dict = SanaSprintPipeline.lora_state_dict(lora)
    except (OSError, ValueError) as error:
        raise ValueError(f"`{argument}` {lora!r} is not a readable diffusers LoRA: {error}") from error
    if isinstance(state_dict, tuple):  # (state_dict, metadata) with return_lora_metadata
        state_dict = state_dict[0]
    prefix = "transformer."
    if not any(key.startswith(prefix) for key in state_dict):
        raise ValueError(
            f"`{argument}` {lora!r} holds no LoRA weights for the transformer (no `{prefix}` keys); keys found: "
            f"{', '.join(sorted(state_dict)[:4])}."
        )
    try:
        with torch.random.fork_rng(devices=[]):  # peft initialises the adapter before loading it: keep the run's RNG
            teacher.load_lora_adapter(state_dict, prefix="transformer", adapter_name=TEACHER_LORA_ADAPTER)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"`{argument}` {lora!r} does not fit the teacher transformer: {error}") from error
    teacher.fuse_lora(lora_scale=scale, adapter_names=[TEACHER_LORA_ADAPTER])
    teacher.unload_lora()
    return teacher


__all__ = ["DEFAULT_LORA_TARGET_MODULES", "build_lora_student", "fuse_teacher_lora", "lora_state_dict"]
