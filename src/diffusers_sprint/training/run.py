"""The life of a training run around the math: accelerator set-up, resume point and seed, optimiser, updates, logs.

Both example scripts call these in diffusers-example order (`start_run` first); nothing here is SANA-Sprint math.
"""

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, ProjectConfiguration, broadcast_object_list, set_seed
from huggingface_hub import create_repo
from tqdm.auto import tqdm

from .checkpointing import (
    TRAINING_STATE,
    TrainedWeights,
    read_training_state,
    register_checkpoint_hooks,
    resume,
    save_state,
)
from .checkpoints import (
    check_checkpoint_layout,
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
)
from .fingerprint import compare_fingerprints, read_fingerprint, run_fingerprint
from .sharding import ensure_process_group


TRAINING_LOG = "training_log.jsonl"


def tracker_config(args) -> dict:
    """Tracker hyper-parameters: scalars as they are, anything else as a string (tensorboard takes scalars only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


@dataclass
class Run:
    accelerator: Accelerator
    sharded: bool  # FSDP2 through training.sharding (--fsdp or an accelerate FSDP2 config, any process count)
    resume_path: str | None
    seed: int
    repo_id: str | None
    weight_dtype: torch.dtype  # of the frozen models: the autocast precision
    fingerprint: dict
    global_batch: int  # samples per update: --train_batch_size x accumulation x processes


def start_run(args, logger) -> Run:
    """Everything both scripts do before loading models, in diffusers-example order."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        step_scheduler_with_optimizer=False,  # the lr schedules advance on applied (not skipped) updates only
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM) or (
        accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2
    ):
        raise ValueError(
            f"{accelerator.distributed_type} (FSDP1 / DeepSpeed / Megatron) is not supported: use DDP "
            "(examples/accelerate_configs/ddp.yaml) or FSDP2 (fsdp2.yaml, or --fsdp); see docs/training.md."
        )
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
    fingerprint = run_fingerprint(args, accelerator.num_processes)
    sharded = args.fsdp or accelerator.is_fsdp2  # the checkpoint layout, whatever the number of processes
    if sharded:
        ensure_process_group(accelerator.device)  # accelerate starts none for one process

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        removed = remove_incomplete_checkpoints(args.output_dir)
        if removed:
            logger.warning(f"Removed the unfinished checkpoint saves {removed} of a killed run.")
    accelerator.wait_for_everyone()
    resume_path = find_resume_checkpoint(args)
    if args.resume_from_checkpoint is not None and resume_path is None:
        logger.info(f"No complete checkpoint in {args.output_dir}; starting a new run.")
    if resume_path is not None:
        saved = read_fingerprint(resume_path)
        if saved is None:
            logger.warning(f"{resume_path} has no run fingerprint (an older checkpoint): its recipe is not checked.")
        elif differences := compare_fingerprints(saved, fingerprint):
            raise ValueError(
                f"Checkpoint {resume_path} belongs to a run with other settings:\n  " + "\n  ".join(differences)
            )
        check_checkpoint_layout(resume_path, sharded)
    elif list_checkpoints(args.output_dir):
        logger.warning(
            f"{args.output_dir} already holds checkpoints of another run; this new run will write its own, and "
            "--resume_from_checkpoint latest will refuse those whose settings differ."
        )
    seed = resolve_seed(args, resume_path, logger)
    set_seed(seed)
    repo_id = None
    if accelerator.is_main_process and args.push_to_hub:
        repo_id = create_repo(
            repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
        ).repo_id
    return Run(
        accelerator=accelerator,
        sharded=sharded,
        resume_path=resume_path,
        seed=seed,
        repo_id=repo_id,
        weight_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32),
        fingerprint=fingerprint,
        global_batch=args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
    )


def training_compile_kwargs(accelerator, sharded: bool, logger) -> dict | None:
    """accelerate's `--dynamo_backend` settings (`accelerate launch` or its config file) as `torch.compile` keyword
    arguments, or `None` when the run stays eager.

    `prepare` compiles the modules it is given (the student, the discriminator) with them; the script applies them to
    what `prepare` never sees (the frozen teacher's blocks, the G phase's view of the heads). With `--fsdp` nothing is
    prepared (the script shards with `fully_shard`), so the run stays eager and a warning says so."""
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return None
    if sharded:
        logger.warning("--dynamo_backend is ignored with --fsdp: the sharded modules are not compiled.")
        return None
    kwargs = plugin.to_kwargs()
    logger.info(f"torch.compile {kwargs}: the student and the discriminator (prepare), the teacher's blocks")
    return kwargs


