"""ControlNet distillation: a flow teacher + its `SanaControlNetModel` -> a Sprint student + its ControlNet.

The distillation math is unchanged (`distill.generator_step` / `discriminator_step`): teacher and student are
[`~models.TrigFlowModel`]s that each own a ControlNet, and the control latents travel in
`DistillationBatch.control_latents` to every model call. This module holds what is specific to ControlNets: the
compatibility check of a ControlNet with the transformer it steers, the student ControlNet's initialisation from the
teacher's, and which parameters train.

Training modes (`CONTROLNET_TRAINING_MODES`):

- `"controlnet_only"`: the student transformer is frozen, only the ControlNet trains (distil a ControlNet onto an
  existing Sprint student; one text-to-image student then serves with and without control). The adaptive weight's
  logvar head, a training-only head of the transformer that no sampler reads, keeps training.
- `"joint"`: the student transformer and the ControlNet train together.
"""

import torch
from diffusers.models.controlnets.controlnet_sana import SanaControlNetModel
from torch import nn

from ..models.transformer_sana_sprint import unwrap_controlnet
from .teacher import flow_time_scale_of, remap_time_embedding


CONTROLNET_TRAINING_MODES = ("controlnet_only", "joint")
DEFAULT_CONTROLNET_TRAINING_MODE = "controlnet_only"

# (what must agree, the ControlNet's value, the transformer's value) are read from these config fields.
_MATCHING_FIELDS = ("in_channels", "patch_size", "caption_channels", "cross_attention_dim")


def check_controlnet_matches(controlnet: nn.Module, transformer: nn.Module, argument: str = "controlnet") -> None:
    r"""
    Raises a `ValueError` naming `argument` when `controlnet` cannot steer `transformer`.

    Checked: the latent channels, patch size, caption channels and cross-attention width agree, the inner width
    (`num_attention_heads * attention_head_dim`: the residuals are added to the transformer's hidden states) agrees,
    and the ControlNet has fewer blocks than the transformer (residual `i` is added after transformer block `i + 1`;
    diffusers silently drops residuals beyond the last block).
    """
    config, target = unwrap_controlnet(controlnet).config, transformer.config
    problems = []
    for name in _MATCHING_FIELDS:
        if getattr(config, name) != getattr(target, name):
            problems.append(f"{name} {getattr(config, name)} (transformer: {getattr(target, name)})")
    width = config.num_attention_heads * config.attention_head_dim
    target_width = target.num_attention_heads * target.attention_head_dim
    if width != target_width:
        problems.append(f"inner width num_attention_heads x attention_head_dim {width} (transformer: {target_width})")
    if config.num_layers >= target.num_layers:
        problems.append(
            f"num_layers {config.num_layers} (the transformer has {target.num_layers} blocks: at most "
            f"{target.num_layers - 1} residuals are used)"
        )
    if problems:
        raise ValueError(f"`{argument}` does not match the transformer: " + "; ".join(problems) + ".")


@torch.no_grad()
def init_student_controlnet(
    teacher_controlnet: SanaControlNetModel, teacher: nn.Module, student: nn.Module
) -> SanaControlNetModel:
    r"""
    The student's ControlNet: a copy of the teacher's (sharing no storage), in the student's time units.

    A ControlNet embeds whatever time its transformer embeds (`trigflow_forward` passes the transformer's own
    timestep input). When the student reads another time scale than the teacher (a `1000 s` teacher, a dense-time
    `s` student), the copy's time MLP is re-expressed for the student's scale with [`remap_time_embedding`], as
    `prepare_sprint_teacher(dense_time_init="remap")` does for the transformer.
    """
    teacher_controlnet = unwrap_controlnet(teacher_controlnet)
    controlnet = SanaControlNetModel.from_config(teacher_controlnet.config)
    controlnet.load_state_dict(teacher_controlnet.state_dict())
    controlnet.to(teacher_controlnet.device)
    if controlnet.dtype != teacher_controlnet.dtype:
        controlnet.to(teacher_controlnet.dtype)
    teacher_scale, student_scale = flow_time_scale_of(teacher), flow_time_scale_of(student)
    if teacher_scale != student_scale:
        embedding = controlnet.time_embed.emb
        remap_time_embedding(embedding.time_proj, embedding.timestep_embedder, teacher_scale / student_scale)
    return controlnet.train(teacher_controlnet.training)


def apply_controlnet_training_mode(transformer: nn.Module, controlnet: nn.Module, mode: str) -> None:
    """Sets `requires_grad` of the student's transformer and ControlNet for `mode` (see the module docstring)."""
    if mode not in CONTROLNET_TRAINING_MODES:
        raise ValueError(f"`controlnet_training_mode` must be one of {CONTROLNET_TRAINING_MODES}, got {mode!r}.")
    controlnet.requires_grad_(True)
    transformer.requires_grad_(mode == "joint")
    logvar_head = getattr(transformer, "logvar_linear", None)
    if logvar_head is not None:
        logvar_head.requires_grad_(True)


__all__ = [
    "CONTROLNET_TRAINING_MODES",
    "DEFAULT_CONTROLNET_TRAINING_MODE",
    "apply_controlnet_training_mode",
    "check_controlnet_matches",
    "init_student_controlnet",
]
