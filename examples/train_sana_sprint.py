#!/usr/bin/env python
# Copyright 2026 The diffusers-sprint authors. Licensed under the Apache License, Version 2.0.
"""SANA-Sprint one-step distillation with 🤗 accelerate (sCM + LADD), full or LoRA, and the teacher preparation stage.

    accelerate launch examples/train_sana_sprint.py \
        --pretrained_teacher_model_name_or_path <sana pipeline dir or Hub id> \
        --dataset_name <datasets id or save_to_disk dir> --resolution 1024 --output_dir sana-sprint

Stages (`--stage`):
  prepare_teacher  a flow-matching Sana -> the Sprint teacher (QK-norm + dense time), briefly fine-tuned with the
                   TrigFlow loss; writes a diffusers `SanaPipeline` folder to use as the distillation teacher.
  distill          sCM + LADD distillation of a one-step student; writes a `SanaSprintPipeline` folder (or LoRA weights
                   with `--lora_rank`).

This script is wiring only: every piece of math comes from `diffusers_sprint.training` (see docs/training.md).

Models are kept unwrapped (no DDP wrapper): the training steps call `trigflow_forward` and `torch.func.jvp` on the
plain module, which a DDP wrapper would never see, so gradients are averaged across processes explicitly with
`training.parallel.all_reduce_gradients`. Data order, augmentations and noise are functions of
`(seed, step, micro-batch index)`, so runs are reproducible across restarts and across process layouts.
"""

import argparse
import importlib.util
import json
import logging
import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import SanaPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_wandb_available, make_image_grid
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo, upload_folder
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.pipelines.pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from diffusers_sprint.training import (
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SanaDiscriminator,
    SCMLossConfig,
    build_student,
    discriminator_step,
    generator_step,
    optimizer_update,
    prepare_sprint_teacher,
    teacher_finetune_loss,
)
from diffusers_sprint.training.data import (
    ImageCaptionDataset,
    LayoutInvariantBatchSampler,
    PromptEncoder,
    build_latent_cache,
    collate_examples,
    encode_images,
    load_image_caption_dataset,
    trim_prompt_padding,
)
from diffusers_sprint.training.finetune import (
    drop_captions,
    teacher_calibration_inputs,
    use_sana_pipeline_time_convention,
)
from diffusers_sprint.training.lora import DEFAULT_LORA_TARGET_MODULES, build_lora_student, lora_state_dict
from diffusers_sprint.training.parallel import (
    all_reduce_gradients,
    broadcast_parameters,
    global_micro_batch_index,
    make_generator,
)
from diffusers_sprint.training.teacher import sample_finetune_time


if is_wandb_available():
    import wandb

logger = get_logger(__name__, log_level="INFO")

