"""Wiring shared by `train_sana_sprint.py` and `prepare_sana_sprint_teacher.py`: flags, data, optimisers, logs.

Nothing here is math (that lives in `diffusers_sprint.training`); it is the accelerate plumbing both example scripts
need in the same form: argument groups, the frozen text encoder / VAE and the data pipeline, the optimiser choice,
checkpoint saving and resuming through `accelerator.save_state` / `load_state` (atomically, see
`diffusers_sprint.training.checkpoints`), the JSON-lines training log, validation grids and the Hub upload.
"""

import argparse
import atexit
import importlib
import importlib.util
import json
import logging
import os
import random
import shlex
import shutil
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import DiffusionPipeline, SanaPipeline
from diffusers.utils import is_wandb_available, make_image_grid
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo, upload_folder
from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffusers_sprint import (
    SanaSprintControlNetPipeline,
    SanaSprintPipeline,
    SanaSprintTransformer2DModel,
    TrigFlowScheduler,
)
from diffusers_sprint.models import unwrap_transformer
from diffusers_sprint.pipelines.pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from diffusers_sprint.training.arguments import (
    compare_fingerprints,
    read_fingerprint,
    run_fingerprint,
    validate_training_args,
    write_fingerprint,
)
from diffusers_sprint.training.buckets import AspectRatioBucketBatchSampler, assign_buckets, image_size, training_bins
from diffusers_sprint.training.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
    save_checkpoint,
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
    undecoded_images,
    validate_image_dataset,
)
from diffusers_sprint.training.distill import DistillationBatch
from diffusers_sprint.training.feature_cache import (
    CachedLatentImageDataset,
    CachedPromptEncoder,
    FeatureCache,
    collate_cached_examples,
    fill_caches,
    model_digest,
    resolve_latents,
)
from diffusers_sprint.training.monitoring import check_finite_state_dict
from diffusers_sprint.training.sharding import full_model_state_dict, load_sharded_state, save_sharded_state
from diffusers_sprint.training.streaming import StreamingImageCaptionDataset, StreamPosition, load_streaming_dataset


OPTIMIZERS = ("adamw", "adamw8bit", "came")
TRAINING_LOG = "training_log.jsonl"
TRAINING_STATE = "training_state.json"
HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "step_*", "epoch_*", ".pipeline-*"]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


