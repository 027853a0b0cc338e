#!/usr/bin/env python
# Copyright 2026 The diffusers-sprint authors. Licensed under the Apache License, Version 2.0.
"""SANA-Sprint one-step distillation (sCM + LADD) with 🤗 accelerate, full or LoRA.

    accelerate launch examples/train_sana_sprint.py \
        --pretrained_teacher_model_name_or_path <Sprint teacher pipeline dir or Hub id> \
        --dataset_name <datasets id or save_to_disk dir> --resolution 1024 --output_dir sana-sprint

The teacher is best prepared first by `examples/prepare_sana_sprint_teacher.py` (QK-norm + dense time). The output
is a `SanaSprintPipeline` folder (or LoRA weights with `--lora_rank`).

The engine is accelerate's and PyTorch's: the student is called through a `TrigFlowModel` whose `forward` is the
TrigFlow velocity, so `accelerator.prepare` (DDP) or `fully_shard` (`--fsdp`, FSDP2 of student, teacher and heads)
see every call, `accelerator.accumulate` / `backward` / `clip_grad_norm_` run the updates, and `save_state` /
`load_state` the checkpoints (written atomically). All math comes from `diffusers_sprint.training`.
"""

import argparse
import os

import torch
import training_common as common  # examples/training_common.py, beside this script
from accelerate.logging import get_logger
from diffusers import SanaControlNetModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel
from diffusers_sprint.models import TrigFlowModel, set_fp32_linear_attention, unwrap_trigflow_controlnet
from diffusers_sprint.training import (
    DistillationConfig,
    DistillationState,
    SanaDiscriminator,
    SCMLossConfig,
    SkipMonitor,
    build_student,
    discriminator_step,
    generator_step,
)
from diffusers_sprint.training.controlnet import (
    CONTROLNET_TRAINING_MODES,
    DEFAULT_CONTROLNET_TRAINING_MODE,
    apply_controlnet_training_mode,
    check_controlnet_matches,
    init_student_controlnet,
)
from diffusers_sprint.training.ladd import HEAD_BLOCK_LAYOUTS, default_head_block_ids
from diffusers_sprint.training.lora import DEFAULT_LORA_TARGET_MODULES, build_lora_student, lora_state_dict
from diffusers_sprint.training.monitoring import loss_gradient_norms
from diffusers_sprint.training.scm import NULL_BRANCH_MASKS
from diffusers_sprint.training.seeding import global_micro_batch_index, make_generator
from diffusers_sprint.training.sharding import shard_discriminator_heads, shard_trigflow_model


logger = get_logger(__name__, log_level="INFO")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    return common.build_parser(
        "SANA-Sprint distillation (sCM + LADD) with accelerate. Flags may come from a recipe file: "
        "@examples/configs/<recipe>.args (later flags win).",
        teacher_help="Teacher: a diffusers-format Sana pipeline (Hub id or local folder): a Sprint teacher written by "
        "prepare_sana_sprint_teacher.py (recommended) or any flow-matching Sana pipeline.",
        add_script_arguments=add_distillation_arguments,
        default_learning_rate=2e-6,
        parser_class=common.RecipeArgumentParser,
    )


