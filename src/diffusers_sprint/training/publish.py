"""What a run leaves behind: validation grids, the final pipeline folder, the model card and the Hub upload."""

import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import upload_folder

from .. import (
    SanaSprintControlNetPipeline,
    SanaSprintPipeline,
    TrigFlowScheduler,
)
from .components import FrozenComponents, gather_transformer


HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "step_*", "epoch_*", ".pipeline-*"]


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
