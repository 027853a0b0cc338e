"""Pure training building blocks for SANA-Sprint distillation (no accelerate inside)."""

from ..trigflow import MAX_TIME, add_trigflow_noise, denoise_trigflow, replace_with_max_time, sample_trigflow_time
from .distill import (
    DiscriminatorStepOutput,
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    GeneratorStepOutput,
    discriminator_step,
    frozen,
    generator_step,
)
from .fingerprint import compare_fingerprints, run_fingerprint
from .ladd import (
    DiscriminatorHead,
    SanaDiscriminator,
    default_head_block_ids,
    discriminator_loss,
    generator_adversarial_loss,
    misaligned_pairs,
    r1_penalty,
    renoise_for_discriminator,
)
from .monitoring import SkipMonitor, check_finite_state_dict, step_if_finite
from .recipe import DISTILLATION, TEACHER_PREPARATION, parse_recipe, validate_training_args
from .scm import SCMLossConfig, SCMLossOutput, sample_guidance_scales, scm_loss, teacher_cfg_velocity
from .tangent import velocity_tangent
from .teacher import build_student, prepare_sprint_teacher, teacher_finetune_loss


__all__ = [
    "MAX_TIME",
    "DiscriminatorHead",
    "DiscriminatorStepOutput",
    "DistillationBatch",
    "DistillationConfig",
    "DISTILLATION",
    "DistillationState",
    "GeneratorStepOutput",
    "SCMLossConfig",
    "SCMLossOutput",
    "SanaDiscriminator",
    "SkipMonitor",
    "TEACHER_PREPARATION",
    "add_trigflow_noise",
    "build_student",
    "check_finite_state_dict",
    "compare_fingerprints",
    "default_head_block_ids",
    "denoise_trigflow",
    "discriminator_loss",
    "discriminator_step",
    "frozen",
    "generator_adversarial_loss",
    "generator_step",
    "misaligned_pairs",
    "parse_recipe",
    "prepare_sprint_teacher",
    "r1_penalty",
    "renoise_for_discriminator",
    "replace_with_max_time",
    "run_fingerprint",
    "sample_guidance_scales",
    "sample_trigflow_time",
    "scm_loss",
    "step_if_finite",
    "teacher_cfg_velocity",
    "teacher_finetune_loss",
    "validate_training_args",
    "velocity_tangent",
]
