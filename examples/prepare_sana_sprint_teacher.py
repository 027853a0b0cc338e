#!/usr/bin/env python
# Copyright 2026 The diffusers-sprint authors. Licensed under the Apache License, Version 2.0.
"""Prepare a SANA-Sprint teacher with 🤗 accelerate: a flow-matching Sana -> QK-norm + dense time, fine-tuned briefly.

    accelerate launch examples/prepare_sana_sprint_teacher.py \
        --pretrained_teacher_model_name_or_path <Sana pipeline dir or Hub id> \
        --dataset_name <datasets id or save_to_disk dir> --resolution 1024 --output_dir sana-sprint-teacher

Writes a diffusers `SanaPipeline` folder (stock `SanaPipeline` samples it) to pass to `train_sana_sprint.py`. The
engine is the same as there (accelerate prepare / accumulate / save_state, `--fsdp` for FSDP2); the math is
`diffusers_sprint.training.teacher`.
"""

import torch
from accelerate.logging import get_logger
from diffusers import SanaPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_sprint.models import TrigFlowModel
from diffusers_sprint.training import SkipMonitor, prepare_sprint_teacher
from diffusers_sprint.training.checkpointing import EMACounters, TrainedWeights
from diffusers_sprint.training.components import (
    load_frozen_and_data,
    load_pipeline_without_transformer,
    load_teacher_transformer,
)
from diffusers_sprint.training.data import collate_examples
from diffusers_sprint.training.publish import (
    publish_output,
    run_validation,
    trained_transformer,
    validate_at_step,
    write_output_folder,
)
from diffusers_sprint.training.recipe import TEACHER_PREPARATION, parse_recipe
from diffusers_sprint.training.run import (
    clip_and_update,
    end_iteration,
    end_run,
    learning_rate_scale,
    make_optimizer,
    mean_logs,
    start_run,
    start_training,
    steps_progress_bar,
)
from diffusers_sprint.training.seeding import global_micro_batch_index, make_generator
from diffusers_sprint.training.sharding import shard_trigflow_model
from diffusers_sprint.training.teacher import (
    teacher_calibration_inputs,
    teacher_finetune_step,
    use_sana_pipeline_time_convention,
)


logger = get_logger(__name__, log_level="INFO")


@torch.no_grad()
def log_validation(args, accelerator, transformer, base, validation_embeds, null_prompt, seed, step, autocast):
    """Validation images of the teacher through diffusers' own `SanaPipeline` (CFG against the empty prompt)."""
    pipeline = SanaPipeline(
        tokenizer=None, text_encoder=None, vae=base.vae, transformer=transformer, scheduler=base.scheduler
    )
    embeds, mask = validation_embeds
    null_embeds, null_mask = null_prompt
    kwargs = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt=None,
        negative_prompt_embeds=null_embeds.expand(embeds.shape[0], -1, -1),
        negative_prompt_attention_mask=null_mask.expand(embeds.shape[0], -1),
        guidance_scale=args.validation_guidance_scale,
    )
    return run_validation(args, accelerator, pipeline, seed, step, autocast, **kwargs)