def add_distillation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sCM (generator phase); defaults are the official recipe")
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
        "--jvp",
        type=str,
        default="exact",
        choices=("exact", "finite_difference"),
        help="The sCM tangent: torch.func.jvp (exact; attention on the math SDPA kernel) or a finite difference of "
        "fp32 no-grad forwards along the teacher's ODE (fused kernels and torch.compile work; needs fp32 master "
        "weights, not --fsdp with bf16; docs/performance.md).",
    )
    group.add_argument(
        "--jvp_step",
        type=float,
        default=3e-5,
        help="Finite-difference step in radians of TrigFlow time (--jvp finite_difference only).",
    )
    group.add_argument(
        "--compile_jvp",
        action="store_true",
        help="Run the exact JVP under torch.compile (Inductor): the same tangent up to float rounding at ~0.4x the "
        "eager cost on CPU; the first step compiles (minutes). --jvp exact only; docs/performance.md.",
    )
    group.add_argument("--scm_lambda", type=float, default=1.0, help="Weight of the sCM loss (0: LADD only).")
    group.add_argument(
        "--cfg_null_mask",
        type=str,
        default="conditional",
        choices=NULL_BRANCH_MASKS,
        help="Attention mask of the teacher's unconditional (CFG) branch: 'conditional' (official) runs the empty "
        "prompt under the caption's mask, as Sana's caption dropout trained it; 'null' uses the empty prompt's own "
        "mask (diffusers' convention; right for teachers fine-tuned by prepare_sana_sprint_teacher.py).",
    )
    group.add_argument(
        "--teacher_cfg_without_guidance_embeds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="A student without guidance embedder (LoRA, --no-guidance_embeds) distils the CFG teacher at "
        "--guidance_scales (measured better on the toy: docs/training.md). --no-teacher_cfg_without_guidance_embeds: "
        "the plain conditional teacher, as the official loop does. A student with the embedder always distils the "
        "CFG teacher.",
    )
    group.add_argument(
        "--fp32_linear_attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run the student's linear self-attention product in fp32 with autocast off (official fp32_attention). "
        "--no-fp32_linear_attention: diffusers' processor, whose matmuls autocast runs in bf16.",
    )
    group.add_argument(
        "--teacher_fp32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep the frozen teacher (also the discriminator's backbone) in fp32, computed under autocast "
        "(official). --no-teacher_fp32: cast it to the --mixed_precision dtype (half its memory).",
    )
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
        help="Teacher blocks feeding discriminator heads; validated against the teacher depth. Default: "
        "--head_block_layout.",
    )
    group.add_argument(
        "--head_block_layout",
        type=str,
        default="official",
        choices=HEAD_BLOCK_LAYOUTS,
        help="Head blocks when --head_block_ids is not given: 'official' = 2 8 14 19 for teachers of 20 blocks or "
        "more (the official 1.6B and 0.6B configs alike); 'spread' = the same fractions of the depth (28 blocks: 3 "
        "11 20 27). Shallower teachers get the spread either way.",
    )
    group.add_argument(
        "--head_channels", type=int, default=None, help="Width of each head (default: the teacher's inner dim)."
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
        "--discriminator_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the discriminator heads (default: --learning_rate).",
    )
    group.add_argument(
        "--discriminator_lr_schedule",
        type=str,
        default="constant",
        choices=("constant", "generator"),
        help="'constant' (official): the heads' learning rate is constant from step 0 (no warm-up); 'generator': "
        "the heads follow --lr_scheduler / --lr_warmup_steps like the generator.",
    )
    group.add_argument(
        "--discriminator_shared_norm_groups",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Judge real and fake rows in one discriminator call, interleaved, so that every local batch-norm group "
        "of the heads holds both. Off (official): separate calls; then each group's statistics divide out what tells "
        "real from fake, and on small latents (the toy's 16 tokens) the discriminator stays at chance "
        "(docs/results.md).",
    )
    group.add_argument(
        "--log_gradient_norms_every",
        type=int,
        default=0,
        help="Every N iterations log the gradient norms of the weighted sCM and adversarial losses on the student "
        "(scm_grad_norm, adversarial_grad_norm in training_log.jsonl; an extra backward per part). 0: off.",
    )
    group.add_argument(
        "--fake_from_scm_forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="The generator's LADD fake reuses the sCM term's t, noise and forward (only rows moved to pi/2 run the "
        "student again). --no-fake_from_scm_forward: fresh t and noise and a full-batch forward (official; always "
        "used under --fsdp, where every rank must run the same forwards).",
    )
    group = parser.add_argument_group("LoRA")
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
    group = parser.add_argument_group("ControlNet distillation (docs/controlnet.md)")
    group.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Distil a ControlNet: the teacher's diffusers SanaControlNetModel (a model folder or Hub id, or a "
        "pipeline with a controlnet/ subfolder). The control images (--conditioning_image_column) condition the "
        "teacher, the student and the discriminator; the output is a SanaSprintControlNetPipeline folder.",
    )
    group.add_argument(
        "--student_controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Initial weights of the student's ControlNet (default: a copy of the teacher's, its time embedding "
        "remapped when the student reads another time scale).",
    )
    group.add_argument(
        "--pretrained_student_model_name_or_path",
        type=str,
        default=None,
        help="Start from this Sprint student (a SanaSprintPipeline folder or Hub id with a transformer/ subfolder) "
        "instead of building one from the teacher; needed by --controlnet_training_mode controlnet_only.",
    )
    group.add_argument(
        "--conditioning_image_column",
        type=str,
        default="conditioning_image",
        help="Column of the control images (cropped and flipped with their image, encoded by the VAE).",
    )
    group.add_argument(
        "--controlnet_training_mode",
        type=str,
        default=DEFAULT_CONTROLNET_TRAINING_MODE,
        choices=CONTROLNET_TRAINING_MODES,
        help="controlnet_only: the student transformer is frozen, only its ControlNet trains (distil a ControlNet "
        "onto an existing Sprint student; the default, see docs/controlnet.md). joint: student and ControlNet train "
        "together.",
    )
    group.add_argument(
        "--controlnet_conditioning_scale",
        type=float,
        default=1.0,
        help="Scale of the ControlNet residuals, for teacher and student alike.",
    )