class RecipeArgumentParser(argparse.ArgumentParser):
    """`argparse` that also reads flags from `@file` arguments (the recipes of `examples/configs/`): each line is split
    like a shell command line (`--flag value` on one line, quotes kept), `#` starts a comment. Flags given after the
    file win."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fromfile_prefix_chars", "@")
        super().__init__(*args, **kwargs)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def build_parser(
    description: str,
    teacher_help: str,
    add_script_arguments,
    default_learning_rate: float,
    parser_class=argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """Both scripts' parser: the model and data groups, the script's own (`add_script_arguments(parser)`), then the
    optimisation and output groups."""
    parser = parser_class(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser, teacher_help)
    add_data_arguments(parser)
    add_script_arguments(parser)
    add_optimization_arguments(parser, default_learning_rate)
    add_output_arguments(parser)
    return parser


def parse_args(parser, input_args, stage: str, validation_inference_steps: list[int]) -> argparse.Namespace:
    """The flags, with `args.stage` (not a flag: it names the script's checkpoints and fingerprint) and the script's
    default `--validation_inference_steps`."""
    args = parser.parse_args(input_args)
    args.stage = stage
    if args.validation_inference_steps is None:
        args.validation_inference_steps = list(validation_inference_steps)
    return args


def add_model_arguments(parser: argparse.ArgumentParser, teacher_help: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_teacher_model_name_or_path",
        type=str,
        required=True,
        help=teacher_help,
    )
    group.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the teacher.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant of the teacher, e.g. `fp16`.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument("--sigma_data", type=float, default=0.5, help="TrigFlow data standard deviation.")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument(
        "--train_shards",
        type=str,
        nargs="+",
        default=None,
        help="Local WebDataset tar shards (paths or globs), streamed by `datasets`' webdataset loader; columns are "
        "the file extensions of a sample (e.g. --image_column jpg --caption_column txt). Implies --streaming.",
    )
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name (`load_dataset(..., streaming=True)`) instead of downloading it; the stream's "
        "position is checkpointed and --resume_from_checkpoint continues from it (docs/data.md).",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="Streaming: `datasets`' shuffle buffer (and shard-order shuffle), reseeded every epoch (0: stream "
        "order).",
    )
    group.add_argument(
        "--caption_fallback_columns",
        type=str,
        nargs="+",
        default=None,
        help="Streaming: columns tried in order when --caption_column is absent or null; a dotted name reads into a "
        "JSON column, e.g. json.caption.",
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
    group.add_argument(
        "--multi_scale",
        action="store_true",
        help="Aspect-ratio buckets: each image goes to the nearest of Sana's aspect-ratio bins of about "
        "--resolution^2 pixels (diffusers' ASPECT_RATIO_*_BIN), resized and cropped to it; every step draws all "
        "its samples (on every process) from one bin, bins in proportion to the data (docs/data.md).",
    )
    group.add_argument("--center_crop", action="store_true", help="Centre crop instead of a random crop.")
    group.add_argument("--random_flip", action="store_true", help="Flip images left-right with probability 0.5.")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode all images and captions once before training, then free the text encoder and move the VAE to "
        "the CPU (it only decodes validation images). Random crops are then fixed; flips are cached both ways.",
    )
    group.add_argument(
        "--feature_cache_dir",
        type=str,
        default=None,
        help="On-disk cache of VAE latents and text embeddings (safetensors shards, keyed by content hash, model, "
        "bin, --max_sequence_length and instruction), shared by runs and processes: missing entries are encoded and "
        "stored as training meets them; a run whose entries are all there never constructs the text encoder (nor "
        "the VAE, except to decode validation images). Needs --center_crop (docs/data.md).",
    )
    group.add_argument(
        "--precompute_only",
        action="store_true",
        help="Fill --feature_cache_dir (every latent, both flips with --random_flip, every caption, the empty and "
        "the validation prompts; each process a share of the rows) and exit without training.",
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
    group.add_argument(
        "--validate_data",
        action="store_true",
        help="Read every image and caption once before training and stop with a list of all unreadable rows.",
    )


def add_optimization_arguments(parser: argparse.ArgumentParser, default_learning_rate: float) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=4, help="Samples per micro-batch and process.")
    group.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches per process and update (accelerate's gradient accumulation).",
    )
    group.add_argument("--max_train_steps", type=int, default=20000, help="Training iterations (optimiser updates).")
    group.add_argument("--learning_rate", type=float, default=default_learning_rate, help="Learning rate.")
    group.add_argument(
        "--max_grad_norm",
        type=float,
        default=0.1,
        help="Gradient clipping (official 0.1; inf: no clipping). A NaN/Inf gradient norm skips the update.",
    )
    group.add_argument(
        "--max_consecutive_skips",
        type=int,
        default=20,
        help="Stop with an error after this many NaN/Inf updates in a row (a diverged run).",
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
    group.add_argument(
        "--fsdp",
        action="store_true",
        help="Shard the trained model, the frozen teacher (and the discriminator heads) with torch FSDP2 "
        "(`fully_shard` per transformer block) across the launched processes; also on CPU (gloo). Implied by an "
        "accelerate FSDP2 config (examples/accelerate_configs/fsdp2.yaml).",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--seed", type=int, default=None, help="Seed of everything random (default: drawn).")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
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


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Checks both scripts share; the flag ranges are `validate_training_args`'s."""
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
            if getattr(args, flag, None)
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
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token. "
            "Please use `hf auth login` to authenticate with the Hub."
        )
    if args.report_to in ("wandb", "all") and not is_wandb_available():
        raise ImportError("--report_to wandb needs `pip install wandb`.")
    for optimizer, module, package in (
        ("adamw8bit", "bitsandbytes", "bitsandbytes"),
        ("came", "came_pytorch", "came-pytorch"),
    ):
        if args.optimizer == optimizer and importlib.util.find_spec(module) is None:
            raise ImportError(f"--optimizer {optimizer} needs the `{package}` package: `pip install {package}`.")
    validate_training_args(args)
    return args


