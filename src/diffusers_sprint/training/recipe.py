"""The training recipe: every setting of `train_sana_sprint.py` and `prepare_sana_sprint_teacher.py`, declared once.

A setting is one dataclass field (`settings.setting`: default, help, allowed range, fingerprint rule). The sections
below hold the scripts' settings; the sCM and LADD math settings are the library configs themselves
([`SCMLossConfig`], [`DistillationConfig`]). `parse_recipe` reads a command line (flags, `@file` flag files,
`--config recipe.yaml`) into one `argparse.Namespace` and checks every value before anything is loaded.
"""

import argparse
import importlib.util
from dataclasses import dataclass

from diffusers.optimization import SchedulerType

from ..trigflow import SIGMA_DATA
from .controlnet import CONTROLNET_TRAINING_MODES, DEFAULT_CONTROLNET_TRAINING_MODE
from .distill import DistillationConfig
from .ladd import HEAD_BLOCK_LAYOUTS
from .lora import DEFAULT_LORA_TARGET_MODULES
from .monitoring import DEFAULT_MAX_CONSECUTIVE_SKIPS
from .scm import SCMLossConfig
from .settings import (
    PROBABILITY,
    RecipeParser,
    When,
    at_least,
    between,
    flag_tables,
    greater_than,
    setting,
    setting_errors,
    values_of,
)


OPTIMIZERS = ("adamw", "adamw8bit", "came")
# diffusers' schedulers that take no extra arguments (piecewise_constant needs step rules we do not expose)
LR_SCHEDULERS = tuple(t.value for t in SchedulerType if t != SchedulerType.PIECEWISE_CONSTANT)
_WARMUP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")
_DECAYING_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def _scheduler_reads(*schedulers: str) -> When:
    return When(f"with --lr_scheduler {' or '.join(schedulers)}", lambda args: args.lr_scheduler in schedulers)