def parse_args(input_args=None) -> argparse.Namespace:
    args = common.parse_args(build_parser(), input_args, stage="distill", validation_inference_steps=[1, 2])
    if args.fsdp and args.lora_rank is not None:
        raise ValueError("--fsdp with --lora_rank is not supported: LoRA trains a small adapter; use DDP.")
    check_controlnet_args(args)
    return common.check_args(args)


def check_controlnet_args(args) -> None:
    if not common.controlnet_training(args):
        given = [flag for flag in ("student_controlnet_model_name_or_path",) if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"--{given[0]} needs --controlnet_model_name_or_path (the teacher's ControlNet).")
        return
    unsupported = [
        flag
        for flag in ("fsdp", "lora_rank", "streaming", "train_shards", "feature_cache_dir", "multi_scale")
        if getattr(args, flag, None)
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


# ---------------------------------------------------------------------------------------------------------------------
# Models and recipe
# ---------------------------------------------------------------------------------------------------------------------


def distillation_config(args, sharded: bool, student_has_guidance_embedder: bool = True) -> DistillationConfig:
    """The library recipe from the flags. A student without guidance embedder distils the CFG teacher unless
    --no-teacher_cfg_without_guidance_embeds (the official loop's choice: the plain conditional teacher)."""
    return DistillationConfig(
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
            jvp=args.jvp,
            finite_difference_step=args.jvp_step,
            compile_jvp=args.compile_jvp,
            guide_teacher=student_has_guidance_embedder or args.teacher_cfg_without_guidance_embeds,
            null_branch_mask=args.cfg_null_mask,
        ),
        scm_lambda=args.scm_lambda,
        adversarial_lambda=args.adversarial_lambda,
        adversarial_loss=args.adversarial_loss,
        discriminator_p_mean=args.discriminator_p_mean,
        discriminator_p_std=args.discriminator_p_std,
        max_time_probability=args.max_time_probability,
        misaligned_pairs=args.misaligned_pairs,
        share_discriminator_timesteps=args.share_discriminator_timesteps,
        discriminator_shared_norm_groups=args.discriminator_shared_norm_groups,
        r1_gamma=args.r1_gamma,
        fake_from_scm_forward=args.fake_from_scm_forward and not sharded,
    )


def load_controlnet(path: str, args):
    """A `SanaControlNetModel` from a model folder / Hub id, or from the `controlnet/` subfolder of a pipeline."""
    subfolder = "controlnet" if os.path.isfile(os.path.join(path, "controlnet", "config.json")) else None
    return SanaControlNetModel.from_pretrained(path, subfolder=subfolder, cache_dir=args.cache_dir)


def make_controlnets(args, teacher, student):
    """The frozen teacher ControlNet and the student's (checked against their transformers), or `(None, None)`."""
    if not common.controlnet_training(args):
        return None, None
    teacher_controlnet = load_controlnet(args.controlnet_model_name_or_path, args)
    check_controlnet_matches(teacher_controlnet, teacher, "--controlnet_model_name_or_path")
    teacher_controlnet.requires_grad_(False).eval()
    if args.student_controlnet_model_name_or_path is not None:
        student_controlnet = load_controlnet(args.student_controlnet_model_name_or_path, args)
        check_controlnet_matches(student_controlnet, student, "--student_controlnet_model_name_or_path")
    else:
        student_controlnet = init_student_controlnet(teacher_controlnet, teacher, student)
    apply_controlnet_training_mode(student, student_controlnet, args.controlnet_training_mode)
    return teacher_controlnet, student_controlnet.train()