def main(args):
    run = start_run(args, logger)
    accelerator, sharded, seed, device = run.accelerator, run.sharded, run.seed, run.accelerator.device

    flow_teacher = load_teacher_transformer(args).to(device)
    loaded = load_frozen_and_data(args, run, flow_teacher.config.patch_size, logger)
    if loaded is None:  # --precompute_only
        return
    base, validation_embeds, data = loaded
    null_prompt = (data.null_embeds, data.null_mask)

    # ---- The Sprint teacher: QK-norm + dense time, then fine-tuned ----------------------------------------------
    calibration = None
    if args.calibrate_qk_norm:
        first = data.batch(collate_examples([data.dataset[(0, i)] for i in range(args.train_batch_size)]))
        calibration = teacher_calibration_inputs(
            flow_teacher,
            first.latents,
            first.prompt_embeds,
            first.prompt_attention_mask,
            args.sigma_data,
            generator=make_generator(seed, "calibration", device=device),
        )
    teacher = prepare_sprint_teacher(
        flow_teacher,
        qk_norm=None if args.teacher_qk_norm == "none" else args.teacher_qk_norm,
        dense_time=args.dense_time,
        dense_time_init=args.dense_time_init,
        calibration_inputs=calibration,
    )
    del flow_teacher
    use_sana_pipeline_time_convention(teacher)  # SanaPipeline samples the saved teacher correctly
    teacher.requires_grad_(True).to(device).train()
    if args.gradient_checkpointing:
        teacher.enable_gradient_checkpointing()
    model = TrigFlowModel(teacher)
    if sharded:
        shard_trigflow_model(model, torch.bfloat16 if accelerator.mixed_precision == "bf16" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        args, trainable, args.learning_rate * learning_rate_scale(args, accelerator.num_processes)
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None
    if ema is not None:
        ema.to(device)
    skip_monitor = SkipMonitor(args.max_consecutive_skips, warn=logger.warning)
    progress = {"global_step": 0, "skipped": 0}
    ema_state = EMACounters(ema) if sharded and ema is not None else ema  # sharded: shadows go to DCP
    for obj in (lr_scheduler, ema_state, skip_monitor):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    weights = TrainedWeights(teacher, {"teacher": model}, {"optimizer": (model, optimizer)}, ema)
    global_step, log = start_training(args, run, weights, progress, logger)
    logger.info("***** Running teacher preparation *****")
    logger.info(f"  {data.describe()}, global batch = {run.global_batch}, seed = {seed}")
    logger.info(f"  Total iterations = {args.max_train_steps}, starting at {global_step}")

    def validate(transformer, step, autocast):
        log_validation(args, accelerator, transformer, base, validation_embeds, null_prompt, seed, step, autocast)

    progress_bar = steps_progress_bar(args, accelerator, global_step)
    for epoch, micro_batches in data.steps(global_step):
        if global_step >= args.max_train_steps:
            break
        step_logs = []
        for m, batch in enumerate(micro_batches):
            index = global_micro_batch_index(m, accelerator.process_index, accelerator.num_processes)
            with accelerator.accumulate(model):
                generator = make_generator(seed, "teacher_finetune", global_step, index, device=device)
                with accelerator.autocast():
                    loss, logs = teacher_finetune_step(
                        model,
                        batch,
                        generator,
                        sigma_data=args.sigma_data,
                        caption_dropout_prob=args.caption_dropout_prob,
                        logit_mean=args.finetune_logit_mean,
                        logit_std=args.finetune_logit_std,
                        weighting=args.finetune_weighting,
                    )
                accelerator.backward(loss)
                step_logs.append(logs)
                if accelerator.sync_gradients:
                    skipped, grad_norm = clip_and_update(
                        accelerator, skip_monitor, "finetune", global_step + 1, optimizer, trainable,
                        args.max_grad_norm, lr_scheduler, ema,
                    )  # fmt: skip
        global_step += 1
        progress["global_step"] = global_step
        logs = mean_logs(step_logs)
        logs.update(grad_norm=grad_norm, skipped=float(skipped), lr=lr_scheduler.get_last_lr()[0], epoch=epoch)
        end_iteration(args, accelerator, log, progress_bar, global_step, logs, "finetune_loss", logger)
        validate_at_step(args, accelerator, model, sharded, ema, trainable, global_step, validate)

    transformer = trained_transformer(accelerator, model, sharded, ema, trainable, skip_monitor, logger)
    if accelerator.is_main_process:
        fresh = load_pipeline_without_transformer(args)
        pipeline = SanaPipeline(
            tokenizer=fresh.tokenizer,
            text_encoder=fresh.text_encoder,
            vae=fresh.vae,
            transformer=transformer,
            scheduler=fresh.scheduler,
        )
        write_output_folder(args.output_dir, pipeline.save_pretrained)
        logger.info(f"Saved the Sprint teacher pipeline to {args.output_dir}")
        grid = None
        if args.validation_prompts:
            fresh.vae.to(device)
            grid = log_validation(
                args, accelerator, transformer, fresh, validation_embeds, null_prompt, seed, global_step, False
            )
        publish_output(args, run, accelerator, global_step, grid)
    end_run(accelerator)


if __name__ == "__main__":
    main(parse_recipe(TEACHER_PREPARATION))