STAGES = ("prepare_teacher", "distill")
OPTIMIZERS = ("adamw", "adamw8bit", "came")
TRAINING_LOG = "training_log.jsonl"
TRAINING_STATE = "training_state.json"
HUB_IGNORE_PATTERNS = ["checkpoint-*", "step_*", "epoch_*"]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SANA-Sprint distillation (sCM + LADD) and teacher preparation with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_teacher_model_name_or_path",
        type=str,
        required=True,
        help="Teacher: a diffusers-format Sana pipeline (Hub id or local folder). For `--stage distill` a Sprint "
        "teacher written by `--stage prepare_teacher` (recommended) or any flow-matching Sana pipeline.",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the teacher.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant of the teacher, e.g. `fp16`.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument(
        "--stage",
        type=str,
        default="distill",
        choices=STAGES,
        help="`prepare_teacher`: QK-norm + dense-time teacher fine-tune; `distill`: sCM + LADD distillation.",
    )

    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` dataset: Hub id, local dataset folder/script, or a folder written by `save_to_disk`.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config name of `--dataset_name`.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="An image folder with a `metadata.jsonl` (`file_name` + caption column), loaded as `imagefolder`.",
    )
    group.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    group.add_argument(
        "--caption_column", type=str, default="text", help="Column holding the captions (a string or a list)."
    )
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Keep only the first N samples (debugging)."
    )
    group.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="Training resolution in pixels (a multiple of the VAE scale times the patch size).",
    )
    group.add_argument("--center_crop", action="store_true", help="Centre crop instead of a random crop.")
    group.add_argument("--random_flip", action="store_true", help="Flip images left-right with probability 0.5.")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode all images and captions once before training, then free the text encoder and move the VAE to "
        "the CPU (it only decodes validation images). Random crops are then fixed; flips are cached both ways.",
    )
    group.add_argument("--max_sequence_length", type=int, default=300, help="Text tokens per caption (Sana: 300).")
    group.add_argument(
        "--complex_human_instruction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prepend Sana's prompt-enhancing instruction when encoding captions and validation prompts (as the "
        "pipeline does by default). Use --no-complex_human_instruction for models trained without it.",
    )
    group.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Data loading worker processes (0: main process)."
    )

    group = parser.add_argument_group("sCM (generator phase); defaults are the official recipe")
    group.add_argument("--sigma_data", type=float, default=0.5, help="TrigFlow data standard deviation.")
    group.add_argument("--p_mean", type=float, default=0.2, help="Generator time: mean of log(sigma_d tan t).")
    group.add_argument("--p_std", type=float, default=1.6, help="Generator time: std of log(sigma_d tan t).")
    group.add_argument(
        "--tangent_warmup_steps",
        type=int,
        default=4000,
        help="Generator updates over which the tangent's second term ramps in (0: none). The official loop counts "
        "G and D phases together; pass half its value to reproduce it exactly (see docs/training.md).",
    )
    group.add_argument(
        "--tangent_norm", type=str, default="l2", choices=("l2", "rms"), help="Per-sample tangent normalisation."
    )
    group.add_argument("--tangent_norm_eps", type=float, default=0.1, help="The c of g / (||g|| + c).")
    group.add_argument(
        "--guidance_scales",
        type=float,
        nargs="+",
        default=[4.0, 4.5, 5.0],
        help="CFG scales w of the teacher, drawn per sample (the full student also gets w as input).",
    )
    group.add_argument(
        "--guidance_embeds_scale", type=float, default=0.1, help="The full student embeds this times w."
    )
    group.add_argument(
        "--guidance_embeds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Give the full student a guidance embedder (the paper's CFG embedding). --no-guidance_embeds: a plain "
        "copy of the teacher that learns one CFG scale (pass a single --guidance_scales; sample with "
        "guidance_scale=None).",
    )
    group.add_argument(
        "--adaptive_weight",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Adaptive loss weight exp(-logvar) + logvar from a logvar head (official).",
    )
    group.add_argument(
        "--detach_logvar_embedding",
        action="store_true",
        help="The adaptive weight's logvar terms train the logvar head only, not the shared time/guidance "
        "embedders (official: they train both; that stalls short, high-learning-rate runs, docs/training/scm.md).",
    )
    group.add_argument(
        "--reuse_jvp_primal",
        action="store_true",
        help="Take F from a grad-enabled JVP's primal instead of a second forward (not with gradient checkpointing).",
    )
    group.add_argument("--scm_lambda", type=float, default=1.0, help="Weight of the sCM loss (0: LADD only).")

    group = parser.add_argument_group("LADD (adversarial); defaults are the official recipe")
    group.add_argument(
        "--adversarial_lambda",
        type=float,
        default=0.5,
        help="Weight of the adversarial loss (0: sCM only).",
    )
    group.add_argument(
        "--adversarial_loss", type=str, default="hinge", choices=("hinge", "bce"), help="Adversarial loss."
    )
    group.add_argument(
        "--discriminator_p_mean",
        type=float,
        default=-0.6,
        help="Discriminator re-noising mean.",
    )
    group.add_argument("--discriminator_p_std", type=float, default=1.0, help="Discriminator re-noising std.")
    group.add_argument(
        "--head_block_ids",
        type=int,
        nargs="+",
        default=None,
        help="Teacher blocks feeding discriminator heads; validated against the teacher depth. Default: (2, 8, 14, "
        "19) for a 20-block teacher (official), spread the same way over other depths.",
    )
    group.add_argument(
        "--head_channels", type=int, default=None, help="Width of each head (default: the teacher's inner dim)."
    )
    group.add_argument("--head_kernel_size", type=int, default=9, help="Kernel size of the heads' residual conv.")
    group.add_argument(
        "--head_virtual_batch_size", type=int, default=8, help="Samples per local batch-norm group in the heads."
    )
    group.add_argument(
        "--misaligned_pairs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Real latents with rolled captions as extra fakes for the discriminator (needs batch size >= 2).",
    )
    group.add_argument(
        "--max_time_probability",
        type=float,
        default=0.5,
        help="Max-time weighting: the judged student sample starts from t = pi/2 with this probability.",
    )
    group.add_argument(
        "--share_discriminator_timesteps",
        action="store_true",
        help="One re-noising time for real and fake (needs --no-misaligned_pairs).",
    )
    group.add_argument("--r1_gamma", type=float, default=0.0, help="R1 penalty weight on head features (0: off).")
    group.add_argument(
        "--max_grad_norm", type=float, default=0.1, help="Gradient clipping of both phases (official 0.1)."
    )

    group = parser.add_argument_group("teacher preparation (--stage prepare_teacher)")
    group.add_argument(
        "--teacher_qk_norm",
        type=str,
        default="rms_norm_across_heads",
        help="QK-norm added to the teacher (`none` keeps the attention as is).",
    )
    group.add_argument(
        "--dense_time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Dense time embedding (the network embeds s instead of 1000 s).",
    )
    group.add_argument(
        "--dense_time_init",
        type=str,
        default="copy",
        choices=("copy", "remap"),
        help="Initialise the dense time MLP by copying (NVlabs) or remapping the teacher's frequencies.",
    )
    group.add_argument(
        "--calibrate_qk_norm",
        action="store_true",
        help="Set new cross-attention QK-norm gains from the first batch (keeps the attention temperature).",
    )
    group.add_argument("--finetune_logit_mean", type=float, default=0.0, help="Fine-tune time: logit-normal mean.")
    group.add_argument("--finetune_logit_std", type=float, default=1.0, help="Fine-tune time: logit-normal std.")
    group.add_argument(
        "--finetune_weighting",
        type=str,
        default="trigflow",
        choices=("trigflow", "flow"),
        help="Fine-tune loss weighting (TrigFlow diffusion loss or the teacher's flow-matching loss).",
    )
    group.add_argument(
        "--caption_dropout_prob", type=float, default=0.1, help="Fine-tune: captions replaced by the empty prompt."
    )

    group = parser.add_argument_group("LoRA (distill stage)")
    group.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="Train a LoRA of this rank on the teacher instead of a full student (the teacher + LoRA becomes the "
        "one-step model; it has no guidance embedder, sample with guidance_scale=None).",
    )
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    group.add_argument(
        "--lora_target_modules",
        type=str,
        nargs="+",
        default=list(DEFAULT_LORA_TARGET_MODULES),
        help="Modules that get a LoRA adapter (peft name matching).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=4, help="Samples per micro-batch and process.")
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per process and update."
    )
    group.add_argument(
        "--max_train_steps", type=int, default=20000, help="Training iterations (each: one G and one D update)."
    )
    group.add_argument("--learning_rate", type=float, default=2e-6, help="Learning rate (official: 2e-6 with CAME).")
    group.add_argument(
        "--discriminator_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the discriminator heads (default: --learning_rate).",
    )
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rates by batch size x accumulation steps x processes.",
    )
    group.add_argument(
        "--optimizer",
        type=str,
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw (torch), adamw8bit (bitsandbytes) or came (came_pytorch, the official choice).",
    )
    group.add_argument("--adam_beta1", type=float, default=0.9, help="beta1 of AdamW / CAME.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="beta2 of AdamW / CAME.")
    group.add_argument("--came_beta3", type=float, default=0.9999, help="beta3 of CAME.")
    group.add_argument("--adam_weight_decay", type=float, default=0.0, help="Weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="epsilon of AdamW.")
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='diffusers scheduler: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
        '"constant_with_warmup".',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up iterations of the lr scheduler.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    group.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights (saved at the end).")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay.")
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward (student, and the teacher inside the discriminator).",
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=("no", "fp16", "bf16"),
        help="Autocast precision; trained weights stay fp32. Default: the accelerate config.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--seed", type=int, default=None, help="Seed of everything random (default: drawn).")

    group = parser.add_argument_group("checkpoints, validation, logging")
    group.add_argument("--output_dir", type=str, default="sana-sprint", help="Output folder.")
    group.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder, or "latest" in --output_dir.',
    )
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="Prompts of validation grids.")
    group.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (and at the end).")
    group.add_argument(
        "--validation_inference_steps",
        type=int,
        nargs="+",
        default=None,
        help="Sampling steps of the validation images (default: 1 2 when distilling, 20 for the teacher).",
    )
    group.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=4.5,
        help="Guidance of validation images (embedded w of the student; CFG scale of the teacher).",
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=("tensorboard", "wandb", "all", "none"),
        help="Experiment tracker.",
    )
    group.add_argument(
        "--tracker_project_name", type=str, default="sana-sprint", help="Project name passed to the tracker."
    )
    group.add_argument("--push_to_hub", action="store_true", help="Upload the result to the Hub at the end.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the stored login).")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository (default: the --output_dir folder name)."
    )
    return parser


def parse_args(input_args=None) -> argparse.Namespace:
    args = build_parser().parse_args(input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("Give exactly one of --dataset_name and --train_data_dir.")
    if args.stage == "prepare_teacher" and args.lora_rank is not None:
        raise ValueError("--lora_rank applies to --stage distill; the teacher preparation fine-tunes all weights.")
    if args.gradient_checkpointing and args.reuse_jvp_primal:
        raise ValueError("--reuse_jvp_primal cannot be combined with --gradient_checkpointing.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token. "
            "Please use `hf auth login` to authenticate with the Hub."
        )
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    if args.validation_steps < 1:
        raise ValueError("--validation_steps must be >= 1.")
    if args.stage == "prepare_teacher" and args.validation_prompts and args.resolution % 32:
        raise ValueError("Validating the teacher uses diffusers' SanaPipeline, which needs --resolution % 32 == 0.")
    for optimizer, module, package in (
        ("adamw8bit", "bitsandbytes", "bitsandbytes"),
        ("came", "came_pytorch", "came-pytorch"),
    ):
        if args.optimizer == optimizer and importlib.util.find_spec(module) is None:
            raise ImportError(f"--optimizer {optimizer} needs the `{package}` package: `pip install {package}`.")
    if args.validation_inference_steps is None:
        args.validation_inference_steps = [1, 2] if args.stage == "distill" else [20]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def find_resume_checkpoint(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder.")
        return args.resume_from_checkpoint
    folders = []
    if os.path.isdir(args.output_dir):
        folders = [name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")]
    if not folders:
        return None
    return os.path.join(args.output_dir, max(folders, key=lambda name: int(name.split("-")[1])))


def make_optimizer(args, parameters, learning_rate):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters,
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes`.") from error
        return bnb.optim.AdamW8bit(
            parameters,
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
    try:
        from came_pytorch import CAME
    except ImportError as error:
        raise ImportError("--optimizer came needs came_pytorch: `pip install came-pytorch`.") from error
    return CAME(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2, args.came_beta3),
        weight_decay=args.adam_weight_decay,
        eps=(1e-30, 1e-16),
    )