_STREAMING = When("with --streaming", lambda args: bool(args.streaming))
_TEACHER_LORA = When("with --teacher_lora", lambda args: args.teacher_lora is not None)
_LORA = When("with --lora_rank", lambda args: args.lora_rank is not None)
_CONTROLNET = When("with --controlnet_model_name_or_path", lambda args: args.controlnet_model_name_or_path is not None)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    pretrained_teacher_model_name_or_path: str = setting(
        help="The teacher, a diffusers-format Sana pipeline (Hub id or local folder). Distillation: a Sprint teacher "
        "written by prepare_sana_sprint_teacher.py (recommended) or any flow-matching Sana pipeline; teacher "
        "preparation: the flow-matching Sana pipeline to prepare."
    )
    revision: str | None = setting(None, help="Revision (branch, tag or commit) of the teacher.")
    variant: str | None = setting(None, help="Weights variant of the teacher, e.g. `fp16`.")
    cache_dir: str | None = setting(None, help="Where downloaded models and datasets are cached.", fingerprint=False)
    sigma_data: float = setting(
        SIGMA_DATA, help="TrigFlow data standard deviation.", range=greater_than(0), advanced=True
    )
    teacher_lora: str | None = setting(
        None,
        help="A diffusers-format LoRA of the teacher (a user's DreamBooth or style adapter: a folder with "
        "pytorch_lora_weights.safetensors, a .safetensors file or a Hub id), fused into the frozen teacher at "
        "--teacher_lora_scale right after it loads: the run distils (or prepares) the personalised teacher "
        "(docs/lora.md).",
        recorded_unless=None,
    )
    teacher_lora_scale: float = setting(
        1.0,
        help="The scale --teacher_lora is fused at (diffusers' LoRA scale).",
        range=greater_than(0),
        fingerprint=_TEACHER_LORA,
        recorded_unless=1.0,
        advanced=True,
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str | None = setting(
        None,
        help="A `datasets` dataset: Hub id, local dataset folder/script, or a folder written by `save_to_disk`.",
    )
    dataset_config_name: str | None = setting(None, help="Config name of `--dataset_name`.")
    train_data_dir: str | None = setting(
        None, help="An image folder with a `metadata.jsonl` (`file_name` + caption column), loaded as `imagefolder`."
    )
    train_shards: list[str] | None = setting(
        None,
        help="Local WebDataset tar shards (paths or globs), streamed by `datasets`' webdataset loader; columns are "
        "the file extensions of a sample (e.g. --image_column jpg --caption_column txt). Implies --streaming.",
        recorded_unless=None,
    )
    streaming: bool = setting(
        False,
        help="Stream --dataset_name (`load_dataset(..., streaming=True)`) instead of downloading it; the stream's "
        "position is checkpointed and --resume_from_checkpoint continues from it (docs/data.md).",
        recorded_unless=False,
    )
    shuffle_buffer_size: int = setting(
        1000,
        help="Streaming: `datasets`' shuffle buffer (and shard-order shuffle), reseeded every epoch (0: stream "
        "order).",
        range=at_least(0, " (0: the stream's order)"),
        fingerprint=_STREAMING,
        advanced=True,
    )
    caption_fallback_columns: list[str] | None = setting(
        None,
        help="Streaming: columns tried in order when --caption_column is absent or null; a dotted name reads into a "
        "JSON column, e.g. json.caption.",
        fingerprint=_STREAMING,
        advanced=True,
    )
    skip_bad_shards: bool = setting(
        False,
        help="Streaming from --train_shards: leave out WebDataset shards that are empty, truncated, not tar archives "
        "or hold text that does not decode (one warning names each and the count) instead of stopping before "
        "training.",
        fingerprint=_STREAMING,
        advanced=True,
    )
    image_column: str = setting("image", help="Column holding the images.")
    caption_column: str = setting("text", help="Column holding the captions (a string or a list).")
    max_train_samples: int | None = setting(
        None,
        help="Keep only the first N samples (debugging).",
        range=at_least(1, " (or unset: every sample)"),
        advanced=True,
    )
    resolution: int = setting(
        1024,
        help="Training resolution in pixels (a multiple of the VAE scale times the patch size).",
        range=at_least(1, " pixel"),
    )
    multi_scale: bool = setting(
        False,
        help="Aspect-ratio buckets: each image goes to the nearest of Sana's aspect-ratio bins of about "
        "--resolution^2 pixels (diffusers' ASPECT_RATIO_*_BIN), resized and cropped to it; every step draws all "
        "its samples (on every process) from one bin, bins in proportion to the data (docs/data.md).",
        recorded_unless=False,
    )
    center_crop: bool = setting(False, help="Centre crop instead of a random crop.")
    random_flip: bool = setting(False, help="Flip images left-right with probability 0.5.")
    cache_latents: bool = setting(
        False,
        help="Encode all images and captions once before training, then free the text encoder and move the VAE to "
        "the CPU (it only decodes validation images). Random crops are then fixed; flips are cached both ways.",
    )
    feature_cache_dir: str | None = setting(
        None,
        help="On-disk cache of VAE latents and text embeddings (safetensors shards, keyed by content hash, model, "
        "bin, --max_sequence_length and instruction), shared by runs and processes: missing entries are encoded and "
        "stored as training meets them; a run whose entries are all there never constructs the text encoder (nor "
        "the VAE, except to decode validation images). Needs --center_crop (docs/data.md).",
        fingerprint=False,  # cached latents equal fresh ones (the same VAE) up to the VAE's batch rounding
    )
    precompute_only: bool = setting(
        False,
        help="Fill --feature_cache_dir (every latent, both flips with --random_flip, every caption, the empty and "
        "the validation prompts; each process a share of the rows) and exit without training.",
        fingerprint=False,
    )
    max_sequence_length: int = setting(300, help="Text tokens per caption (Sana: 300).", range=at_least(1, " token"))
    complex_human_instruction: bool = setting(
        True,
        help="Prepend Sana's prompt-enhancing instruction when encoding captions and validation prompts (as the "
        "pipeline does by default). Use --no-complex_human_instruction for models trained without it.",
    )
    dataloader_num_workers: int = setting(
        0, help="Data loading worker processes (0: main process).", range=at_least(0), fingerprint=False
    )
    validate_data: bool = setting(
        False,
        help="Read every image and caption once before training and stop with a list of all unreadable rows.",
        fingerprint=False,
    )


@dataclass
class OptimizationArguments:
    _argument_group_name = "optimisation"

    train_batch_size: int = setting(4, help="Samples per micro-batch and process.", range=at_least(1))
    gradient_accumulation_steps: int = setting(
        1,
        help="Micro-batches per process and update (accelerate's gradient accumulation). In the fingerprint as "
        "the global batch (train_batch_size x accumulation x processes).",
        range=at_least(1),
    )
    max_train_steps: int = setting(
        20000,
        help="Training iterations (optimiser updates).",
        range=at_least(1),
        fingerprint=_scheduler_reads(*_DECAYING_SCHEDULERS),
    )
    learning_rate: float = setting(2e-6, help="Learning rate.", range=greater_than(0))
    max_grad_norm: float | None = setting(
        0.1,
        help="Gradient clipping (official 0.1; inf: no clipping). A NaN/Inf gradient norm skips the update.",
        range=greater_than(0, " (inf: no clipping)"),
        infinity_allowed=True,
    )
    max_consecutive_skips: int = setting(
        DEFAULT_MAX_CONSECUTIVE_SKIPS,
        help="Stop with an error after this many NaN/Inf updates in a row (a diverged run).",
        range=at_least(1),
        fingerprint=False,
        advanced=True,
    )
    scale_lr: bool = setting(False, help="Multiply the learning rates by batch size x accumulation steps x processes.")
    optimizer: str = setting(
        "adamw",
        help="adamw (torch), adamw8bit (bitsandbytes) or came (came_pytorch, the official choice).",
        choices=OPTIMIZERS,
    )
    adam_beta1: float = setting(0.9, help="beta1 of AdamW / CAME.", range=between(0, 1, high_open=True))
    adam_beta2: float = setting(0.999, help="beta2 of AdamW / CAME.", range=between(0, 1, high_open=True))
    came_beta3: float = setting(0.9999, help="beta3 of CAME.", range=between(0, 1, high_open=True), advanced=True)
    adam_weight_decay: float = setting(0.0, help="Weight decay.", range=at_least(0))
    adam_epsilon: float = setting(1e-8, help="epsilon of AdamW.", range=greater_than(0), advanced=True)
    lr_scheduler: str = setting("constant", help="diffusers learning-rate scheduler.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(
        0,
        help="Warm-up iterations of the lr scheduler.",
        range=at_least(0),
        fingerprint=_scheduler_reads(*_WARMUP_SCHEDULERS),
    )
    lr_num_cycles: int = setting(
        1,
        help="Cycles of cosine_with_restarts.",
        range=at_least(1),
        fingerprint=_scheduler_reads("cosine_with_restarts"),
        advanced=True,
    )
    lr_power: float = setting(
        1.0,
        help="Power of the polynomial scheduler (the lr decays as (1 - progress)^power).",
        range=greater_than(0),
        fingerprint=_scheduler_reads("polynomial"),
        advanced=True,
    )
    use_ema: bool = setting(False, help="Keep an EMA of the trained weights (saved at the end).")
    ema_decay: float = setting(0.9999, help="EMA decay.", range=between(0, 1))
    gradient_checkpointing: bool = setting(
        False,
        help="Recompute activations in the backward (student, and the teacher inside the discriminator).",
        fingerprint=False,
    )
    mixed_precision: str | None = setting(
        None,
        help="Autocast precision; trained weights stay fp32. Default: the accelerate config.",
        choices=("no", "fp16", "bf16"),
    )
    fsdp: bool = setting(
        False,
        help="Shard the trained model, the frozen teacher (and the discriminator heads) with torch FSDP2 "
        "(`fully_shard` per transformer block) across the launched processes; also on CPU (gloo). Implied by an "
        "accelerate FSDP2 config (examples/accelerate_configs/fsdp2.yaml).",
    )
    allow_tf32: bool = setting(False, help="Allow TF32 matmuls on Ampere+ GPUs.", fingerprint=False)
    seed: int | None = setting(
        None,
        help="Seed of everything random (default: drawn). A checkpoint's seed wins on resume.",
        fingerprint=False,
    )


@dataclass
class OutputArguments:
    _argument_group_name = "checkpoints, validation, logging"

    output_dir: str = setting("sana-sprint", help="Output folder.", fingerprint=False)
    checkpointing_steps: int = setting(
        500, help="Save a resumable state every N steps.", range=at_least(1), fingerprint=False
    )
    checkpoints_total_limit: int | None = setting(
        None,
        help="Keep at most this many checkpoints.",
        range=at_least(1, " (or unset: keep every checkpoint)"),
        fingerprint=False,
    )
    resume_from_checkpoint: str | None = setting(
        None, help='Resume from a checkpoint folder, or "latest" in --output_dir.', fingerprint=False
    )
    validation_prompts: list[str] | None = setting(None, help="Prompts of validation grids.", fingerprint=False)
    validation_steps: int = setting(
        500, help="Validate every N steps (and at the end).", range=at_least(1), fingerprint=False
    )
    validation_inference_steps: list[int] = setting(
        [1, 2],
        help="Sampling steps of the validation images.",
        range=at_least(1, " (each value)"),
        fingerprint=False,
    )
    validation_guidance_scale: float = setting(
        4.5,
        help="Guidance of validation images (embedded w of the student; CFG scale of the teacher).",
        range=at_least(0),
        fingerprint=False,
    )
    logging_dir: str = setting("logs", help="Tracker log folder, relative to --output_dir.", fingerprint=False)
    report_to: str = setting(
        "tensorboard", help="Experiment tracker.", choices=("tensorboard", "wandb", "all", "none"), fingerprint=False
    )
    tracker_project_name: str = setting("sana-sprint", help="Project name passed to the tracker.", fingerprint=False)
    push_to_hub: bool = setting(False, help="Upload the result to the Hub at the end.", fingerprint=False)
    hub_token: str | None = setting(
        None, help="Hub token (default: the stored login, which is safer).", fingerprint=False, advanced=True
    )
    hub_model_id: str | None = setting(
        None, help="Hub repository (default: the --output_dir folder name).", fingerprint=False
    )


@dataclass
class StudentArguments:
    _argument_group_name = "student and teacher"

    guidance_embeds: bool = setting(
        True,
        help="Give the full student a guidance embedder (the paper's CFG embedding). --no-guidance_embeds: a plain "
        "copy of the teacher that learns one CFG scale (pass a single --guidance_scales; sample with "
        "guidance_scale=None).",
    )
    guidance_embeds_scale: float = setting(
        0.1,
        help="The full student embeds this times w.",
        range=greater_than(0),
        advanced=True,
    )
    teacher_cfg_without_guidance_embeds: bool = setting(
        True,
        help="A student without guidance embedder (LoRA, --no-guidance_embeds) distils the CFG teacher at "
        "--guidance_scales (measured better on the toy: docs/training.md). --no-teacher_cfg_without_guidance_embeds: "
        "the plain conditional teacher, as the official loop does. A student with the embedder always distils the "
        "CFG teacher.",
        recorded_unless=True,  # the behaviour before the flag existed,
        advanced=True,
    )
    fp32_linear_attention: bool = setting(
        True,
        help="Run the student's linear self-attention product in fp32 with autocast off (official fp32_attention). "
        "--no-fp32_linear_attention: diffusers' processor, whose matmuls autocast runs in bf16.",
        fingerprint=False,  # precision of the same math, like --allow_tf32,
        advanced=True,
    )
    teacher_fp32: bool = setting(
        True,
        help="Keep the frozen teacher (also the discriminator's backbone) in fp32, computed under autocast "
        "(official). --no-teacher_fp32: cast it to the --mixed_precision dtype (half its memory).",
        fingerprint=False,  # idem: the teacher's weights in fp32 or the autocast dtype,
        advanced=True,
    )
    log_gradient_norms_every: int = setting(
        0,
        help="Every N iterations log the gradient norms of the weighted sCM and adversarial losses on the student "
        "(scm_grad_norm, adversarial_grad_norm in training_log.jsonl; an extra backward per part). 0: off.",
        range=at_least(0),
        fingerprint=False,
        advanced=True,
    )


@dataclass
class DiscriminatorArguments:
    _argument_group_name = "LADD discriminator"

    head_block_ids: list[int] | None = setting(
        None,
        help="Teacher blocks feeding discriminator heads; validated against the teacher depth. Default: "
        "--head_block_layout.",
        range=at_least(0, " (each block id)"),
    )
    head_block_layout: str = setting(
        "official",
        help="Head blocks when --head_block_ids is not given: 'official' = 2 8 14 19 for teachers of 20 blocks or "
        "more (the official 1.6B and 0.6B configs alike); 'spread' = the same fractions of the depth (28 blocks: 3 "
        "11 20 27). Shallower teachers get the spread either way.",
        choices=HEAD_BLOCK_LAYOUTS,
        advanced=True,
    )
    head_channels: int | None = setting(
        None,
        help="Width of each head (default: the teacher's inner dim).",
        range=at_least(1),
        advanced=True,
    )
    discriminator_learning_rate: float | None = setting(
        None,
        help="Learning rate of the discriminator heads (default: --learning_rate).",
        range=greater_than(0, " (or unset: --learning_rate)"),
    )
    discriminator_lr_schedule: str = setting(
        "constant",
        help="'constant' (official): the heads' learning rate is constant from step 0 (no warm-up); 'generator': "
        "the heads follow --lr_scheduler / --lr_warmup_steps like the generator.",
        choices=("constant", "generator"),
        advanced=True,
    )


@dataclass
class LoRAArguments:
    _argument_group_name = "LoRA"

    lora_rank: int | None = setting(
        None,
        help="Train a LoRA of this rank on the teacher instead of a full student (the teacher + LoRA becomes the "
        "one-step model; it has no guidance embedder, sample with guidance_scale=None).",
        range=at_least(1),
    )
    lora_alpha: float | None = setting(
        None,
        help="LoRA alpha (default: the rank).",
        range=greater_than(0, " (the LoRA scale is alpha / rank)"),
        fingerprint=_LORA,
    )
    lora_target_modules: list[str] = setting(
        list(DEFAULT_LORA_TARGET_MODULES),
        help="Modules that get a LoRA adapter (peft name matching).",
        fingerprint=_LORA,
    )


@dataclass
class ControlNetArguments:
    _argument_group_name = "ControlNet distillation (docs/controlnet.md)"

    controlnet_model_name_or_path: str | None = setting(
        None,
        help="Distil a ControlNet: the teacher's diffusers SanaControlNetModel (a model folder or Hub id, or a "
        "pipeline with a controlnet/ subfolder). The control images (--conditioning_image_column) condition the "
        "teacher, the student and the discriminator; the output is a SanaSprintControlNetPipeline folder.",
        recorded_unless=None,
    )
    student_controlnet_model_name_or_path: str | None = setting(
        None,
        help="Initial weights of the student's ControlNet (default: a copy of the teacher's, its time embedding "
        "remapped when the student reads another time scale).",
        fingerprint=_CONTROLNET,
        advanced=True,
    )
    pretrained_student_model_name_or_path: str | None = setting(
        None,
        help="Start from this Sprint student (a SanaSprintPipeline folder or Hub id with a transformer/ subfolder) "
        "instead of building one from the teacher; needed by --controlnet_training_mode controlnet_only.",
        recorded_unless=None,
    )
    conditioning_image_column: str = setting(
        "conditioning_image",
        help="Column of the control images (cropped and flipped with their image, encoded by the VAE).",
        fingerprint=_CONTROLNET,
    )
    controlnet_training_mode: str = setting(
        DEFAULT_CONTROLNET_TRAINING_MODE,
        help="controlnet_only: the student transformer is frozen, only its ControlNet trains (distil a ControlNet "
        "onto an existing Sprint student; the default, see docs/controlnet.md). joint: student and ControlNet train "
        "together.",
        choices=CONTROLNET_TRAINING_MODES,
        fingerprint=_CONTROLNET,
    )
    controlnet_conditioning_scale: float = setting(
        1.0,
        help="Scale of the ControlNet residuals, for teacher and student alike.",
        range=at_least(0),
        fingerprint=_CONTROLNET,
    )


@dataclass
class TeacherPreparationArguments:
    _argument_group_name = "teacher preparation"

    teacher_qk_norm: str = setting(
        "rms_norm_across_heads", help="QK-norm added to the teacher (`none` keeps the attention as is)."
    )
    dense_time: bool = setting(True, help="Dense time embedding (the network embeds s instead of 1000 s).")
    dense_time_init: str = setting(
        "copy",
        help="Initialise the dense time MLP by copying (NVlabs) or remapping the teacher's frequencies.",
        choices=("copy", "remap"),
        advanced=True,
    )
    calibrate_qk_norm: bool = setting(
        False, help="Set new cross-attention QK-norm gains from the first batch (keeps the attention temperature)."
    )
    finetune_logit_mean: float = setting(0.0, help="Fine-tune time: logit-normal mean.", advanced=True)
    finetune_logit_std: float = setting(
        1.0, help="Fine-tune time: logit-normal std.", range=at_least(0), advanced=True
    )
    finetune_weighting: str = setting(
        "trigflow",
        help="Fine-tune loss weighting (TrigFlow diffusion loss or the teacher's flow-matching loss).",
        choices=("trigflow", "flow"),
    )
    caption_dropout_prob: float = setting(
        0.1, help="Fine-tune: captions replaced by the empty prompt.", range=PROBABILITY
    )


@dataclass(frozen=True)
class Recipe:
    """A script's settings: its `stage` (names its checkpoints and fingerprint), its sections in `--help` order, and
    the defaults it overrides."""

    stage: str
    description: str
    sections: tuple
    defaults: dict

    def parser(self) -> RecipeParser:
        parser = RecipeParser(self.sections, description=self.description)
        parser.set_defaults(**self.defaults)
        return parser


_SHARED_HEAD = (ModelArguments, DataArguments)
_SHARED_TAIL = (OptimizationArguments, OutputArguments)
DISTILLATION = Recipe(
    stage="distill",
    description="SANA-Sprint distillation (sCM + LADD) with accelerate. Settings may come from a recipe file "
    "(--config examples/configs/<recipe>.yaml) or a flag file (@file); flags on the command line win.",
    sections=(
        *_SHARED_HEAD,
        SCMLossConfig,
        DistillationConfig,
        StudentArguments,
        DiscriminatorArguments,
        LoRAArguments,
        ControlNetArguments,
        *_SHARED_TAIL,
    ),
    defaults={},
)
TEACHER_PREPARATION = Recipe(
    stage="prepare_teacher",
    description="SANA-Sprint teacher preparation (QK-norm + dense time + TrigFlow fine-tune) with accelerate.",
    sections=(*_SHARED_HEAD, TeacherPreparationArguments, *_SHARED_TAIL),
    defaults={"learning_rate": 2e-5, "validation_inference_steps": [20]},
)
RECIPES = (DISTILLATION, TEACHER_PREPARATION)
ALL_SECTIONS = tuple(dict.fromkeys(section for recipe in RECIPES for section in recipe.sections))


# ---------------------------------------------------------------------------------------------------------------------
# Checks that involve several settings
# ---------------------------------------------------------------------------------------------------------------------


def controlnet_training(args) -> bool:
    """Whether the run distils a ControlNet (`--controlnet_model_name_or_path` given)."""
    return getattr(args, "controlnet_model_name_or_path", None) is not None


def _given(args, name: str):
    return getattr(args, name, None)


def recipe_errors(args: argparse.Namespace) -> list[str]:
    """Every problem of a parsed command line, one line each: the ranges and choices of each setting, then the
    rules that involve several settings. Settings the namespace lacks (or holds as `None`) are skipped."""
    errors = setting_errors(vars(args), ALL_SECTIONS)
    if _given(args, "teacher_lora_scale") not in (None, 1.0) and _given(args, "teacher_lora") is None:
        errors.append(
            f"--teacher_lora_scale applies only with --teacher_lora (got --teacher_lora_scale "
            f"{args.teacher_lora_scale!r} alone)."
        )
    if _given(args, "lora_alpha") is not None and _given(args, "lora_rank") is None:
        errors.append(f"--lora_alpha applies only with --lora_rank (got --lora_alpha {args.lora_alpha!r} alone).")
    if _given(args, "compile_jvp") and _given(args, "jvp") not in (None, "exact"):
        errors.append(f"--compile_jvp applies only with --jvp exact (got --jvp {args.jvp!r}).")
    scm, adversarial = _given(args, "scm_lambda"), _given(args, "adversarial_lambda")
    if getattr(args, "stage", "distill") == "distill" and scm == 0 and adversarial == 0:
        errors.append(
            "At least one of --scm_lambda and --adversarial_lambda must be > 0 (both are 0: nothing trains)."
        )
    if _given(args, "share_discriminator_timesteps") and _given(args, "misaligned_pairs"):
        errors.append("--share_discriminator_timesteps needs equal real/fake batches: add --no-misaligned_pairs.")
    return errors


def validate_training_args(args: argparse.Namespace) -> None:
    """Raise one `ValueError` listing every invalid setting of `args` (see `recipe_errors`)."""
    errors = recipe_errors(args)
    if errors:
        raise ValueError("Invalid training arguments:\n" + "\n".join(f"  {line}" for line in errors))


def _check_sources(args) -> None:
    if sum(source is not None for source in (args.dataset_name, args.train_data_dir, args.train_shards)) != 1:
        raise ValueError("Give exactly one of --dataset_name, --train_data_dir and --train_shards.")
    if args.train_shards:
        args.streaming = True
    if args.streaming:
        if args.train_data_dir is not None:
            raise ValueError("--streaming reads --dataset_name or --train_shards, not --train_data_dir.")
        unsupported = [
            flag
            for flag in ("multi_scale", "feature_cache_dir", "cache_latents", "validate_data", "calibrate_qk_norm")
            if _given(args, flag)
        ]
        if unsupported:
            raise ValueError(f"--streaming does not support --{', --'.join(unsupported)} yet (see docs/data.md).")
    if args.precompute_only and not args.feature_cache_dir:
        raise ValueError("--precompute_only fills the on-disk caches: give --feature_cache_dir too.")
    if args.feature_cache_dir and not args.center_crop:
        raise ValueError(
            "--feature_cache_dir stores one crop per image and bin: pass --center_crop (a random crop would be fixed "
            "at its first draw)."
        )


def _check_services(args) -> None:
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token. "
            "Please use `hf auth login` to authenticate with the Hub."
        )
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ImportError("--report_to wandb needs `pip install wandb`.")
    for optimizer, module, package in (
        ("adamw8bit", "bitsandbytes", "bitsandbytes"),
        ("came", "came_pytorch", "came-pytorch"),
    ):
        if args.optimizer == optimizer and importlib.util.find_spec(module) is None:
            raise ImportError(f"--optimizer {optimizer} needs the `{package}` package: `pip install {package}`.")