def compiled_graph_count() -> int:
    """Graphs TorchDynamo has compiled in this process so far (0 without `--dynamo_backend`)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def find_resume_checkpoint(args) -> str | None:
    """The folder `--resume_from_checkpoint` names, or the latest complete checkpoint for "latest" (or None)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        if not os.path.isfile(os.path.join(args.resume_from_checkpoint, TRAINING_STATE)):
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a complete checkpoint folder "
                f"(no {TRAINING_STATE})."
            )
        return args.resume_from_checkpoint
    return latest_checkpoint(args.output_dir)


def resolve_seed(args, resume_path: str | None, logger) -> int:
    """`--seed`, drawn when unset; a resumed run keeps its checkpoint's seed. The same on every process."""
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if resume_path is not None:
        saved = read_training_state(resume_path)
        if args.seed is not None and saved["seed"] != args.seed:
            logger.warning(f"--seed {args.seed} ignored: resuming the run of seed {saved['seed']}.")
        seed = saved["seed"]
    return broadcast_object_list([seed])[0]


class TrainingLog:
    """`training_log.jsonl` of the main process: one JSON object per step; a resumed run cuts it back first."""

    def __init__(self, output_dir: str, resume_step: int | None, is_main_process: bool):
        self.path = os.path.join(output_dir, TRAINING_LOG)
        self.enabled = is_main_process
        if not self.enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as file:
                kept = [line for line in file if json.loads(line)["step"] <= resume_step]
        with open(self.path, "w") as file:
            file.writelines(kept)

    def write(self, step: int, logs: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, **logs}) + "\n")


def mean_logs(logs: list[dict]) -> dict:
    """The mean of each key over the micro-batches of a step (keys of the first micro-batch)."""
    return {key: sum(float(log[key]) for log in logs) / len(logs) for key in logs[0]}


def reduce_logs(accelerator, logs: dict) -> dict:
    """The mean of each value over processes (every process must call it, with the same keys)."""
    keys = sorted(logs)
    values = torch.tensor([float(logs[key]) for key in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))


def make_optimizer(args, parameters, learning_rate):
    if args.optimizer in ("adamw", "adamw8bit"):
        if args.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            adamw = bnb.optim.AdamW8bit
        else:
            adamw = torch.optim.AdamW
        return adamw(
            parameters,
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
    from came_pytorch import CAME

    return CAME(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2, args.came_beta3),
        weight_decay=args.adam_weight_decay,
        eps=(1e-30, 1e-16),
    )


def learning_rate_scale(args, num_processes: int) -> int:
    """`--scale_lr`: the global batch (batch x accumulation x processes); else 1."""
    return args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else 1


def steps_progress_bar(args, accelerator, global_step: int) -> tqdm:
    """The bar over `--max_train_steps` iterations (on each node's main process), starting at `global_step`."""
    return tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )


def end_iteration(args, accelerator, log: TrainingLog, progress_bar, step: int, logs: dict, loss: str, logger) -> None:
    """After iteration `step`: `logs` averaged over the processes go to the trackers, `training_log.jsonl` and the
    progress bar (`logs[loss]` and the lr); a checkpoint is saved every `--checkpointing_steps`."""
    logs = reduce_logs(accelerator, logs)
    accelerator.log(logs, step=step)
    log.write(step, logs)
    progress_bar.set_postfix(loss=logs[loss], lr=logs["lr"])
    progress_bar.update(1)
    if step % args.checkpointing_steps == 0:
        save_state(args, accelerator, step, logger)


def end_run(accelerator) -> None:
    """Every process waits for the main one's save (one leaving early tears the process group down under it)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def start_training(args, run: Run, weights: TrainedWeights, progress: dict, logger):
    """
    Registers the checkpoint hooks (`checkpointing.register_checkpoint_hooks`), resumes from `run.resume_path` (if
    any) through them and opens the training log (cut back to the resumed step) and the trackers. Returns
    `(global_step, log)`; `progress["global_step"]` is what checkpoints record.
    """
    accelerator = run.accelerator
    register_checkpoint_hooks(accelerator, run.sharded, weights, progress, run.seed, args.stage, run.fingerprint)
    resume(accelerator, run.resume_path, weights.ema, logger)
    global_step = progress["global_step"]
    log = TrainingLog(args.output_dir, global_step if run.resume_path else None, accelerator.is_main_process)
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    return global_step, log


def clip_and_update(
    accelerator, skip_monitor, phase: str, step: int, optimizer, parameters, max_grad_norm, lr_scheduler, ema=None
) -> tuple[bool, float]:
    """
    At a sync step of `phase`: unscale (fp16) and clip the gradients of `parameters` to `max_grad_norm`, then one
    `SkipMonitor.update` (the update, the lr schedule and the EMA unless the norm is NaN/Inf; the skip counters).
    Returns `(skipped, grad_norm)`; every process sees the same all-reduced norm, so they all decide alike.
    """
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    ema_parameters = parameters if ema is not None else None
    return skip_monitor.update(
        phase, step, optimizer, grad_norm, lr_scheduler, ema, ema_parameters, scaler=accelerator.scaler
    )