def make_student(args, teacher, seed: int):
    # The logvar head only trains through the sCM term: without it, DDP would wait for its gradient forever.
    logvar_head = args.adaptive_weight and args.scm_lambda > 0
    if args.pretrained_student_model_name_or_path is not None:
        student = SanaSprintTransformer2DModel.from_pretrained(
            args.pretrained_student_model_name_or_path,
            subfolder="transformer",
            revision=args.revision,
            cache_dir=args.cache_dir,
            logvar_head=logvar_head,
        )
    elif args.lora_rank is not None:
        student = build_lora_student(
            teacher, args.lora_rank, args.lora_alpha, args.lora_target_modules, logvar_head=logvar_head
        )
    else:
        student = build_student(
            teacher,
            guidance_embeds_scale=args.guidance_embeds_scale,
            logvar_head=logvar_head,
            guidance_embeds=args.guidance_embeds,
            generator=make_generator(seed, "student_init"),
        )
    if args.fp32_linear_attention:
        set_fp32_linear_attention(student)
    if not student.config.guidance_embeds and not args.teacher_cfg_without_guidance_embeds:
        logger.info(
            "The student has no guidance embedder (LoRA or --no-guidance_embeds) and "
            "--no-teacher_cfg_without_guidance_embeds: it distils the conditional teacher without CFG (official)."
        )
    elif not student.config.guidance_embeds and len(args.guidance_scales) > 1:
        logger.warning(
            "The student has no guidance embedder (LoRA or --no-guidance_embeds): it learns the average of the "
            f"--guidance_scales {args.guidance_scales}; pass a single scale to distil one."
        )
    return student


def frozen_teacher_model(args, teacher, teacher_controlnet, device, weight_dtype: torch.dtype) -> TrigFlowModel:
    """The frozen teacher (sCM target and discriminator backbone) with its ControlNet, if any: fp32 weights computed
    under autocast (official, --teacher_fp32), or cast to the autocast dtype `weight_dtype` (--no-teacher_fp32, half
    the memory)."""
    dtype = torch.float32 if args.teacher_fp32 else weight_dtype
    if teacher_controlnet is not None:
        teacher_controlnet.to(device, dtype=dtype)
    return TrigFlowModel(teacher.to(device, dtype=dtype), teacher_controlnet, args.controlnet_conditioning_scale)


def head_block_ids(args, teacher) -> list[int]:
    """--head_block_ids, else the --head_block_layout default for the teacher's depth."""
    if args.head_block_ids is not None:
        return list(args.head_block_ids)
    return default_head_block_ids(len(teacher.transformer_blocks), args.head_block_layout)