def tracker_config(args) -> dict:
    """Tracker hyper-parameters: scalars as they are, anything else as a string (tensorboard takes scalars only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Start of a run: accelerator, logging, resume point, seed, Hub repository
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    accelerator: Accelerator
    sharded: bool  # FSDP2 through training.sharding (--fsdp or an accelerate FSDP2 config, several processes)
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
        sharded=(args.fsdp or accelerator.is_fsdp2) and accelerator.num_processes > 1,
        resume_path=resume_path,
        seed=seed,
        repo_id=repo_id,
        weight_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32),
        fingerprint=fingerprint,
        global_batch=args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
    )


def load_teacher_transformer(args) -> SanaSprintTransformer2DModel:
    return SanaSprintTransformer2DModel.from_pretrained(
        args.pretrained_teacher_model_name_or_path,
        subfolder="transformer",
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )


def load_pipeline_without_transformer(args) -> SanaPipeline:
    """A fresh copy of the teacher pipeline's other components (for the output folder)."""
    return SanaPipeline.from_pretrained(
        args.pretrained_teacher_model_name_or_path,
        transformer=None,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
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


def gather_transformer(model, sharded: bool, is_main_process: bool):
    """The trained transformer, unsharded: itself, or under FSDP2 a full copy on the main process (None elsewhere)."""
    transformer = unwrap_transformer(model)  # through DDP
    if not sharded:
        return transformer
    state = full_model_state_dict(model)  # collective: every process calls it
    if not is_main_process:
        return None
    prefix = "transformer."
    copy = SanaSprintTransformer2DModel.from_config(transformer.config)
    copy.load_state_dict({key[len(prefix) :]: value for key, value in state.items()})
    return copy.to(transformer.device)


# ---------------------------------------------------------------------------------------------------------------------
# Seed, resume, log
# ---------------------------------------------------------------------------------------------------------------------


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


def read_training_state(checkpoint: str, stage: str | None = None) -> dict:
    """The checkpoint's `training_state.json`; with `stage`, refused when another `--stage` wrote it."""
    path = os.path.join(checkpoint, TRAINING_STATE)
    try:
        with open(path) as file:
            saved = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Checkpoint {checkpoint}: cannot read {path} ({error}).") from error
    if stage is not None and saved.get("stage") != stage:
        raise ValueError(f"Checkpoint {checkpoint} was written by --stage {saved.get('stage')}, not {stage}.")
    return saved


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


def write_training_state(output_dir: str, global_step: int, seed: int, stage: str) -> None:
    with open(os.path.join(output_dir, TRAINING_STATE), "w") as file:
        json.dump({"global_step": global_step, "seed": seed, "stage": stage}, file)


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, refused with the file's name when missing, damaged or not finite."""
    try:
        weights = load_file(path)
    except Exception as error:  # missing file, truncated header, bad metadata: say which file
        raise ValueError(f"Cannot read the checkpoint file {path}: {error}") from error
    check_finite_state_dict(weights, path)
    return weights


# ---------------------------------------------------------------------------------------------------------------------
# Frozen components and data
# ---------------------------------------------------------------------------------------------------------------------


class FrozenComponents:
    """
    The teacher pipeline's `tokenizer`, `text_encoder` (frozen, `weight_dtype`), `vae` (frozen, fp32) and
    `scheduler`, each constructed at its first use (from the classes `model_index.json` names, as `SanaPipeline`
    loads them): with complete feature caches (`--feature_cache_dir`) a run never constructs the text encoder, and
    the VAE only to decode validation images. `constructed` lists what was built, in order.
    """

    NAMES = ("tokenizer", "text_encoder", "vae", "scheduler")

    def __init__(self, args, device, weight_dtype):
        self._args, self._device, self.weight_dtype = args, device, weight_dtype
        self._root = self._index = None
        self.constructed = []

    @property
    def root(self) -> str:
        """The teacher pipeline's local folder: the given path, or the Hub snapshot (downloaded as `from_pretrained`
        downloads it)."""
        if self._root is None:
            args = self._args
            root = args.pretrained_teacher_model_name_or_path
            if not os.path.isdir(root):
                root = DiffusionPipeline.download(
                    root, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
                )
            self._root = root
        return self._root

    def model_index(self) -> dict:
        if self._index is None:
            self._index = DiffusionPipeline.load_config(self.root)
        return self._index

    def _class(self, name: str):
        library, class_name = self.model_index()[name]
        return getattr(importlib.import_module(library), class_name)

    def config(self, name: str) -> dict:
        """The config of component `name` (e.g. the VAE's), read without constructing it."""
        return self._class(name).load_config(self.root, subfolder=name)

    def identity(self, name: str) -> str:
        """What a cache keys component `name` by: a digest of its files (`model_digest`), never constructing it."""
        return model_digest(os.path.join(self.root, name))

    def __getattr__(self, name):
        if name not in FrozenComponents.NAMES:
            raise AttributeError(name)
        kwargs = dict(subfolder=name)
        if name in ("text_encoder", "vae") and self._args.variant is not None:
            kwargs["variant"] = self._args.variant
        value = self._class(name).from_pretrained(self.root, **kwargs)
        if name == "vae":
            value.requires_grad_(False).eval().to(self._device)  # DC-AE stays fp32
        elif name == "text_encoder":
            value.requires_grad_(False).eval().to(self._device, dtype=self.weight_dtype)
        self.constructed.append(name)
        setattr(self, name, value)
        return value


def load_text_and_vae(args, device, weight_dtype) -> FrozenComponents:
    """The teacher pipeline's tokenizer, text encoder, VAE and scheduler, each loaded at its first use."""
    return FrozenComponents(args, device, weight_dtype)


def make_prompt_encoder(args, base):
    """Sana's prompt encoding (`PromptEncoder`); with `--feature_cache_dir` behind the on-disk text cache."""
    instruction = DEFAULT_COMPLEX_HUMAN_INSTRUCTION if args.complex_human_instruction else None

    def build():
        return PromptEncoder(base.tokenizer, base.text_encoder, args.max_sequence_length, instruction)

    if not args.feature_cache_dir:
        return build()
    namespace = dict(
        tokenizer=base.identity("tokenizer"),
        text_encoder=base.identity("text_encoder"),
        max_sequence_length=args.max_sequence_length,
        instruction=json.dumps(instruction),
        dtype=str(base.weight_dtype),
    )
    cache = FeatureCache(args.feature_cache_dir, "text", namespace, writer=_writer_name())
    return CachedPromptEncoder(cache, build, args.max_sequence_length)


def load_frozen_and_data(args, run: Run, patch_size: int, logger):
    r"""
    The frozen text encoder and VAE (`FrozenComponents`), the validation prompts' embeddings (or `None`) and the
    [`TrainingData`] of a run, as `(base, validation_embeds, data)`. With `--precompute_only` the feature caches are
    filled instead and `None` is returned: the run is then over.
    """
    accelerator = run.accelerator
    base = load_text_and_vae(args, accelerator.device, run.weight_dtype)
    prompt_encoder = make_prompt_encoder(args, base)
    validation_embeds = (
        prompt_encoder(args.validation_prompts, accelerator.device) if args.validation_prompts else None
    )
    data = TrainingData(args, accelerator, base, prompt_encoder, run.seed, patch_size, logger)
    if args.precompute_only:
        data.precompute(accelerator, args.validation_prompts, logger)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return None
    return base, validation_embeds, data


def controlnet_training(args) -> bool:
    """Whether the run distils a ControlNet (`--controlnet_model_name_or_path` given)."""
    return getattr(args, "controlnet_model_name_or_path", None) is not None


def _writer_name() -> str:
    return f"{os.environ.get('RANK', '0')}-{os.getpid()}"


def sprint_pipeline(args, transformer, vae=None, controlnet=None):
    """A `SanaSprintPipeline` (`SanaSprintControlNetPipeline` with a `controlnet`) of `transformer`, `vae` and a
    TrigFlow scheduler, without tokenizer and text encoder (it takes prompt embeddings)."""
    components = dict(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=TrigFlowScheduler(sigma_data=args.sigma_data),
    )
    if controlnet is not None:
        return SanaSprintControlNetPipeline(controlnet=controlnet, **components)
    return SanaSprintPipeline(**components)


def save_sprint_pipeline(args, transformer, folder: str, controlnet=None) -> None:
    """
    A `SanaSprintPipeline` folder (a `SanaSprintControlNetPipeline` one with a `controlnet`, saved in its `controlnet/`
    subfolder): `transformer` and a TrigFlow scheduler saved, the teacher's tokenizer, text encoder and VAE folders
    copied file by file (so they are never constructed; `from_pretrained` loads the result as usual).
    """
    root = FrozenComponents(args, "cpu", torch.float32).root
    sprint_pipeline(args, transformer, controlnet=controlnet).save_pretrained(folder)
    with open(os.path.join(root, "model_index.json")) as file:
        teacher_index = json.load(file)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as file:
        index = json.load(file)
    for name in ("tokenizer", "text_encoder", "vae"):
        shutil.copytree(os.path.join(root, name), os.path.join(folder, name))
        index[name] = teacher_index[name]
    with open(index_path, "w") as file:
        json.dump(index, file, indent=2, sort_keys=True)


class TrainingData:
    """
    The dataset (optionally latent-cached, in memory or on disk), its layout-invariant sampler (one aspect-ratio
    bucket per step with `--multi_scale`) and loader, and `batch(examples)` that turns a collated batch into a
    [`DistillationBatch`] on the device.

    The loader is not `accelerator.prepare`d: [`LayoutInvariantBatchSampler`] (and
    [`AspectRatioBucketBatchSampler`]) already give each process its micro-batches, numbered so that 1 process x
    accumulation 4, 2 processes x 2 and 4 processes x 1 see the same samples, and a resumed run the same as an
    uninterrupted one (accelerate's sharding would split differently).
    """

    def __init__(self, args, accelerator, base, prompt_encoder, seed: int, patch_size: int, logger):
        vae_config = base.config("vae")
        vae_scale = 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)
        latent_scale = vae_scale * patch_size
        if args.resolution % latent_scale:
            raise ValueError(f"--resolution must be a multiple of {latent_scale} (VAE scale x patch size).")
        if args.multi_scale and args.cache_latents:
            raise ValueError(
                "--cache_latents keeps one image size in memory; with --multi_scale use --feature_cache_dir."
            )
        if args.feature_cache_dir and args.cache_latents:
            raise ValueError("Give one of --cache_latents (in memory) and --feature_cache_dir (on disk).")
        self.args, self.device, self.base = args, accelerator.device, base
        self.prompt_encoder = prompt_encoder
        self.null_embeds, self.null_mask = prompt_encoder.null(self.device)
        self.latent_cache = None
        self.streaming = args.streaming
        if self.streaming:
            self._init_streaming(args, accelerator, seed)
            return
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
        if args.validate_data:
            validate_image_dataset(hf_dataset, args.image_column, args.caption_column, raise_error=True)
            logger.info(f"--validate_data: all {len(hf_dataset)} rows read.")
        target_sizes = None
        if args.multi_scale:
            bins = training_bins(args.resolution, latent_scale)
            rows = undecoded_images(hf_dataset, args.image_column)  # headers only: nothing is decoded
            if hasattr(rows, "select_columns"):
                rows = rows.select_columns([args.image_column])
            target_sizes = assign_buckets([image_size(row[args.image_column]) for row in rows], bins)
            counts = Counter(target_sizes)
            logger.info(
                f"--multi_scale: {len(counts)} aspect-ratio buckets of {len(bins)} bins at {args.resolution} px: "
                + ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items()))
            )
        conditioning_column = args.conditioning_image_column if controlnet_training(args) else None
        if conditioning_column is not None and conditioning_column not in hf_dataset.column_names:
            raise ValueError(
                f"`--conditioning_image_column` {conditioning_column!r} is not a column of the dataset (ControlNet "
                f"distillation needs a control image per row); columns: {hf_dataset.column_names}."
            )
        self.images = ImageCaptionDataset(
            hf_dataset,
            args.image_column,
            args.caption_column,
            args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            seed=seed,
            target_sizes=target_sizes,
            conditioning_image_column=conditioning_column,
        )
        self.cached = args.cache_latents
        collate = collate_examples
        if args.feature_cache_dir:
            namespace = dict(vae=base.identity("vae"), crop="center")
            self.latent_cache = FeatureCache(args.feature_cache_dir, "latents", namespace, writer=_writer_name())
            self.dataset = CachedLatentImageDataset(self.images, self.latent_cache)
            collate = collate_cached_examples
            atexit.register(self.flush)
        elif self.cached:
            self.dataset = build_latent_cache(
                self.images, base.vae, prompt_encoder, args.sigma_data, args.train_batch_size, self.device
            )
            # the text encoder is not needed any more; the VAE only decodes validation images
            base.text_encoder = self.prompt_encoder = None
            base.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.dataset = self.images
        layout = dict(
            batch_size=args.train_batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seed=seed,
        )
        if args.multi_scale:
            self.sampler = AspectRatioBucketBatchSampler(target_sizes, **layout)
            if self.sampler.dropped_per_epoch:
                logger.info(
                    f"--multi_scale: {self.sampler.dropped_per_epoch} samples per epoch do not fill a whole step in "
                    "their bucket and wait for a later epoch."
                )
        else:
            self.sampler = LayoutInvariantBatchSampler(len(self.dataset), **layout)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
        )

    def _init_streaming(self, args, accelerator, seed: int) -> None:
        stream = load_streaming_dataset(args.dataset_name, args.dataset_config_name, args.train_shards, args.cache_dir)
        if args.max_train_samples is not None:
            stream = stream.take(args.max_train_samples)
        self.cached, self.sampler = False, None
        self.dataset = StreamingImageCaptionDataset(
            stream,
            args.image_column,
            [args.caption_column] + list(args.caption_fallback_columns or []),
            args.resolution,
            args.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            args.gradient_accumulation_steps,
            seed=seed,
            shuffle_buffer_size=args.shuffle_buffer_size,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
        )
        # (epoch, step) of the stream, saved and restored by accelerator.save_state / load_state
        self.position = StreamPosition()
        accelerator.register_for_checkpointing(self.position)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=args.dataloader_num_workers
        )

    def describe(self) -> str:
        """Dataset size and steps per epoch, for the run's log."""
        if self.streaming:
            source = f"{len(self.args.train_shards)} shard patterns" if self.args.train_shards else "a stream"
            return f"Streaming {source}, resuming at epoch {self.position.epoch}, step {self.position.step}"
        return f"Num examples = {len(self.dataset)}, steps per epoch = {self.sampler.steps_per_epoch}"

    def _stream_steps(self):
        epoch, step = self.position.epoch, self.position.step
        while True:
            self.dataset.set_epoch(epoch, step)
            iterator, yielded = iter(self.loader), False
            while True:
                micro_batches = []
                for _ in range(self.args.gradient_accumulation_steps):
                    examples = next(iterator, None)
                    if examples is None:
                        break
                    micro_batches.append(self.batch(examples))
                if len(micro_batches) < self.args.gradient_accumulation_steps:
                    break
                step, yielded = step + 1, True
                self.position.epoch, self.position.step = epoch, step
                yield epoch, micro_batches
            if not yielded and step == 0:
                raise ValueError(
                    "The stream holds fewer rows than one step's global batch (batch size x accumulation x processes)."
                )
            epoch, step = epoch + 1, 0

    def _encode_unit_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_images(self.base.vae, pixel_values, sigma_data=1.0)  # vae_latent * scaling_factor

    def flush(self) -> None:
        """Write the feature caches' buffered entries (also at exit)."""
        for cache in (self.latent_cache, getattr(self.prompt_encoder, "cache", None)):
            if cache is not None:
                cache.flush()

    def precompute(self, accelerator, validation_prompts, logger) -> None:
        """`--precompute_only`: fill the feature caches (each process a share of the rows), then wait for all."""
        counts = fill_caches(
            self.dataset,
            self.prompt_encoder,
            self._encode_unit_latents,
            self.args.train_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            extra_prompts=validation_prompts or (),
            device=self.device,
        )
        accelerator.wait_for_everyone()
        logger.info(
            f"--precompute_only: process {accelerator.process_index} encoded {counts['latents']} latents and "
            f"{counts['captions']} captions into {self.args.feature_cache_dir}.",
            main_process_only=False,
        )

    def batch(self, examples: dict) -> DistillationBatch:
        if self.latent_cache is not None:
            latents = resolve_latents(
                examples, self.latent_cache, self._encode_unit_latents, self.args.sigma_data, self.device
            )
            embeds, mask = self.prompt_encoder(examples["caption"], self.device)
        elif self.cached:
            latents = examples["latents"].to(self.device)
            embeds = examples["prompt_embeds"].to(self.device)
            mask = examples["prompt_attention_mask"].to(self.device)
        else:
            latents = encode_images(self.base.vae, examples["pixel_values"].to(self.device), self.args.sigma_data)
            embeds, mask = self.prompt_encoder(examples["caption"], self.device)
        control = None
        if "control_latents" in examples:
            control = examples["control_latents"].to(self.device)
        elif "conditioning_pixel_values" in examples:
            control = self._encode_unit_latents(examples["conditioning_pixel_values"].to(self.device))
        embeds, mask, null, null_mask = trim_prompt_padding(embeds, mask, self.null_embeds, self.null_mask)
        return DistillationBatch(latents, embeds, mask, null, null_mask, control_latents=control)

    def steps(self, start_step: int):
        """Yields `(epoch, [micro-batch, ...])` for every step from `start_step` on; epochs end on step boundaries."""
        if self.streaming:  # the position was restored with the checkpoint (`StreamPosition`)
            yield from self._stream_steps()
            return
        steps_per_epoch = self.sampler.steps_per_epoch
        epoch = start_step // steps_per_epoch
        self.sampler.set_epoch(epoch, start_step % steps_per_epoch)
        iterator = iter(self.loader)
        while True:
            micro_batches = []
            for _ in range(self.args.gradient_accumulation_steps):
                examples = next(iterator, None)
                if examples is None:
                    self.flush()
                    epoch += 1
                    self.sampler.set_epoch(epoch)
                    iterator = iter(self.loader)
                    examples = next(iterator)
                micro_batches.append(self.batch(examples))
            yield epoch, micro_batches


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------------


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