def _check_distillation(args) -> None:
    if args.fsdp and args.lora_rank is not None:
        raise ValueError("--fsdp with --lora_rank is not supported: LoRA trains a small adapter; use DDP.")
    if not controlnet_training(args):
        if args.student_controlnet_model_name_or_path is not None:
            raise ValueError(
                "--student_controlnet_model_name_or_path needs --controlnet_model_name_or_path (the teacher's "
                "ControlNet)."
            )
        return
    unsupported = [
        flag
        for flag in ("fsdp", "lora_rank", "streaming", "train_shards", "feature_cache_dir", "multi_scale")
        if _given(args, flag)
    ]
    if args.validation_prompts:
        unsupported.append("validation_prompts")
    if unsupported:
        raise ValueError(
            f"--controlnet_model_name_or_path does not support --{', --'.join(unsupported)} yet (docs/controlnet.md)."
        )
    if args.controlnet_training_mode == "controlnet_only" and args.pretrained_student_model_name_or_path is None:
        raise ValueError(
            "--controlnet_training_mode controlnet_only distils a ControlNet onto an existing Sprint student (its "
            "transformer stays frozen): pass --pretrained_student_model_name_or_path, or use "
            "--controlnet_training_mode joint to distil student and ControlNet together."
        )


def _check_teacher_preparation(args) -> None:
    if args.validation_prompts and args.resolution % 32:
        raise ValueError("Validating the teacher uses diffusers' SanaPipeline, which needs --resolution % 32 == 0.")


