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

import argparse
import os

import torch
import training_common as common  # examples/training_common.py, beside this script
from accelerate.logging import get_logger
from diffusers import SanaPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_sprint.models import TrigFlowModel
from diffusers_sprint.training import SkipMonitor, prepare_sprint_teacher
from diffusers_sprint.training.data import collate_examples
from diffusers_sprint.training.seeding import global_micro_batch_index, make_generator
from diffusers_sprint.training.sharding import shard_trigflow_model
from diffusers_sprint.training.teacher import (
    teacher_calibration_inputs,
    teacher_finetune_step,
    use_sana_pipeline_time_convention,
)


logger = get_logger(__name__, log_level="INFO")


def build_parser() -> argparse.ArgumentParser:
    return common.build_parser(
        "SANA-Sprint teacher preparation (QK-norm + dense time + TrigFlow fine-tune) with accelerate.",
        teacher_help="The flow-matching Sana pipeline to prepare (diffusers format, Hub id or local folder).",
        add_script_arguments=add_teacher_arguments,
        default_learning_rate=2e-5,
    )


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher preparation")
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


def parse_args(input_args=None) -> argparse.Namespace:
    args = common.parse_args(build_parser(), input_args, stage="prepare_teacher", validation_inference_steps=[20])
    if args.validation_prompts and args.resolution % 32:
        raise ValueError("Validating the teacher uses diffusers' SanaPipeline, which needs --resolution % 32 == 0.")
    return common.check_args(args)


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
    return common.run_validation(args, accelerator, pipeline, seed, step, autocast, **kwargs)


def main(args):
    run = common.start_run(args, logger)
    accelerator, sharded, seed, device = run.accelerator, run.sharded, run.seed, run.accelerator.device

    flow_teacher = common.load_teacher_transformer(args).to(device)
    loaded = common.load_frozen_and_data(args, run, flow_teacher.config.patch_size, logger)
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
    optimizer = common.make_optimizer(
        args, trainable, args.learning_rate * common.learning_rate_scale(args, accelerator.num_processes)
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
    ema_state = common.EMACounters(ema) if sharded and ema is not None else ema  # sharded: shadows go to DCP
    for obj in (lr_scheduler, ema_state, skip_monitor):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    def sharded_objects():
        return {"teacher": model}, {"optimizer": (model, optimizer)}, common.ema_shards(ema)

    def save_weights(output_dir):
        teacher.save_pretrained(os.path.join(output_dir, "transformer"))

    def load_weights(input_dir):
        path = os.path.join(input_dir, "transformer", "diffusion_pytorch_model.safetensors")
        teacher.load_state_dict(common.load_checkpoint_file(path))

    global_step, log = common.start_training(
        args, run, save_weights, load_weights, sharded_objects, ema, progress, logger
    )
    logger.info("***** Running teacher preparation *****")
    logger.info(f"  {data.describe()}, global batch = {run.global_batch}, seed = {seed}")
    logger.info(f"  Total iterations = {args.max_train_steps}, starting at {global_step}")

    def validate(transformer, step, autocast):
        log_validation(args, accelerator, transformer, base, validation_embeds, null_prompt, seed, step, autocast)

    progress_bar = common.steps_progress_bar(args, accelerator, global_step)
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
                    skipped, grad_norm = common.clip_and_step(accelerator, optimizer, trainable, args.max_grad_norm)
        common.after_update(
            skip_monitor, "finetune", skipped, global_step + 1, grad_norm, lr_scheduler, ema, trainable
        )
        global_step += 1
        progress["global_step"] = global_step
        logs = common.mean_logs(step_logs)
        logs.update(grad_norm=grad_norm, skipped=float(skipped), lr=lr_scheduler.get_last_lr()[0], epoch=epoch)
        common.end_iteration(args, accelerator, log, progress_bar, global_step, logs, "finetune_loss", logger)
        common.validate_at_step(args, accelerator, model, sharded, ema, trainable, global_step, validate)

    transformer = common.trained_transformer(accelerator, model, sharded, ema, trainable, skip_monitor, logger)
    if accelerator.is_main_process:
        fresh = common.load_pipeline_without_transformer(args)
        pipeline = SanaPipeline(
            tokenizer=fresh.tokenizer,
            text_encoder=fresh.text_encoder,
            vae=fresh.vae,
            transformer=transformer,
            scheduler=fresh.scheduler,
        )
        common.write_output_folder(args.output_dir, pipeline.save_pretrained)
        logger.info(f"Saved the Sprint teacher pipeline to {args.output_dir}")
        grid = None
        if args.validation_prompts:
            fresh.vae.to(device)
            grid = log_validation(
                args, accelerator, transformer, fresh, validation_embeds, null_prompt, seed, global_step, False
            )
        common.publish_output(args, run, accelerator, global_step, grid)
    common.end_run(accelerator)


if __name__ == "__main__":
    main(parse_args())