def make_lr_schedulers(args, optimizer, optimizer_d):
    """The generator's diffusers schedule; the discriminator's is constant from step 0 (official) or the same
    schedule (--discriminator_lr_schedule generator)."""
    schedule = dict(
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, **schedule)
    if optimizer_d is None:
        return lr_scheduler, None
    if args.discriminator_lr_schedule == "constant":
        return lr_scheduler, get_scheduler("constant", optimizer_d)
    return lr_scheduler, get_scheduler(args.lr_scheduler, optimizer_d, **schedule)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def log_validation(args, accelerator, transformer, vae, validation_embeds, seed: int, step: int, autocast: bool):
    """Validation images through the real `SanaSprintPipeline`: rows are prompts, columns the sampling steps."""
    pipeline = common.sprint_pipeline(args, transformer, vae)
    embeds, mask = validation_embeds
    kwargs = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        guidance_scale=args.validation_guidance_scale if transformer.config.guidance_embeds else None,
    )
    return common.run_validation(args, accelerator, pipeline, seed, step, autocast, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def main(args):
    run = common.start_run(args, logger)
    accelerator, sharded, seed, weight_dtype = run.accelerator, run.sharded, run.seed, run.weight_dtype
    device = accelerator.device

    # ---- Frozen components, data, the teacher -----------------------------------------------------------------------
    teacher = common.load_teacher_transformer(args)
    loaded = common.load_frozen_and_data(args, run, teacher.config.patch_size, logger)
    if loaded is None:  # --precompute_only
        return
    base, validation_embeds, data = loaded

    # ---- Student, teacher, discriminator ----------------------------------------------------------------------------
    teacher.requires_grad_(False).eval()
    student = make_student(args, teacher, seed)
    teacher_controlnet, student_controlnet = make_controlnets(args, teacher, student)
    config = distillation_config(args, sharded, student.config.guidance_embeds)
    if sharded and args.log_gradient_norms_every:
        raise ValueError("--log_gradient_norms_every measures local gradients: not available with --fsdp.")
    scale = args.controlnet_conditioning_scale
    # fp32 master weights; autocast runs the math. The ControlNet (if any) is a submodule: prepared, EMA'd, saved.
    student_model = TrigFlowModel(student, student_controlnet, scale).to(device).train()
    teacher_model = frozen_teacher_model(args, teacher, teacher_controlnet, device, weight_dtype)
    compile_kwargs = common.training_compile_kwargs(accelerator, sharded, logger)  # None: eager
    if compile_kwargs is not None:  # never prepared: its blocks one by one, the discriminator's hooks stay outside
        teacher.compile_repeated_blocks(**compile_kwargs)
    discriminator = None
    if config.uses_discriminator:
        discriminator = SanaDiscriminator(
            teacher_model,
            head_block_ids=head_block_ids(args, teacher),
            head_channels=args.head_channels,
        ).to(device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        if discriminator is not None:
            teacher.enable_gradient_checkpointing()  # the G phase back-propagates through the teacher's blocks
    if sharded:
        param_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        if param_dtype is not None and config.scm.jvp == "finite_difference":
            raise ValueError(
                "--jvp finite_difference needs fp32 forwards, but --fsdp with bf16 mixed precision computes with bf16 "
                "parameters (rounding noise swamps the difference): use --jvp exact, or --mixed_precision no."
            )
        shard_trigflow_model(student_model, param_dtype)
        shard_trigflow_model(teacher_model)
        if discriminator is not None:
            shard_discriminator_heads(discriminator, param_dtype)
    trainable = [p for p in student_model.parameters() if p.requires_grad]
    head_parameters = list(discriminator.parameters()) if discriminator is not None else []

    # ---- Optimisation: DDP (and fp16 loss scaling) through accelerate.prepare; FSDP2 modules were sharded above -----
    lr_factor = common.learning_rate_scale(args, accelerator.num_processes)
    optimizer = common.make_optimizer(args, trainable, args.learning_rate * lr_factor)
    optimizer_d = None
    if discriminator is not None:
        d_lr = (args.discriminator_learning_rate or args.learning_rate) * lr_factor
        optimizer_d = common.make_optimizer(args, head_parameters, d_lr)
    lr_scheduler, lr_scheduler_d = make_lr_schedulers(args, optimizer, optimizer_d)
    discriminator_trained = discriminator  # what the D phase calls (the DDP wrapper under DDP)
    if not sharded:
        if discriminator is not None:
            student_model, discriminator_trained, optimizer, optimizer_d = accelerator.prepare(
                student_model, discriminator, optimizer, optimizer_d
            )
        else:
            student_model, optimizer = accelerator.prepare(student_model, optimizer)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        ema.to(device)
    state = DistillationState()
    skip_monitor = SkipMonitor(args.max_consecutive_skips, warn=logger.warning)
    progress = {"global_step": 0}
    # Schedulers, EMA, counters: accelerate's custom-object checkpointing (the registration order is the file order).
    ema_state = common.EMACounters(ema) if sharded and ema is not None else ema  # sharded: shadows go to DCP
    for obj in (lr_scheduler, lr_scheduler_d, ema_state, state, skip_monitor):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)
    lora = args.lora_rank is not None
    bare_student = student  # the transformer (PEFT model with LoRA); under FSDP2 its parameters are shards

    # ---- Checkpoints: trained weights in our formats; the frozen teacher is never saved (diffusers #12444) ---------
    def sharded_objects():
        models = {"student": student_model}
        optimizers = {"optimizer": (student_model, optimizer)}
        if discriminator is not None:
            models["discriminator_heads"] = discriminator
            optimizers["optimizer_d"] = (discriminator, optimizer_d)
        return models, optimizers, common.ema_shards(ema)

    def save_weights(output_dir):
        if lora:
            folder = os.path.join(output_dir, "transformer_lora")
            os.makedirs(folder, exist_ok=True)
            save_file(
                {n: p.detach().contiguous() for n, p in bare_student.named_parameters() if p.requires_grad},
                os.path.join(folder, "trainable_parameters.safetensors"),
            )
            SanaSprintPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(bare_student))
        else:
            bare_student.save_pretrained(os.path.join(output_dir, "transformer"))
        if student_controlnet is not None:
            student_controlnet.save_pretrained(os.path.join(output_dir, "controlnet"))
        if discriminator is not None:
            folder = os.path.join(output_dir, "discriminator_heads")
            os.makedirs(folder, exist_ok=True)
            heads = {k: v.contiguous() for k, v in discriminator.state_dict().items()}
            save_file(heads, os.path.join(folder, "heads.safetensors"))

    def load_weights(input_dir):
        if lora:
            path = os.path.join(input_dir, "transformer_lora", "trainable_parameters.safetensors")
            weights = common.load_checkpoint_file(path)
            expected = {n for n, p in bare_student.named_parameters() if p.requires_grad}
            if set(weights) != expected:
                raise ValueError(f"Checkpoint {input_dir} does not hold this run's LoRA parameters ({path}).")
            bare_student.load_state_dict(weights, strict=False)
        else:
            path = os.path.join(input_dir, "transformer", "diffusion_pytorch_model.safetensors")
            weights = common.load_checkpoint_file(path)
            bare_student.load_state_dict(weights)
        if student_controlnet is not None:
            path = os.path.join(input_dir, "controlnet", "diffusion_pytorch_model.safetensors")
            student_controlnet.load_state_dict(common.load_checkpoint_file(path))
        if discriminator is not None:
            path = os.path.join(input_dir, "discriminator_heads", "heads.safetensors")
            discriminator.load_state_dict(common.load_checkpoint_file(path))

    global_step, log = common.start_training(
        args, run, save_weights, load_weights, sharded_objects, ema, progress, logger
    )
    logger.info("***** Running distillation *****")
    engine = "FSDP2" if sharded else accelerator.distributed_type
    logger.info(f"  Student = {'LoRA' if lora else 'full'}, engine = {engine}")
    if student_controlnet is not None:
        logger.info(f"  ControlNet distillation, mode = {args.controlnet_training_mode}")
    logger.info(f"  {data.describe()}")
    logger.info(f"  Batch per process = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}")
    logger.info(f"  Global batch = {run.global_batch}, processes = {accelerator.num_processes}, seed = {seed}")
    logger.info(f"  Total iterations = {args.max_train_steps}, starting at {global_step}")

    # ---- Loop: per iteration one generator update, then one discriminator update ------------------------------------
    def validate(transformer, step, autocast):
        log_validation(args, accelerator, transformer, base.vae, validation_embeds, seed, step, autocast)

    head_module = None  # the discriminator of the G phase: never through DDP (the heads take no update there)
    if discriminator is not None:
        # Not `keep_torch_compile`: that returns the compiled wrapper, whose forward still calls DDP's.
        head_module = accelerator.unwrap_model(discriminator_trained, keep_torch_compile=False)
        if compile_kwargs is not None:
            head_module = torch.compile(head_module, **compile_kwargs)
    progress_bar = common.steps_progress_bar(args, accelerator, global_step)
    for epoch, micro_batches in data.steps(global_step):
        if global_step >= args.max_train_steps:
            break
        indices = [
            global_micro_batch_index(m, accelerator.process_index, accelerator.num_processes)
            for m in range(len(micro_batches))
        ]
        if head_module is not None:
            head_module.eval()  # the heads' spectral-norm power iteration advances on D updates only
        g_logs = []
        for batch, index in zip(micro_batches, indices):
            with accelerator.accumulate(student_model):
                generator = make_generator(seed, "generator", global_step, index, device=device)
                with accelerator.autocast():
                    out = generator_step(student_model, teacher_model, head_module, batch, state, config, generator)
                if args.log_gradient_norms_every and global_step % args.log_gradient_norms_every == 0:
                    parts = {  # the weighted parts of the generator loss, as the update sees them
                        "scm_grad_norm": (out.scm_loss, config.scm_lambda),
                        "adversarial_grad_norm": (out.adversarial_loss, config.adversarial_lambda),
                    }
                    parts = {k: loss * weight for k, (loss, weight) in parts.items() if loss is not None}
                    out.logs.update(loss_gradient_norms(parts, trainable))
                accelerator.backward(out.loss)
                g_logs.append(out.logs)
                if accelerator.sync_gradients:
                    skipped, grad_norm = common.clip_and_step(accelerator, optimizer, trainable, args.max_grad_norm)
        state.record("generator", skipped)
        common.after_update(
            skip_monitor, "generator", skipped, global_step + 1, grad_norm, lr_scheduler, ema, trainable
        )
        logs = common.mean_logs(g_logs)
        logs.update(generator_grad_norm=grad_norm, generator_skipped=float(skipped), lr=lr_scheduler.get_last_lr()[0])

        if discriminator is not None:
            head_module.train()
            d_logs = []
            for batch, index in zip(micro_batches, indices):
                with accelerator.accumulate(discriminator_trained):
                    generator = make_generator(seed, "discriminator", global_step, index, device=device)
                    with accelerator.autocast():
                        out = discriminator_step(student_model, discriminator_trained, batch, config, generator)
                    accelerator.backward(out.loss)
                    d_logs.append(out.logs)
                    if accelerator.sync_gradients:
                        skipped_d, norm_d = common.clip_and_step(
                            accelerator, optimizer_d, head_parameters, args.max_grad_norm
                        )
            state.record("discriminator", skipped_d)
            common.after_update(skip_monitor, "discriminator", skipped_d, global_step + 1, norm_d, lr_scheduler_d)
            logs.update(common.mean_logs(d_logs))
            logs.update(
                discriminator_grad_norm=norm_d,
                discriminator_skipped=float(skipped_d),
                discriminator_lr=lr_scheduler_d.get_last_lr()[0],
            )

        global_step += 1
        progress["global_step"] = global_step
        logs.update(generator_steps=state.generator_steps, discriminator_steps=state.discriminator_steps, epoch=epoch)
        if torch.cuda.is_available():
            logs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        common.end_iteration(args, accelerator, log, progress_bar, global_step, logs, "generator_loss", logger)
        common.validate_at_step(args, accelerator, student_model, sharded, ema, trainable, global_step, validate)

    if compile_kwargs is not None:
        logger.info(f"torch.compile: {common.compiled_graph_count()} graphs compiled in this process")

    # ---- Save: the pipeline (or LoRA weights), a validation grid, the model card, the Hub ---------------------------
    transformer = common.trained_transformer(accelerator, student_model, sharded, ema, trainable, skip_monitor, logger)
    if accelerator.is_main_process:
        fresh = common.load_text_and_vae(args, device, torch.float32)  # each part loaded at its first use
        if lora:
            common.write_output_folder(
                args.output_dir,
                lambda folder: SanaSprintPipeline.save_lora_weights(
                    folder, transformer_lora_layers=lora_state_dict(transformer)
                ),
            )
        else:
            controlnet = unwrap_trigflow_controlnet(student_model)
            if controlnet is not None:
                controlnet.eval()
            common.write_output_folder(
                args.output_dir, lambda folder: common.save_sprint_pipeline(args, transformer, folder, controlnet)
            )
        logger.info(f"Saved the {'LoRA weights' if lora else 'pipeline'} to {args.output_dir}")
        grid = None
        if args.validation_prompts:
            grid = log_validation(
                args, accelerator, transformer, fresh.vae, validation_embeds, seed, global_step, False
            )
        common.publish_output(args, run, accelerator, global_step, grid)
    common.end_run(accelerator)


if __name__ == "__main__":
    main(parse_args())
