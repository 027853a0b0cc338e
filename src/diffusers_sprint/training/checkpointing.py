"""Checkpoints of a run through accelerate's `save_state` / `load_state`, written atomically
(`training.checkpoints`): the trained weights in diffusers format, the FSDP2 shards (DCP), EMA and counters.
"""

import json
import os
from dataclasses import dataclass, field

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from ..pipelines.pipeline_sana_sprint import SanaSprintPipeline
from .checkpoints import SHARDED_STATE_FOLDER, save_checkpoint
from .fingerprint import write_fingerprint
from .lora import lora_state_dict
from .monitoring import check_finite_state_dict
from .sharding import load_sharded_state, save_sharded_state


LORA_TRAINABLE_FILE = "trainable_parameters.safetensors"


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, refused with the file's name when missing, damaged or not finite."""
    try:
        weights = load_file(path)
    except Exception as error:  # missing file, truncated header, bad metadata: say which file
        raise ValueError(f"Cannot read the checkpoint file {path}: {error}") from error
    check_finite_state_dict(weights, path)
    return weights


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


TRAINING_STATE = "training_state.json"


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


def write_training_state(output_dir: str, global_step: int, seed: int, stage: str) -> None:
    with open(os.path.join(output_dir, TRAINING_STATE), "w") as file:
        json.dump({"global_step": global_step, "seed": seed, "stage": stage}, file)


@dataclass
class TrainedWeights:
    """
    The trained models of a run and how its checkpoints store them: the trained weights in our formats, never
    accelerate's pickles of the prepared modules, and never the frozen teacher (diffusers #12444).

    Args:
        transformer: The trained transformer, unwrapped (a PEFT model with LoRA); saved in diffusers format under
            `transformer/`, or with `lora` its trainable parameters under `transformer_lora/` (plus the LoRA in
            diffusers' loader format).
        sharded_models, optimizers: Under FSDP2 the checkpoint holds DCP shards instead: `{name: module}` and
            `{name: (module, optimizer)}` as `training.sharding.save_sharded_state` takes them.
        ema: The EMA of the trained parameters (its shadows are shards under FSDP2).
        controlnet: The student's ControlNet (ControlNet distillation), saved under `controlnet/`.
        discriminator: The LADD discriminator, whose heads are saved under `discriminator_heads/`.
    """

    transformer: torch.nn.Module
    sharded_models: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    ema: object | None = None
    lora: bool = False
    controlnet: torch.nn.Module | None = None
    discriminator: torch.nn.Module | None = None

    def sharded_state(self) -> tuple[dict, dict, dict]:
        """The arguments of `save_sharded_state` / `load_sharded_state`."""
        return self.sharded_models, self.optimizers, ema_shards(self.ema)

    def _files(self, folder: str) -> dict[str, tuple[str, torch.nn.Module]]:
        """`{what: (file, module)}` of the weights a checkpoint folder holds besides the transformer."""
        files = {}
        if self.controlnet is not None:
            files["controlnet"] = (os.path.join(folder, "controlnet", SAFETENSORS_WEIGHTS_NAME), self.controlnet)
        if self.discriminator is not None:
            files["heads"] = (os.path.join(folder, "discriminator_heads", "heads.safetensors"), self.discriminator)
        return files

    def save(self, folder: str) -> None:
        if self.lora:
            lora_folder = os.path.join(folder, "transformer_lora")
            os.makedirs(lora_folder, exist_ok=True)
            trainable = {n: p.detach().contiguous() for n, p in self.transformer.named_parameters() if p.requires_grad}
            save_file(trainable, os.path.join(lora_folder, LORA_TRAINABLE_FILE))
            SanaSprintPipeline.save_lora_weights(
                lora_folder, transformer_lora_layers=lora_state_dict(self.transformer)
            )
        else:
            self.transformer.save_pretrained(os.path.join(folder, "transformer"))
        if self.controlnet is not None:
            self.controlnet.save_pretrained(os.path.join(folder, "controlnet"))
        if self.discriminator is not None:
            path, module = self._files(folder)["heads"]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)

    def load(self, folder: str) -> None:
        if self.lora:
            path = os.path.join(folder, "transformer_lora", LORA_TRAINABLE_FILE)
            weights = load_checkpoint_file(path)
            expected = {n for n, p in self.transformer.named_parameters() if p.requires_grad}
            if set(weights) != expected:
                raise ValueError(f"Checkpoint {folder} does not hold this run's LoRA parameters ({path}).")
            self.transformer.load_state_dict(weights, strict=False)
        else:
            path = os.path.join(folder, "transformer", SAFETENSORS_WEIGHTS_NAME)
            self.transformer.load_state_dict(load_checkpoint_file(path))
        for path, module in self._files(folder).values():
            module.load_state_dict(load_checkpoint_file(path))


def register_checkpoint_hooks(
    accelerator, sharded: bool, weights: TrainedWeights, progress: dict, seed: int, stage: str, fingerprint: dict
) -> None:
    """
    accelerate's save/load hooks for `weights`: under FSDP2 the DCP shards of `weights.sharded_state()`, otherwise
    what `weights.save` writes on the main process and `weights.load` reads back; beside them `training_state.json`
    (`progress["global_step"]`, `seed`, `stage`) and the run `fingerprint`. Loading sets `progress["global_step"]`.
    """

    def save_model_hook(models, weights_list, output_dir):
        weights_list.clear()  # accelerate would pickle the prepared modules
        if sharded:
            save_sharded_state(os.path.join(output_dir, SHARDED_STATE_FOLDER), *weights.sharded_state())
        elif accelerator.is_main_process:
            weights.save(output_dir)
        if accelerator.is_main_process:
            write_training_state(output_dir, progress["global_step"], seed, stage)
            write_fingerprint(output_dir, fingerprint)

    def load_model_hook(models, input_dir):
        models.clear()  # loaded from our formats instead
        saved = read_training_state(input_dir, stage=stage)
        if sharded:
            load_sharded_state(os.path.join(input_dir, SHARDED_STATE_FOLDER), *weights.sharded_state())
        else:
            weights.load(input_dir)
        progress["global_step"] = saved["global_step"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
