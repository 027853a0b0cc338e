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

import os

import torch
from accelerate.logging import get_logger
from diffusers import SanaControlNetModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel
from diffusers_sprint.models import TrigFlowModel, set_fp32_linear_attention, unwrap_model, unwrap_trigflow_controlnet
from diffusers_sprint.training import (
    DistillationState,
    SanaDiscriminator,
    SkipMonitor,
    build_student,
    discriminator_step,
    generator_step,
)
from diffusers_sprint.training.checkpointing import EMACounters, TrainedWeights
from diffusers_sprint.training.components import load_frozen_and_data, load_teacher_transformer, load_text_and_vae
from diffusers_sprint.training.controlnet import (
    apply_controlnet_training_mode,
    check_controlnet_matches,
    init_student_controlnet,
)
from diffusers_sprint.training.ladd import default_head_block_ids
from diffusers_sprint.training.lora import build_lora_student, lora_state_dict
from diffusers_sprint.training.monitoring import loss_gradient_norms
from diffusers_sprint.training.publish import (
    publish_output,
    run_validation,
    save_sprint_pipeline,
    sprint_pipeline,
    trained_transformer,
    validate_at_step,
    write_output_folder,
)
from diffusers_sprint.training.recipe import DISTILLATION, controlnet_training, distillation_config, parse_recipe
from diffusers_sprint.training.run import (
    clip_and_update,
    compiled_graph_count,
    end_iteration,
    end_run,
    learning_rate_scale,
    make_optimizer,
    mean_logs,
    start_run,
    start_training,
    steps_progress_bar,
    training_compile_kwargs,
)
from diffusers_sprint.training.seeding import global_micro_batch_index, make_generator
from diffusers_sprint.training.sharding import shard_discriminator_heads, shard_trigflow_model


logger = get_logger(__name__, log_level="INFO")


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_controlnet(path: str, args):
    """A `SanaControlNetModel` from a model folder / Hub id, or from the `controlnet/` subfolder of a pipeline."""
    subfolder = "controlnet" if os.path.isfile(os.path.join(path, "controlnet", "config.json")) else None
    return SanaControlNetModel.from_pretrained(path, subfolder=subfolder, cache_dir=args.cache_dir)


def make_controlnets(args, teacher, student):
    """The frozen teacher ControlNet and the student's (checked against their transformers), or `(None, None)`."""
    if not controlnet_training(args):
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
    pipeline = sprint_pipeline(args, transformer, vae)
    embeds, mask = validation_embeds
    kwargs = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        guidance_scale=args.validation_guidance_scale if transformer.config.guidance_embeds else None,
    )
    return run_validation(args, accelerator, pipeline, seed, step, autocast, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def main(args):
    run = start_run(args, logger)
    accelerator, sharded, seed, weight_dtype = run.accelerator, run.sharded, run.seed, run.weight_dtype
    device = accelerator.device

    # ---- Frozen components, data, the teacher -----------------------------------------------------------------------
    teacher = load_teacher_transformer(args)
    loaded = load_frozen_and_data(args, run, teacher.config.patch_size, logger)
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
    compile_kwargs = training_compile_kwargs(accelerator, sharded, logger)  # None: eager
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
    lr_factor = learning_rate_scale(args, accelerator.num_processes)
    optimizer = make_optimizer(args, trainable, args.learning_rate * lr_factor)
    optimizer_d = None
    if discriminator is not None:
        d_lr = (args.discriminator_learning_rate or args.learning_rate) * lr_factor
        optimizer_d = make_optimizer(args, head_parameters, d_lr)
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
    ema_state = EMACounters(ema) if sharded and ema is not None else ema  # sharded: shadows go to DCP
    for obj in (lr_scheduler, lr_scheduler_d, ema_state, state, skip_monitor):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)
    lora = args.lora_rank is not None
    # Checkpoints: the trained weights in our formats (the frozen teacher is never saved, diffusers #12444).
    weights = TrainedWeights(student, ema=ema, lora=lora, controlnet=student_controlnet, discriminator=discriminator)
    weights.sharded_models["student"], weights.optimizers["optimizer"] = student_model, (student_model, optimizer)
    if discriminator is not None:
        weights.sharded_models["discriminator_heads"] = discriminator
        weights.optimizers["optimizer_d"] = (discriminator, optimizer_d)
    global_step, log = start_training(args, run, weights, progress, logger)
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
        # unwrap_model also strips torch.compile: a compiled wrapper's forward would still call DDP's.
        head_module = unwrap_model(discriminator_trained)
        if compile_kwargs is not None:
            head_module = torch.compile(head_module, **compile_kwargs)
    progress_bar = steps_progress_bar(args, accelerator, global_step)
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
                    skipped, grad_norm = clip_and_update(
                        accelerator, skip_monitor, "generator", global_step + 1, optimizer, trainable,
                        args.max_grad_norm, lr_scheduler, ema,
                    )  # fmt: skip
        state.record("generator", skipped)
        logs = mean_logs(g_logs)
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
                        skipped_d, norm_d = clip_and_update(
                            accelerator, skip_monitor, "discriminator", global_step + 1, optimizer_d,
                            head_parameters, args.max_grad_norm, lr_scheduler_d,
                        )  # fmt: skip
            state.record("discriminator", skipped_d)
            logs.update(mean_logs(d_logs))
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
        end_iteration(args, accelerator, log, progress_bar, global_step, logs, "generator_loss", logger)
        validate_at_step(args, accelerator, student_model, sharded, ema, trainable, global_step, validate)

    if compile_kwargs is not None:
        logger.info(f"torch.compile: {compiled_graph_count()} graphs compiled in this process")

    # ---- Save: the pipeline (or LoRA weights), a validation grid, the model card, the Hub ---------------------------
    transformer = trained_transformer(accelerator, student_model, sharded, ema, trainable, skip_monitor, logger)
    if accelerator.is_main_process:
        fresh = load_text_and_vae(args, device, torch.float32)  # each part loaded at its first use
        if lora:
            write_output_folder(
                args.output_dir,
                lambda folder: SanaSprintPipeline.save_lora_weights(
                    folder, transformer_lora_layers=lora_state_dict(transformer)
                ),
            )
        else:
            controlnet = unwrap_trigflow_controlnet(student_model)
            if controlnet is not None:
                controlnet.eval()
            write_output_folder(
                args.output_dir, lambda folder: save_sprint_pipeline(args, transformer, folder, controlnet)
            )
        logger.info(f"Saved the {'LoRA weights' if lora else 'pipeline'} to {args.output_dir}")
        grid = None
        if args.validation_prompts:
            grid = log_validation(
                args, accelerator, transformer, fresh.vae, validation_embeds, seed, global_step, False
            )
        publish_output(args, run, accelerator, global_step, grid)
    end_run(accelerator)


if __name__ == "__main__":
    main(parse_recipe(DISTILLATION))