def parse_recipe(recipe: Recipe, argv: list[str] | None = None) -> argparse.Namespace:
    """
    The settings of `recipe` from a command line (`None`: `sys.argv`), every one checked before anything is loaded:
    argparse refuses unknown flags, bad types and choices; `validate_training_args` every range (all offending
    settings at once); then the rules between settings (data source, streaming, caches, trackers, optional
    packages, ControlNet and LoRA combinations). `args.stage` is the recipe's stage.
    """
    args = recipe.parser().parse_args(argv)
    args.stage = recipe.stage
    _check_sources(args)
    _check_services(args)
    validate_training_args(args)
    if recipe.stage == DISTILLATION.stage:
        _check_distillation(args)
    else:
        _check_teacher_preparation(args)
    return args


def distillation_config(args, sharded: bool, student_has_guidance_embedder: bool = True) -> DistillationConfig:
    """The library recipe from parsed settings. A student without guidance embedder distils the CFG teacher unless
    --no-teacher_cfg_without_guidance_embeds (the official loop's choice: the plain conditional teacher); under FSDP2
    the LADD fake is always drawn afresh (every rank must run the same forwards)."""
    scm = SCMLossConfig(
        **values_of(args, SCMLossConfig),
        sigma_data=args.sigma_data,
        guide_teacher=student_has_guidance_embedder or args.teacher_cfg_without_guidance_embeds,
    )
    return DistillationConfig(
        **values_of(args, DistillationConfig, fake_from_scm_forward=args.fake_from_scm_forward and not sharded),
        scm=scm,
    )


