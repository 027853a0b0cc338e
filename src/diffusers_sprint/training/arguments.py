"""Checks of the training scripts' command-line arguments, and the run fingerprint kept in every checkpoint.

Pure functions of an `argparse.Namespace` carrying the flag names of `examples/train_sana_sprint.py`. A flag the
script does not define (a teacher-only script has fewer) or leaves at `None` is skipped: every value is read with
`getattr(args, name, None)`.
"""

import json
import math
import os
from argparse import Namespace


# (flag, predicate, allowed range as shown to the user). A list-valued flag must satisfy the predicate element-wise.
_RANGES = (
    # sizes and counts
    ("train_batch_size", lambda v: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("max_train_steps", lambda v: v >= 1, ">= 1"),
    ("checkpointing_steps", lambda v: v >= 1, ">= 1"),
    ("checkpoints_total_limit", lambda v: v >= 1, ">= 1 (or unset: keep every checkpoint)"),
    ("validation_steps", lambda v: v >= 1, ">= 1"),
    ("validation_inference_steps", lambda v: v >= 1, ">= 1 (each value)"),
    ("max_train_samples", lambda v: v >= 1, ">= 1 (or unset: every sample)"),
    ("resolution", lambda v: v >= 1, ">= 1 pixel"),
    ("max_sequence_length", lambda v: v >= 1, ">= 1 token"),
    ("max_consecutive_skips", lambda v: v >= 1, ">= 1"),
    ("dataloader_num_workers", lambda v: v >= 0, ">= 0"),
    ("shuffle_buffer_size", lambda v: v >= 0, ">= 0 (0: the stream's order)"),
    ("lr_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("lr_num_cycles", lambda v: v >= 1, ">= 1"),
    ("tangent_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("lora_rank", lambda v: v >= 1, ">= 1"),
    ("head_block_ids", lambda v: v >= 0, ">= 0 (each block id)"),
    ("head_channels", lambda v: v >= 1, ">= 1"),
    # optimisation
    ("learning_rate", lambda v: v > 0, "> 0"),
    ("discriminator_learning_rate", lambda v: v > 0, "> 0 (or unset: --learning_rate)"),
    ("max_grad_norm", lambda v: v > 0, "> 0 (inf: no clipping)"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("came_beta3", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "> 0"),
    ("adam_weight_decay", lambda v: v >= 0, ">= 0"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    # the sCM / LADD / fine-tune math
    ("sigma_data", lambda v: v > 0, "> 0"),
    ("p_std", lambda v: v >= 0, ">= 0"),
    ("tangent_norm_eps", lambda v: v > 0, "> 0"),
    ("jvp_step", lambda v: 0 < v <= 0.1, "in (0, 0.1] radians"),
    ("guidance_scales", lambda v: v >= 1, ">= 1 (each value; 1 is the conditional teacher without guidance)"),
    ("guidance_embeds_scale", lambda v: v > 0, "> 0"),
    ("scm_lambda", lambda v: v >= 0, ">= 0"),
    ("adversarial_lambda", lambda v: v >= 0, ">= 0"),
    ("discriminator_p_std", lambda v: v >= 0, ">= 0"),
    ("max_time_probability", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("r1_gamma", lambda v: v >= 0, ">= 0"),
    ("lora_alpha", lambda v: v > 0, "> 0 (the LoRA scale is alpha / rank)"),
    ("finetune_logit_std", lambda v: v >= 0, ">= 0"),
    ("caption_dropout_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("controlnet_conditioning_scale", lambda v: v >= 0, ">= 0"),
)
# Floats that may be +inf.
_INFINITY_ALLOWED = ("max_grad_norm",)


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def validate_training_args(args: Namespace) -> None:
    r"""
    Range checks of the training flags, before anything is loaded.

    Raises one `ValueError` listing every offending flag, each line naming the flag, the allowed range and the value
    given. Checked:

    - every float flag (and every element of a float list flag) is finite; `--max_grad_norm inf` is allowed and
      means no clipping, as does an unset (`None`) `--max_grad_norm`;
    - the ranges of `_RANGES` (counts >= 1, learning rates > 0, `--max_grad_norm` > 0, probabilities and
      `--ema_decay` in [0, 1], Adam betas in [0, 1), `--guidance_scales` >= 1, ...);
    - `--lora_alpha` only together with `--lora_rank`;
    - with `--stage distill` (or no `--stage`), at least one of `--scm_lambda` and `--adversarial_lambda` > 0.

    `--guidance_scales` below 1 are refused: w = 1 is the conditional teacher, w in [0, 1) moves towards the
    unconditional one (w = 0 ignores the prompt) and negative w pushes away from the prompt; none of these is a
    guidance-distilled student, and the issue's `--guidance_scales 0` ran silently.
    """
    errors, non_finite = [], set()
    for name, value in sorted(vars(args).items()):
        for item in _values(value):
            if isinstance(item, float) and not math.isfinite(item):
                if name in _INFINITY_ALLOWED and item == math.inf:
                    continue
                non_finite.add(name)
                errors.append(f"--{name} must be a finite number (got {value!r}).")
                break
    for name, within, allowed in _RANGES:
        value = getattr(args, name, None)
        if value is None or name in non_finite:
            continue
        try:
            valid = all(within(item) for item in _values(value))
        except TypeError:
            valid = False
        if not valid:
            errors.append(f"--{name} must be {allowed} (got {value!r}).")
    if getattr(args, "lora_alpha", None) is not None and getattr(args, "lora_rank", None) is None:
        errors.append(f"--lora_alpha applies only with --lora_rank (got --lora_alpha {args.lora_alpha!r} alone).")
    if getattr(args, "compile_jvp", False) and getattr(args, "jvp", "exact") != "exact":
        errors.append(f"--compile_jvp applies only with --jvp exact (got --jvp {args.jvp!r}).")
    scm, adversarial = getattr(args, "scm_lambda", None), getattr(args, "adversarial_lambda", None)
    distill = getattr(args, "stage", "distill") == "distill"
    if distill and scm is not None and adversarial is not None and scm == 0 and adversarial == 0:
        errors.append(
            "At least one of --scm_lambda and --adversarial_lambda must be > 0 (both are 0: nothing trains)."
        )
    if errors:
        raise ValueError("Invalid training arguments:\n" + "\n".join(f"  {line}" for line in errors))


# ---------------------------------------------------------------------------------------------------------------------
# Run fingerprint
# ---------------------------------------------------------------------------------------------------------------------

FINGERPRINT_NAME = "run_fingerprint.json"

# Flags that change what is computed: resuming with a different value would continue another run's weights under this
# run's recipe. Left out on purpose: where files go and what is logged (--output_dir, --logging_dir, --report_to,
# tracker and Hub flags, --cache_dir), checkpoint/validation cadence and prompts, --resume_from_checkpoint,
# --dataloader_num_workers, --max_consecutive_skips, --validate_data; flags that change cost but not the math up to
# float rounding (--gradient_checkpointing, --allow_tf32, --fp32_linear_attention, --teacher_fp32, --compile_jvp);
# and --seed (a checkpoint's seed always wins and is stored in its training state). --gradient_accumulation_steps is
# replaced by the global batch when the process count is known: N processes x A accumulation steps with the same global
# batch see the same micro-batches.
FINGERPRINT_COMMON = (
    "stage",
    "pretrained_teacher_model_name_or_path",
    "revision",
    "variant",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "train_shards",
    "streaming",
    "shuffle_buffer_size",
    "caption_fallback_columns",
    "image_column",
    "caption_column",
    "max_train_samples",
    "resolution",
    "multi_scale",
    "center_crop",
    "random_flip",
    "cache_latents",
    "max_sequence_length",
    "complex_human_instruction",
    "sigma_data",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "scale_lr",
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "came_beta3",
    "adam_weight_decay",
    "adam_epsilon",
    "lr_scheduler",
    "max_grad_norm",
    "use_ema",
    "ema_decay",
    "mixed_precision",
    "fsdp",  # sharded checkpoints (DCP) and the official LADD fake draw: a layout of its own
)
FINGERPRINT_DISTILL = (
    "p_mean",
    "p_std",
    "tangent_warmup_steps",
    "tangent_norm",
    "tangent_norm_eps",
    "guidance_scales",
    "guidance_embeds_scale",
    "guidance_embeds",
    "adaptive_weight",
    "detach_logvar_embedding",
    "jvp",  # the finite difference approximates the tangent: another loss, not a cost change
    "jvp_step",
    "scm_lambda",
    "adversarial_lambda",
    "adversarial_loss",
    "discriminator_p_mean",
    "discriminator_p_std",
    "head_block_ids",
    "head_channels",
    "misaligned_pairs",
    "max_time_probability",
    "share_discriminator_timesteps",
    "discriminator_shared_norm_groups",
    "r1_gamma",
    "discriminator_learning_rate",
    "discriminator_lr_schedule",
    "fake_from_scm_forward",
    "cfg_null_mask",
    "teacher_cfg_without_guidance_embeds",
    "head_block_layout",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "pretrained_student_model_name_or_path",
    "controlnet_model_name_or_path",
    "student_controlnet_model_name_or_path",
    "conditioning_image_column",
    "controlnet_training_mode",
    "controlnet_conditioning_scale",
)
FINGERPRINT_TEACHER = (
    "teacher_qk_norm",
    "dense_time",
    "dense_time_init",
    "calibrate_qk_norm",
    "finetune_logit_mean",
    "finetune_logit_std",
    "finetune_weighting",
    "caption_dropout_prob",
)
# Scheduler flags that only matter for some schedulers (so extending a constant-lr run with a larger
# --max_train_steps is not a mismatch).
_SCHEDULER_FLAGS = {
    "lr_warmup_steps": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"),
    "max_train_steps": ("linear", "cosine", "cosine_with_restarts", "polynomial"),
    "lr_num_cycles": ("cosine_with_restarts",),
    "lr_power": ("polynomial",),
}
_LORA_ONLY = ("lora_alpha", "lora_target_modules")
# Flags recorded only away from the behaviour they were added with (so checkpoints written before they existed still
# resume), and flags that only matter for a stream.
_RECORDED_WHEN_ON = {
    "multi_scale": False,
    "streaming": False,
    "train_shards": None,
    "teacher_cfg_without_guidance_embeds": True,  # the behaviour before the flag existed
    "discriminator_shared_norm_groups": False,
    "pretrained_student_model_name_or_path": None,
    "controlnet_model_name_or_path": None,
}
# Flags that only matter when distilling a ControlNet (--controlnet_model_name_or_path).
_CONTROLNET_ONLY = (
    "student_controlnet_model_name_or_path",
    "conditioning_image_column",
    "controlnet_training_mode",
    "controlnet_conditioning_scale",
)
_STREAMING_ONLY = ("shuffle_buffer_size", "caption_fallback_columns")
# Flags the script no longer has, with the value it now always uses: a checkpoint that recorded that value resumes.
_RETIRED = {"head_kernel_size": 9, "head_virtual_batch_size": 8}
# Flags that do not enter the fingerprint (see the comment above FINGERPRINT_COMMON); a test checks that every flag of
# the training script is in exactly one of the lists.
FINGERPRINT_EXCLUDED = (
    "cache_dir",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "allow_tf32",
    "fp32_linear_attention",  # precision of the same math, like --allow_tf32
    "teacher_fp32",  # idem: the teacher's weights in fp32 or the autocast dtype
    "compile_jvp",  # the same JVP compiled: float rounding only
    "seed",
    "output_dir",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "validation_prompts",
    "validation_steps",
    "validation_inference_steps",
    "validation_guidance_scale",
    "logging_dir",
    "report_to",
    "tracker_project_name",
    "push_to_hub",
    "hub_token",
    "hub_model_id",
    "max_consecutive_skips",
    "log_gradient_norms_every",  # diagnostics only: an extra backward per loss part on those steps
    "validate_data",
    "feature_cache_dir",  # cached latents equal fresh ones (the same VAE) up to the VAE's batch rounding
    "precompute_only",
)


def _json_value(value):
    """Tuples become lists, so a fingerprint equals itself after a JSON round trip."""
    return json.loads(json.dumps(value))


def run_fingerprint(args: Namespace, num_processes: int | None = None) -> dict:
    r"""
    The flags of `args` that change the math of the run (see `FINGERPRINT_*`), as a JSON-ready `{flag: value}`.

    With `args.stage == "distill"` (set by `train_sana_sprint.py`) the teacher-preparation flags are left out, with
    `"prepare_teacher"` (`prepare_sana_sprint_teacher.py`) the distillation ones; without `stage` every listed flag
    present on `args` is kept. `lr_warmup_steps`,
    `max_train_steps`, `lr_num_cycles` and `lr_power` count only for the diffusers schedulers that read them (so a
    constant-lr run may be extended), `lora_alpha` and `lora_target_modules` only with `lora_rank`, `jvp_step` only
    with `--jvp finite_difference`, `--shuffle_buffer_size` and `--caption_fallback_columns` only with `--streaming`,
    the ControlNet flags only with `--controlnet_model_name_or_path`, and `--multi_scale`, `--streaming`,
    `--train_shards`, `--pretrained_student_model_name_or_path` and `--controlnet_model_name_or_path` only when on,
    `--teacher_cfg_without_guidance_embeds` only when off (a checkpoint from before they existed still matches). With
    `num_processes`, `gradient_accumulation_steps` is replaced by `global_batch_size` (`train_batch_size x
    accumulation x processes`), which is what a layout change must keep (see `training.seeding`).
    """
    stage = getattr(args, "stage", None)
    names = list(FINGERPRINT_COMMON)
    if stage != "prepare_teacher":
        names += FINGERPRINT_DISTILL
    if stage != "distill":
        names += FINGERPRINT_TEACHER
    scheduler = getattr(args, "lr_scheduler", None)
    names += [name for name, schedulers in _SCHEDULER_FLAGS.items() if scheduler in schedulers]
    if getattr(args, "lora_rank", None) is None:
        names = [name for name in names if name not in _LORA_ONLY]
    if getattr(args, "jvp", "exact") != "finite_difference":
        names = [name for name in names if name != "jvp_step"]
    if not getattr(args, "streaming", False):
        names = [name for name in names if name not in _STREAMING_ONLY]
    if getattr(args, "controlnet_model_name_or_path", None) is None:
        names = [name for name in names if name not in _CONTROLNET_ONLY]
    names = [
        name
        for name in names
        if not (name in _RECORDED_WHEN_ON and getattr(args, name, None) == _RECORDED_WHEN_ON[name])
    ]
    fingerprint = {name: _json_value(getattr(args, name)) for name in names if hasattr(args, name)}
    if num_processes is not None and "train_batch_size" in fingerprint:
        accumulation = fingerprint.pop("gradient_accumulation_steps", 1)
        fingerprint["global_batch_size"] = fingerprint["train_batch_size"] * accumulation * int(num_processes)
    return fingerprint


def compare_fingerprints(saved: dict, current: dict) -> list[str]:
    r"""
    Human-readable differences between a checkpoint's fingerprint and this run's, one line per flag, e.g.
    `"--learning_rate: 0.0001 in the checkpoint, 0.001 now"`. Empty when they agree. A removed flag (`_RETIRED`)
    saved at the value the script now always uses agrees.
    """
    saved, current = _json_value(saved), _json_value(current)
    lines = []
    for name in sorted(set(saved) | set(current)):
        flag = name if name == "global_batch_size" else f"--{name}"
        if name in _RETIRED and name not in current:
            if saved[name] != _RETIRED[name]:
                fixed = _RETIRED[name]
                lines.append(f"{flag}: {saved[name]!r} in the checkpoint, a removed flag (always {fixed!r} now)")
        elif name not in current:
            lines.append(f"{flag}: {saved[name]!r} in the checkpoint, not recorded now")
        elif name not in saved:
            lines.append(f"{flag}: not recorded in the checkpoint, {current[name]!r} now")
        elif saved[name] != current[name]:
            lines.append(f"{flag}: {saved[name]!r} in the checkpoint, {current[name]!r} now")
    return lines


def write_fingerprint(folder: str, fingerprint: dict) -> str:
    """Write `fingerprint` as `folder/run_fingerprint.json`; returns the path."""
    path = os.path.join(folder, FINGERPRINT_NAME)
    with open(path, "w") as file:
        json.dump(fingerprint, file, indent=2, sort_keys=True)
    return path


def read_fingerprint(folder: str) -> dict | None:
    """The fingerprint saved in `folder`, or `None` when it has none; an unreadable file raises naming it."""
    path = os.path.join(folder, FINGERPRINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            fingerprint = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"The run fingerprint {path} cannot be read ({error}); the checkpoint is damaged.") from error
    if not isinstance(fingerprint, dict):
        raise ValueError(f"The run fingerprint {path} holds {type(fingerprint).__name__}, not a JSON object.")
    return fingerprint


__all__ = [
    "FINGERPRINT_COMMON",
    "FINGERPRINT_DISTILL",
    "FINGERPRINT_EXCLUDED",
    "FINGERPRINT_NAME",
    "FINGERPRINT_TEACHER",
    "compare_fingerprints",
    "read_fingerprint",
    "run_fingerprint",
    "validate_training_args",
    "write_fingerprint",
]