def save_state(args, accelerator, step: int, logger) -> None:
    """`accelerator.save_state` into `checkpoint-<step>`, atomically, pruned to `--checkpoints_total_limit`."""
    path = save_checkpoint(
        args.output_dir,
        step,
        accelerator.save_state,
        accelerator.is_main_process,
        accelerator.wait_for_everyone,
        args.checkpoints_total_limit,
    )
    logger.info(f"Saved state to {path}")


class EMACounters:
    """
    An EMA's scalar state (step, decay settings) for accelerate's custom-object checkpointing, without the shadow
    parameters: under FSDP2 those are shards that go into the DCP checkpoint instead (`ema_shards`).
    """

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {key: value for key, value in self.ema.state_dict().items() if key != "shadow_params"}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


def ema_shards(ema) -> dict[str, dict[str, torch.Tensor]]:
    """The `tensors` argument of `save_sharded_state` / `load_sharded_state` for an EMA (empty without one)."""
    return {} if ema is None else {"ema": {str(i): tensor for i, tensor in enumerate(ema.shadow_params)}}


def load_state(accelerator, checkpoint: str) -> None:
    """`accelerator.load_state`, with the checkpoint's path in any error (a truncated `optimizer.bin`, say)."""
    try:
        accelerator.load_state(checkpoint)
    except ValueError:
        raise  # ours (the load hook's): it names the file already
    except Exception as error:
        raise ValueError(
            f"Cannot resume from {checkpoint}: {type(error).__name__}: {error}. The checkpoint is damaged or "
            "incomplete; resume from an earlier one (--resume_from_checkpoint <folder>)."
        ) from error