def tracker_config(args) -> dict:
    """Tracker hyper-parameters: scalars as they are, anything else as a string (tensorboard takes scalars only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def prune_checkpoints(output_dir: str, total_limit: int) -> None:
    """Before saving a new checkpoint, keep at most `total_limit - 1` old ones (diffusers' rule)."""
    checkpoints = sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-")), key=lambda name: int(name.split("-")[1])
    )
    if len(checkpoints) >= total_limit:
        removing = checkpoints[: len(checkpoints) - total_limit + 1]
        logger.info(f"{len(checkpoints)} checkpoints exist, removing {', '.join(removing)}")
        for name in removing:
            shutil.rmtree(os.path.join(output_dir, name))


def save_model_card(
    args, repo_id: str, stage: str, global_step: int, global_batch: int, mixed_precision: str, has_grid: bool
) -> None:
    lora = args.lora_rank is not None
    if stage == "prepare_teacher":
        what = "a SANA-Sprint **teacher** (QK-norm + dense time, TrigFlow fine-tune)"
        usage = (
            "import diffusers_sprint  # registers SanaSprintTransformer2DModel (pip install diffusers-sprint)\n"
            "from diffusers import SanaPipeline\n\n"
            f'pipe = SanaPipeline.from_pretrained("{repo_id}")\n'
            'image = pipe("a red apple", num_inference_steps=20, guidance_scale=4.5).images[0]'
        )
    elif lora:
        base = args.pretrained_teacher_model_name_or_path
        what = f"a SANA-Sprint one-step **LoRA** (rank {args.lora_rank}) for `{base}`"
        usage = (
            "from diffusers_sprint import SanaSprintPipeline\n\n"
            f'pipe = SanaSprintPipeline.from_pretrained("{args.pretrained_teacher_model_name_or_path}")\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            'image = pipe("a red apple", num_inference_steps=1, guidance_scale=None).images[0]'
        )
    else:
        what = "a SANA-Sprint one-step **student** (sCM + LADD distillation)"
        guidance = "" if args.guidance_embeds else ", guidance_scale=None"  # no CFG embedding: one learnt scale
        usage = (
            "from diffusers_sprint import SanaSprintPipeline\n\n"
            f'pipe = SanaSprintPipeline.from_pretrained("{repo_id}")\n'
            f'image = pipe("a red apple", num_inference_steps=1{guidance}).images[0]'
        )
    dataset = args.dataset_name or Path(args.train_data_dir).name
    recipe = [
        ("stage", stage),
        ("iterations", global_step),
        ("global batch", global_batch),
        ("resolution", args.resolution),
        ("optimizer / lr", f"{args.optimizer} / {args.learning_rate}"),
        ("mixed precision", f"{mixed_precision} (fp32 master weights)"),
    ]
    if stage == "distill":
        recipe += [
            ("sCM / adversarial lambda", f"{args.scm_lambda} / {args.adversarial_lambda} ({args.adversarial_loss})"),
            ("CFG scales", " ".join(str(w) for w in args.guidance_scales)),
            ("CFG embedding", "yes" if args.guidance_embeds and not lora else "no"),
            (
                "P_mean, P_std (G / D)",
                f"({args.p_mean}, {args.p_std}) / ({args.discriminator_p_mean}, {args.discriminator_p_std})",
            ),
            (
                "tangent warm-up / norm",
                f"{args.tangent_warmup_steps} / {args.tangent_norm} (eps {args.tangent_norm_eps})",
            ),
            ("max-time probability", args.max_time_probability),
            ("gradient clip", args.max_grad_norm),
            ("EMA", args.ema_decay if args.use_ema else "no"),
        ]
    table = "\n".join(f"| {name} | {value} |" for name, value in recipe)
    grid = (
        "\n![validation grid](./validation_grid.png)\n\nRows: prompts; columns: sampling steps "
        + ", ".join(str(s) for s in args.validation_inference_steps)
        + ".\n"
        if has_grid
        else ""
    )
    description = f"""
# {repo_id}

This is {what}, trained with
`examples/train_sana_sprint.py` of diffusers-sprint from
`{args.pretrained_teacher_model_name_or_path}` on `{dataset}`.
Method: SANA-Sprint ([arXiv 2503.09641](https://arxiv.org/abs/2503.09641)).

## Usage

```python
{usage}
```

## Training

| setting | value |
| --- | --- |
{table}
{grid}"""
    card = load_or_create_model_card(
        repo_id_or_path=repo_id,
        from_training=True,
        license="apache-2.0",
        base_model=args.pretrained_teacher_model_name_or_path,
        model_description=description,
        inference=True,
    )
    tags = ["text-to-image", "diffusers", "diffusers-training", "sana", "sana-sprint"]
    tags += ["lora"] if lora else []
    tags += ["consistency-distillation"] if stage == "distill" else []
    card = populate_model_card(card, tags=tags)
    card.save(os.path.join(args.output_dir, "README.md"))


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    if accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    ):
        raise ValueError(
            f"{accelerator.distributed_type} is not supported: the sCM loss needs forward-mode AD (torch.func.jvp) "
            "through the plain student, which sharded/wrapped engines do not provide. Use plain data parallelism "
            "(accelerate launch --multi_gpu); see docs/training.md."
        )
    if args.report_to in ("wandb", "all") and not is_wandb_available():
        raise ImportError("--report_to wandb needs `pip install wandb`.")
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = accelerator.device
    distill = args.stage == "distill"

    # Seed: a checkpoint's seed wins (data order, augmentations and noise derive from it).
    resume_path = find_resume_checkpoint(args)
    if args.resume_from_checkpoint is not None and resume_path is None:
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run.")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if resume_path is not None:
        with open(os.path.join(resume_path, TRAINING_STATE)) as file:
            saved_state = json.load(file)
        if args.seed is not None and saved_state["seed"] != args.seed:
            logger.warning(f"--seed {args.seed} ignored: resuming the run of seed {saved_state['seed']}.")
        seed = saved_state["seed"]
    seed = broadcast_object_list([seed])[0]
    set_seed(seed)

    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- Frozen components and the teacher --------------------------------------------------------------------------
    hub_kwargs = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    base = SanaPipeline.from_pretrained(args.pretrained_teacher_model_name_or_path, transformer=None, **hub_kwargs)
    vae, text_encoder, teacher_scheduler = base.vae, base.text_encoder, base.scheduler
    teacher = SanaSprintTransformer2DModel.from_pretrained(
        args.pretrained_teacher_model_name_or_path, subfolder="transformer", **hub_kwargs
    )
    vae.requires_grad_(False).eval().to(device)  # DC-AE stays fp32
    text_encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    latent_scale = 2 ** (len(vae.config.encoder_block_out_channels) - 1) * teacher.config.patch_size
    if args.resolution % latent_scale:
        raise ValueError(f"--resolution must be a multiple of {latent_scale} (VAE scale x patch size).")
    prompt_encoder = PromptEncoder(
        base.tokenizer,
        text_encoder,
        args.max_sequence_length,
        DEFAULT_COMPLEX_HUMAN_INSTRUCTION if args.complex_human_instruction else None,
    )
    null_embeds, null_mask = prompt_encoder.null(device)
    validation_embeds = prompt_encoder(args.validation_prompts, device) if args.validation_prompts else None

    # ---- Data -------------------------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        hf_dataset = load_image_caption_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.cache_dir,
            args.image_column,
            args.caption_column,
            args.max_train_samples,
        )
    image_dataset = ImageCaptionDataset(
        hf_dataset,
        args.image_column,
        args.caption_column,
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        seed=seed,
    )
    if args.cache_latents:
        with tqdm(total=len(image_dataset), desc="Caching", disable=not accelerator.is_local_main_process) as bar:
            train_dataset = build_latent_cache(
                image_dataset, vae, prompt_encoder, args.sigma_data, args.train_batch_size, device, bar.update
            )
        prompt_encoder = text_encoder = base.text_encoder = None
        vae.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        train_dataset = image_dataset
    sampler = LayoutInvariantBatchSampler(
        len(train_dataset),
        args.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        args.gradient_accumulation_steps,
        seed=seed,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=sampler,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
    )

    def to_batch(batch) -> DistillationBatch:
        if args.cache_latents:
            latents = batch["latents"].to(device)
            embeds, mask = batch["prompt_embeds"].to(device), batch["prompt_attention_mask"].to(device)
        else:
            latents = encode_images(vae, batch["pixel_values"].to(device), args.sigma_data)
            embeds, mask = prompt_encoder(batch["caption"], device)
        embeds, mask, null, null_m = trim_prompt_padding(embeds, mask, null_embeds, null_mask)
        return DistillationBatch(latents, embeds, mask, null, null_m)

    # ---- Trained models ---------------------------------------------------------------------------------------------
    teacher.requires_grad_(False).eval()
    discriminator = None
    if distill:
        if args.lora_rank is not None:
            student = build_lora_student(
                teacher, args.lora_rank, args.lora_alpha, args.lora_target_modules, logvar_head=args.adaptive_weight
            )
        else:
            student = build_student(
                teacher,
                guidance_embeds_scale=args.guidance_embeds_scale,
                logvar_head=args.adaptive_weight,
                guidance_embeds=args.guidance_embeds,
                generator=make_generator(seed, "student_init"),
            )
        if not student.config.guidance_embeds and len(args.guidance_scales) > 1:
            logger.warning(
                "The student has no guidance embedder (LoRA or --no-guidance_embeds): it learns the average of the "
                f"--guidance_scales {args.guidance_scales}; pass a single scale to distil one."
            )
        config = DistillationConfig(
            scm=SCMLossConfig(
                sigma_data=args.sigma_data,
                p_mean=args.p_mean,
                p_std=args.p_std,
                tangent_warmup_steps=args.tangent_warmup_steps,
                tangent_norm=args.tangent_norm,
                tangent_norm_eps=args.tangent_norm_eps,
                guidance_scales=tuple(args.guidance_scales),
                adaptive_weight=args.adaptive_weight,
                detach_logvar_embedding=args.detach_logvar_embedding,
                reuse_jvp_primal=args.reuse_jvp_primal,
            ),
            scm_lambda=args.scm_lambda,
            adversarial_lambda=args.adversarial_lambda,
            adversarial_loss=args.adversarial_loss,
            discriminator_p_mean=args.discriminator_p_mean,
            discriminator_p_std=args.discriminator_p_std,
            max_time_probability=args.max_time_probability,
            misaligned_pairs=args.misaligned_pairs,
            share_discriminator_timesteps=args.share_discriminator_timesteps,
            r1_gamma=args.r1_gamma,
        )
        if config.uses_discriminator:
            discriminator = SanaDiscriminator(
                teacher,
                head_block_ids=args.head_block_ids,
                head_channels=args.head_channels,
                kernel_size=args.head_kernel_size,
                virtual_batch_size=args.head_virtual_batch_size,
            ).to(device)
        model = student
    else:
        calibration = None
        if args.calibrate_qk_norm:
            first = to_batch(collate_examples([train_dataset[(0, i)] for i in range(args.train_batch_size)]))
            calibration = teacher_calibration_inputs(
                teacher.to(device),
                first.latents,
                first.prompt_embeds,
                first.prompt_attention_mask,
                args.sigma_data,
                generator=make_generator(seed, "calibration", device=device),
            )
        model = prepare_sprint_teacher(
            teacher.to(device),
            qk_norm=None if args.teacher_qk_norm == "none" else args.teacher_qk_norm,
            dense_time=args.dense_time,
            dense_time_init=args.dense_time_init,
            calibration_inputs=calibration,
        )
        use_sana_pipeline_time_convention(model)  # SanaPipeline samples the saved teacher correctly
        model.requires_grad_(True)
        teacher = None  # the flow model is not needed any more
    model.to(device).train()  # trained weights stay fp32 (master weights); autocast runs the math
    if teacher is not None:
        teacher.to(device)
        if weight_dtype != torch.float32:
            teacher.to(dtype=weight_dtype)  # frozen: the autocast precision is enough
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
        if discriminator is not None:
            teacher.enable_gradient_checkpointing()  # the G phase back-propagates through the teacher's blocks
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_parameters = list(discriminator.parameters()) if discriminator is not None else []
    broadcast_parameters([m for m in (model, discriminator) if m is not None])  # same start on every process

    # ---- Optimisation -----------------------------------------------------------------------------------------------
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    lr_factor = global_batch if args.scale_lr else 1
    learning_rate = args.learning_rate * lr_factor
    optimizer = make_optimizer(args, trainable, learning_rate)
    schedule = dict(
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, **schedule)
    optimizer_d = lr_scheduler_d = None
    if discriminator is not None:
        d_lr = (args.discriminator_learning_rate or args.learning_rate) * lr_factor
        optimizer_d = make_optimizer(args, head_parameters, d_lr)
        lr_scheduler_d = get_scheduler(args.lr_scheduler, optimizer_d, **schedule)
        optimizer, optimizer_d = accelerator.prepare(optimizer, optimizer_d)  # GradScaler handling, checkpointing
    else:
        optimizer = accelerator.prepare(optimizer)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        ema.to(device)
    state = DistillationState()
    progress = {"global_step": 0}
    # Schedulers, EMA and counters go through accelerate's custom-object checkpointing (order matters on resume).
    for obj in (lr_scheduler, lr_scheduler_d, ema, state):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    lora = distill and args.lora_rank is not None

    # ---- Checkpoint hooks: trained weights only; the frozen teacher is never saved (diffusers #12444) ---------------
    def save_model_hook(models, weights, output_dir):
        # `models` holds accelerate-prepared models: none here (see the module docstring), so nothing to pop.
        if not accelerator.is_main_process:
            return
        if lora:
            folder = os.path.join(output_dir, "transformer_lora")
            os.makedirs(folder, exist_ok=True)
            save_file(
                {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad},
                os.path.join(folder, "trainable_parameters.safetensors"),
            )
            SanaSprintPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(model))
        else:
            model.save_pretrained(os.path.join(output_dir, "transformer"))
        if discriminator is not None:
            folder = os.path.join(output_dir, "discriminator_heads")
            os.makedirs(folder, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in discriminator.state_dict().items()},
                os.path.join(folder, "heads.safetensors"),
            )
            with open(os.path.join(folder, "config.json"), "w") as file:
                json.dump({"head_block_ids": list(discriminator.head_block_ids)}, file)
        with open(os.path.join(output_dir, TRAINING_STATE), "w") as file:
            json.dump({"global_step": progress["global_step"], "seed": seed, "stage": args.stage}, file)

    def load_model_hook(models, input_dir):
        if lora:
            saved = load_file(os.path.join(input_dir, "transformer_lora", "trainable_parameters.safetensors"))
            expected = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(saved) != expected:
                raise ValueError(f"Checkpoint {input_dir} does not hold this run's LoRA parameters.")
            model.load_state_dict(saved, strict=False)
        else:
            loaded = SanaSprintTransformer2DModel.from_pretrained(input_dir, subfolder="transformer")
            model.load_state_dict(loaded.state_dict())
            del loaded
        if discriminator is not None:
            discriminator.load_state_dict(
                load_file(os.path.join(input_dir, "discriminator_heads", "heads.safetensors"))
            )
        with open(os.path.join(input_dir, TRAINING_STATE)) as file:
            saved_state = json.load(file)
        if saved_state["stage"] != args.stage:
            raise ValueError(f"Checkpoint {input_dir} is from --stage {saved_state['stage']}, not {args.stage}.")
        progress["global_step"] = saved_state["global_step"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        if ema is not None:
            ema.to(device)
    global_step = progress["global_step"]

    log_path = os.path.join(args.output_dir, TRAINING_LOG)
    if accelerator.is_main_process:
        kept = []
        if resume_path is not None and os.path.exists(log_path):
            with open(log_path) as file:
                kept = [line for line in file if json.loads(line)["step"] <= global_step]
        with open(log_path, "w") as file:
            file.writelines(kept)
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    steps_per_epoch = sampler.steps_per_epoch
    logger.info("***** Running training *****")
    logger.info(f"  Stage = {args.stage}{' (LoRA)' if lora else ''}")
    logger.info(f"  Num examples = {len(train_dataset)}, steps per epoch = {steps_per_epoch}")
    logger.info(f"  Batch per process = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}")
    logger.info(f"  Global batch = {global_batch}, processes = {accelerator.num_processes}, seed = {seed}")
    logger.info(f"  Total iterations = {args.max_train_steps}, starting at {global_step}")

    # ---- One update over the micro-batches of a step ----------------------------------------------------------------
    def accumulated_update(compute, num_micro, optimizer, parameters):
        """`optimizer_update` (zero -> backward -> clip -> NaN check -> step) with the backward accumulating every
        micro-batch (loss / num_micro) and averaging the gradients across processes."""
        logs, outputs = [], {}

        def forward(index):
            with accelerator.autocast():
                return compute(index)

        def backward(_):
            for index in range(num_micro):
                out = outputs.pop("first") if index == 0 else forward(index)
                accelerator.backward(out.loss / num_micro)
                logs.append(out.logs)
            all_reduce_gradients(parameters)

        def clip(params, max_norm):
            accelerator.unscale_gradients(optimizer=optimizer)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        outputs["first"] = forward(0)
        outcome = optimizer_update(
            outputs["first"].loss, optimizer, parameters, args.max_grad_norm, backward=backward, clip_grad_norm=clip
        )
        if outcome.skipped and accelerator.scaler is not None:
            accelerator.scaler.update()  # lower the fp16 loss scale; step() did not run
        merged = {key: sum(float(log[key]) for log in logs) / len(logs) for key in logs[0]}
        return outcome, merged

    def train_step(step: int, batches: list[DistillationBatch]) -> dict:
        num_micro = len(batches)
        indices = [
            global_micro_batch_index(m, accelerator.process_index, accelerator.num_processes) for m in range(num_micro)
        ]
        logs = {}
        if distill:

            def generator_loss(i):
                generator = make_generator(seed, "generator", step, indices[i], device=device)
                return generator_step(student, teacher, discriminator, batches[i], state, config, generator=generator)

            if discriminator is not None:
                discriminator.eval()  # the heads' spectral-norm power iteration advances on D updates only
            outcome, g_logs = accumulated_update(generator_loss, num_micro, optimizer, trainable)
            state.record("generator", outcome)
            logs.update(g_logs, generator_grad_norm=outcome.grad_norm, generator_skipped=float(outcome.skipped))
            if discriminator is not None:

                def discriminator_loss(i):
                    generator = make_generator(seed, "discriminator", step, indices[i], device=device)
                    return discriminator_step(student, discriminator, batches[i], config, generator=generator)

                discriminator.train()
                outcome_d, d_logs = accumulated_update(discriminator_loss, num_micro, optimizer_d, head_parameters)
                state.record("discriminator", outcome_d)
                logs.update(
                    d_logs, discriminator_grad_norm=outcome_d.grad_norm, discriminator_skipped=float(outcome_d.skipped)
                )
                lr_scheduler_d.step()
                logs["discriminator_lr"] = lr_scheduler_d.get_last_lr()[0]
        else:

            def finetune_loss(i):
                generator = make_generator(seed, "teacher_finetune", step, indices[i], device=device)
                batch = batches[i]
                embeds, mask, dropped = drop_captions(
                    batch.prompt_embeds,
                    batch.prompt_attention_mask,
                    batch.null_prompt_embeds,
                    batch.null_prompt_attention_mask,
                    args.caption_dropout_prob,
                    generator,
                )
                size = batch.latents.shape[0]
                t = sample_finetune_time(
                    size, args.finetune_logit_mean, args.finetune_logit_std, device=device, generator=generator
                )
                z = torch.randn(batch.latents.shape, generator=generator, device=device) * args.sigma_data
                loss = teacher_finetune_loss(
                    model,
                    batch.latents,
                    z,
                    t,
                    embeds,
                    mask,
                    sigma_data=args.sigma_data,
                    weighting=args.finetune_weighting,
                )
                return SimpleNamespace(
                    loss=loss, logs={"finetune_loss": loss.detach(), "dropped": dropped.float().mean()}
                )

            outcome, f_logs = accumulated_update(finetune_loss, num_micro, optimizer, trainable)
            state.record("generator", outcome)
            logs.update(f_logs, grad_norm=outcome.grad_norm, skipped=float(outcome.skipped))
        if ema is not None and not outcome.skipped:
            ema.step(trainable)
        lr_scheduler.step()
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        return logs

    # ---- Validation -------------------------------------------------------------------------------------------------
    def run_validation(step: int, vae_for_decoding, final: bool = False):
        if ema is not None and not final:
            ema.store(trainable)
            ema.copy_to(trainable)
        vae_device = vae_for_decoding.device
        vae_for_decoding.to(device)
        model.eval()
        embeds, mask = validation_embeds
        common = dict(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            height=args.resolution,
            width=args.resolution,
            use_resolution_binning=False,
            output_type="pil",
        )
        if distill:
            pipeline = SanaSprintPipeline(
                tokenizer=None,
                text_encoder=None,
                vae=vae_for_decoding,
                transformer=model,
                scheduler=TrigFlowScheduler(sigma_data=args.sigma_data),
            )
            common["guidance_scale"] = args.validation_guidance_scale if model.config.guidance_embeds else None
        else:
            pipeline = SanaPipeline(
                tokenizer=None, text_encoder=None, vae=vae_for_decoding, transformer=model, scheduler=teacher_scheduler
            )
            common.update(
                negative_prompt=None,
                guidance_scale=args.validation_guidance_scale,
                negative_prompt_embeds=null_embeds.expand(embeds.shape[0], -1, -1),
                negative_prompt_attention_mask=null_mask.expand(embeds.shape[0], -1),
            )
        pipeline.set_progress_bar_config(disable=True)
        columns = []
        autocast = nullcontext() if final else accelerator.autocast()
        with autocast:
            for num_steps in args.validation_inference_steps:
                generator = torch.Generator(device=device).manual_seed(seed)
                columns.append(pipeline(num_inference_steps=num_steps, generator=generator, **common).images)
        images = [column[row] for row in range(embeds.shape[0]) for column in columns]  # rows: prompts
        grid = make_image_grid(images, rows=embeds.shape[0], cols=len(columns))
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step_{step:06d}.png"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images("validation", array, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log(
                    {
                        "validation": [
                            wandb.Image(
                                image,
                                caption=f"{args.validation_prompts[i // len(columns)]} "
                                f"({args.validation_inference_steps[i % len(columns)]} steps)",
                            )
                            for i, image in enumerate(images)
                        ]
                    },
                    step=step,
                )
        model.train()
        vae_for_decoding.to(vae_device)
        if ema is not None and not final:
            ema.restore(trainable)
        del pipeline
        return grid

    # ---- Loop -------------------------------------------------------------------------------------------------------
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    epoch = global_step // steps_per_epoch
    sampler.set_epoch(epoch, global_step % steps_per_epoch)
    data_iterator = iter(train_dataloader)
    while global_step < args.max_train_steps:
        micro_batches = []
        for _ in range(args.gradient_accumulation_steps):
            batch = next(data_iterator, None)
            if batch is None:  # epochs end on step boundaries
                epoch += 1
                sampler.set_epoch(epoch)
                data_iterator = iter(train_dataloader)
                batch = next(data_iterator)
            micro_batches.append(to_batch(batch))

        logs = train_step(global_step, micro_batches)
        global_step += 1
        progress["global_step"] = global_step
        logs.update(generator_steps=state.generator_steps, discriminator_steps=state.discriminator_steps, epoch=epoch)
        keys = sorted(logs)
        values = torch.tensor([float(logs[key]) for key in keys], dtype=torch.float64, device=device)
        logs = dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))  # mean over processes
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:
            with open(log_path, "a") as file:
                file.write(json.dumps({"step": global_step, **logs}) + "\n")
        shown = "generator_loss" if distill else "finetune_loss"
        progress_bar.set_postfix(loss=logs[shown], lr=logs["lr"])
        progress_bar.update(1)

        if global_step % args.checkpointing_steps == 0:
            if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
            accelerator.wait_for_everyone()
            save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
            accelerator.save_state(save_path)
            logger.info(f"Saved state to {save_path}")
        if args.validation_prompts and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process:
                run_validation(global_step, vae)

    # ---- Save -------------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trainable)
        model.eval()
        fresh = SanaPipeline.from_pretrained(
            args.pretrained_teacher_model_name_or_path, transformer=None, **hub_kwargs
        )
        if lora:
            SanaSprintPipeline.save_lora_weights(args.output_dir, transformer_lora_layers=lora_state_dict(model))
        elif distill:
            SanaSprintPipeline(
                tokenizer=fresh.tokenizer,
                text_encoder=fresh.text_encoder,
                vae=fresh.vae,
                transformer=model,
                scheduler=TrigFlowScheduler(sigma_data=args.sigma_data),
            ).save_pretrained(args.output_dir)
        else:
            SanaPipeline(
                tokenizer=fresh.tokenizer,
                text_encoder=fresh.text_encoder,
                vae=fresh.vae,
                transformer=model,
                scheduler=teacher_scheduler,
            ).save_pretrained(args.output_dir)
        logger.info(f"Saved the {'LoRA weights' if lora else 'pipeline'} to {args.output_dir}")
        has_grid = False
        if args.validation_prompts:
            grid = run_validation(global_step, fresh.vae, final=True)
            grid.save(os.path.join(args.output_dir, "validation_grid.png"))
            has_grid = True
        if args.push_to_hub:
            save_model_card(
                args, repo_id, args.stage, global_step, global_batch, accelerator.mixed_precision, has_grid
            )
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=HUB_IGNORE_PATTERNS,
                token=args.hub_token,
            )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