FLAG_REFERENCE_MARKERS = ("<!-- flag reference: start -->", "<!-- flag reference: end -->")


def flag_reference() -> str:
    """The flag tables of docs/training.md ("All flags"), generated from the settings (a test keeps the docs equal;
    regenerate with `python -m diffusers_sprint.training.recipe docs/training.md`)."""
    shared = set(DISTILLATION.sections) & set(TEACHER_PREPARATION.sections)
    teacher_defaults = ", ".join(f"`--{k}` {v}" for k, v in TEACHER_PREPARATION.defaults.items())
    return "\n\n".join(
        [
            FLAG_REFERENCE_MARKERS[0],
            "### `train_sana_sprint.py`",
            flag_tables(DISTILLATION.sections, DISTILLATION.defaults),
            f"### `prepare_sana_sprint_teacher.py` (its own settings; the shared ones as above, with "
            f"{teacher_defaults})",
            flag_tables(TEACHER_PREPARATION.sections, TEACHER_PREPARATION.defaults, skip=shared),
            FLAG_REFERENCE_MARKERS[1],
        ]
    )


def write_flag_reference(path: str) -> None:
    """Replace the text between the `FLAG_REFERENCE_MARKERS` of `path` by `flag_reference()`."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    start, end = (text.index(marker) for marker in FLAG_REFERENCE_MARKERS)
    text = text[:start] + flag_reference() + text[end + len(FLAG_REFERENCE_MARKERS[1]) :]
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


if __name__ == "__main__":
    import sys

    write_flag_reference(sys.argv[1])