def resume(accelerator, resume_path: str | None, ema, logger) -> None:
    """Restore `resume_path` (if any) through the registered hooks; the EMA follows onto the device, checked finite."""
    if resume_path is None:
        return
    logger.info(f"Resuming from {resume_path}")
    load_state(accelerator, resume_path)
    if ema is not None:
        ema.to(accelerator.device)
        check_finite_state_dict(ema.state_dict(), f"{resume_path} (EMA)")


def start_training(args, run: Run, save_weights, load_weights, sharded_objects, ema, progress, logger):
    """
    Registers accelerate's checkpoint hooks, resumes from `run.resume_path` (if any) through them and opens the
    training log (cut back to the resumed step) and the trackers. Returns `(global_step, log)`.

    A checkpoint holds the trained weights in our formats, not accelerate's pickles of the prepared modules: under
    FSDP2 the DCP shards of `sharded_objects()` (`save_sharded_state`'s models, optimizers, tensors), otherwise what
    `save_weights(folder)` writes on the main process and `load_weights(folder)` reads back; beside them
    `training_state.json` (`progress["global_step"]`, the seed, the stage) and the run fingerprint.
    """
    accelerator = run.accelerator

    def save_model_hook(models, weights, output_dir):
        weights.clear()  # accelerate would pickle the prepared modules
        if run.sharded:
            save_sharded_state(os.path.join(output_dir, "sharded"), *sharded_objects())
        elif accelerator.is_main_process:
            save_weights(output_dir)
        if accelerator.is_main_process:
            write_training_state(output_dir, progress["global_step"], run.seed, args.stage)
            write_fingerprint(output_dir, run.fingerprint)

    def load_model_hook(models, input_dir):
        models.clear()  # loaded from our formats instead
        saved = read_training_state(input_dir, stage=args.stage)
        if run.sharded:
            load_sharded_state(os.path.join(input_dir, "sharded"), *sharded_objects())
        else:
            load_weights(input_dir)
        progress["global_step"] = saved["global_step"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    resume(accelerator, run.resume_path, ema, logger)
    global_step = progress["global_step"]
    log = TrainingLog(args.output_dir, global_step if run.resume_path else None, accelerator.is_main_process)
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    return global_step, log


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


def validate_at_step(args, accelerator, model, sharded: bool, ema, parameters, step: int, validate) -> None:
    """Every `--validation_steps` before the last (that one is validated after saving): `validate(transformer, step,
    True)` on the main process, the EMA weights (if any) in `parameters`; `transformer` is the gathered model."""
    if not args.validation_prompts or step % args.validation_steps or step >= args.max_train_steps:
        return
    with ema_weights(ema, parameters):
        transformer = gather_transformer(model, sharded, accelerator.is_main_process)
        if accelerator.is_main_process:
            validate(transformer, step, True)


def trained_transformer(accelerator, model, sharded: bool, ema, parameters, skip_monitor, logger):
    """After the loop: logs the skipped updates, copies the EMA (if any) into `parameters` and returns the gathered
    transformer in eval mode on the main process (`None` elsewhere under FSDP2)."""
    accelerator.wait_for_everyone()
    logger.info(skip_monitor.summary())
    if ema is not None:
        ema.copy_to(parameters)
    transformer = gather_transformer(model, sharded, accelerator.is_main_process)
    if accelerator.is_main_process:
        transformer.eval()
    return transformer


def steps_progress_bar(args, accelerator, global_step: int) -> tqdm:
    """The bar over `--max_train_steps` iterations (on each node's main process), starting at `global_step`."""
    return tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )


def after_update(
    skip_monitor, phase: str, skipped: bool, step: int, grad_norm, lr_scheduler, ema=None, parameters=None
):
    """Record the update of `phase` at `step`; unless it was skipped, advance the lr schedule (and the EMA)."""
    skip_monitor.record(phase, skipped, step, grad_norm)
    if not skipped:
        lr_scheduler.step()
        if ema is not None:
            ema.step(parameters)


@contextmanager
def ema_weights(ema, parameters):
    """Inside the block `parameters` hold the EMA weights (when there is an EMA), restored after."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def clip_and_step(accelerator, optimizer, parameters, max_grad_norm: float) -> tuple[bool, float]:
    """
    At a sync step: unscale (fp16), clip to `max_grad_norm`, step unless the norm is NaN/Inf, zero the gradients.
    Returns `(skipped, grad_norm)`; every process sees the same all-reduced norm, so they all decide alike.
    """
    from diffusers_sprint.training import step_if_finite

    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    skipped = step_if_finite(optimizer, grad_norm)
    if skipped and accelerator.scaler is not None:
        accelerator.scaler.update()  # lower the fp16 loss scale; step() did not run
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return skipped, float(grad_norm)


# ---------------------------------------------------------------------------------------------------------------------
# Validation images and the final folder
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_validation(args, accelerator, pipeline, seed: int, step: int, autocast: bool, **call_kwargs):
    """
    `pipeline(**call_kwargs)` at every `--validation_inference_steps` count from the same `seed`, its transformer in
    eval mode and its VAE on the accelerator's device (both restored after); saves and returns the grid (rows are
    prompts, columns the step counts) via [`save_validation_grid`].
    """
    transformer, vae = pipeline.transformer, pipeline.vae
    vae_device = vae.device
    vae.to(accelerator.device)
    training = transformer.training
    transformer.eval()
    pipeline.set_progress_bar_config(disable=True)
    columns = []
    with accelerator.autocast() if autocast else nullcontext():
        for num_steps in args.validation_inference_steps:
            generator = torch.Generator(device=accelerator.device).manual_seed(seed)
            columns.append(
                pipeline(
                    **call_kwargs,
                    height=args.resolution,
                    width=args.resolution,
                    use_resolution_binning=False,
                    num_inference_steps=num_steps,
                    generator=generator,
                    output_type="pil",
                ).images
            )
    transformer.train(training)
    vae.to(vae_device)
    return save_validation_grid(accelerator, args, columns, step, args.validation_inference_steps)


def save_validation_grid(accelerator, args, columns: list, step: int, inference_steps: list[int]):
    """`columns[c][r]`: the image of prompt `r` at `inference_steps[c]`; rows are prompts. Logs it to trackers."""
    rows = len(columns[0])
    images = [column[row] for row in range(rows) for column in columns]
    grid = make_image_grid(images, rows=rows, cols=len(columns))
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid.save(os.path.join(folder, f"step_{step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", array, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(
                            image,
                            caption=f"{args.validation_prompts[i // len(columns)]} "
                            f"({inference_steps[i % len(columns)]} steps)",
                        )
                        for i, image in enumerate(images)
                    ]
                },
                step=step,
            )
    return grid


def write_output_folder(output_dir: str, save) -> None:
    """
    `save(folder)` into a temporary folder, then move its entries into `output_dir`, `model_index.json` last (it
    is removed first): a process killed in between leaves a folder without `model_index.json`, which
    `from_pretrained` refuses, never a mix of an old pipeline's and the new one's weights under a valid index.
    """
    tmp = os.path.join(output_dir, ".pipeline-incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):
        os.remove(index)
    names = sorted(os.listdir(tmp), key=lambda name: name == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def publish_output(args, run, accelerator, global_step: int, grid) -> None:
    """Main process, after the weights are written: the validation grid beside them, then the model card and the
    Hub upload (`--push_to_hub`)."""
    if grid is not None:
        grid.save(os.path.join(args.output_dir, "validation_grid.png"))
    if args.push_to_hub:
        save_model_card(
            args, run.repo_id, args.stage, global_step, run.global_batch, accelerator.mixed_precision, grid is not None
        )
        push_output_folder(args, run.repo_id)


def end_run(accelerator) -> None:
    """Every process waits for the main one's save (one leaving early tears the process group down under it)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def push_output_folder(args, repo_id: str) -> None:
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=HUB_IGNORE_PATTERNS,
        token=args.hub_token,
    )


def save_model_card(
    args, repo_id: str, stage: str, global_step: int, global_batch: int, mixed_precision: str, has_grid: bool
) -> None:
    """The output folder's README.md (diffusers' training-card layout): what it is, how to sample it, the recipe."""
    lora = getattr(args, "lora_rank", None) is not None
    script = "prepare_sana_sprint_teacher" if stage == "prepare_teacher" else "train_sana_sprint"
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
            (
                "CFG scales",
                " ".join(str(w) for w in args.guidance_scales)
                if (args.guidance_embeds and not lora) or args.teacher_cfg_without_guidance_embeds
                else "none (the conditional teacher)",
            ),
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
`examples/{script}.py` of diffusers-sprint from
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


def learning_rate_scale(args, num_processes: int) -> int:
    """`--scale_lr`: the global batch (batch x accumulation x processes); else 1."""
    return args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else 1
