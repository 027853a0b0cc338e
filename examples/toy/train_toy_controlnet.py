#!/usr/bin/env python
"""Train the embedded toy ControlNet: a small diffusers `SanaControlNetModel` on edge maps, for the toy teacher.

    python examples/toy/train_toy_controlnet.py --threads 1 --output_dir src/diffusers_sprint/toy/toy_controlnet

The training images are the emoji *relaid*: `--variants` random layouts per emoji (mirrored or not, shifted by up to
`--max_shift` px; `diffusers_sprint.toy.layout`), which the caption does not imply, so the ControlNet must read them
from the condition. The condition is the Sobel edge map of each relaid emoji
(`diffusers_sprint.evaluation.edges.edge_maps`, luminance step 0.2), drawn as white edges on black and encoded by the
teacher's own autoencoder (times its `scaling_factor`), as diffusers' `SanaControlNetPipeline` encodes control
images. The frozen teacher (`TOY_TEACHER_PATH`, rectified flow, dense time `s`) is trained against with its own loss,
`v = z - x0` at `x_s = (1 - s) x0 + s z`, while only the ControlNet learns; its residuals are added to the teacher's
blocks as in diffusers.

The ControlNet is initialised the way Sana's (and PixArt's) ControlNets are: its patch, time and caption embedders
and its transformer blocks are copies of the teacher's first `--layers` blocks; `input_block` and the per-block
output projections start at zero (diffusers' init), so at step 0 the pair is exactly the teacher. Captions are
dropped to the empty prompt 10% of the time (as in the teacher's training, so CFG still works); the control image is
always given. The EMA weights are saved with `save_pretrained` (safetensors) plus `training_info.json`.

Sample with `SanaSprintControlNetPipeline` (flow teacher: `TrigFlowScheduler(sampler="ode")`, `guidance_scale=None`)
or with CFG as `examples/toy/eval_toy_controlnet.py` does. diffusers' `SanaControlNetPipeline` does not apply the
transformer's `timestep_scale` (its `SanaPipeline` does), so it feeds this dense-time teacher `1000 s`: use ours.

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import inspect
import json
import os
import time

import torch
import torch.nn.functional as F
import toy_common as common  # examples/toy/toy_common.py, beside this script
from diffusers import SanaControlNetModel, SanaPipeline
from diffusers.training_utils import EMAModel

from diffusers_sprint.evaluation.edges import DEFAULT_THRESHOLD, edge_maps
from diffusers_sprint.toy import TOY_TEACHER_PATH, load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor
from diffusers_sprint.toy.layout import MAX_SHIFT, random_layouts, relayout


def parse_args(argv=None):
    p = common.training_parser(__doc__, steps=15000, batch_size=32, lr=1e-3)
    common.add_flow_training_arguments(p)
    p.add_argument("--teacher", default=TOY_TEACHER_PATH)
    p.add_argument("--output_dir", default="src/diffusers_sprint/toy/toy_controlnet")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--edge_threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--variants", type=int, default=8, help="random layouts per emoji in the training set")
    p.add_argument("--max_shift", type=int, default=MAX_SHIFT, help="largest shift of a layout, in pixels")
    p.add_argument("--layers", type=int, default=3, help="ControlNet blocks (copies of the teacher's first ones)")
    p.add_argument("--eval_batch", type=int, default=256, help="held-fixed noise/time batch for the final losses")
    return p.parse_args(argv)


def controlnet_from_teacher(transformer, num_layers: int) -> SanaControlNetModel:
    """A `SanaControlNetModel` with the teacher's config (every argument the two share), embedders and first
    `num_layers` blocks; zero output projections."""
    shared = inspect.signature(SanaControlNetModel.__init__).parameters
    config = {key: value for key, value in transformer.config.items() if key in shared}
    controlnet = SanaControlNetModel(**{**config, "num_layers": num_layers})
    for name in ("patch_embed", "time_embed", "caption_projection", "caption_norm"):
        getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict())
    for block, source in zip(controlnet.transformer_blocks, transformer.transformer_blocks):
        block.load_state_dict(source.state_dict())
    return controlnet


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents times `scaling_factor` (diffusers' units) of `[-1, 1]` pixels."""
    latents = torch.cat([vae.encode(pixels[i : i + 256]).latent for i in range(0, len(pixels), 256)])
    return latents * vae.config.scaling_factor


def flow_velocity(transformer, controlnet, x_s, s, embeds, mask, control, timestep_scale: float):
    """Teacher flow velocity at `x_s`, with the ControlNet's residuals when `controlnet` is given."""
    timestep = 1000 * s * timestep_scale  # what SanaPipeline feeds the transformer; the ControlNet sees the same
    residuals = None
    if controlnet is not None:
        residuals = controlnet(
            x_s,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timestep,
            controlnet_cond=control,
            return_dict=False,
        )[0]
    return transformer(
        x_s,
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        timestep=timestep,
        controlnet_block_samples=residuals,
    ).sample


@torch.no_grad()
def fixed_batch_losses(transformer, controlnet, latents, control, embeds, masks, args) -> dict:
    """Flow loss on a fixed batch (same noise and times) without and with the ControlNet."""
    generator = torch.Generator().manual_seed(args.seed + 99)
    idx = torch.randperm(len(latents), generator=generator)[: args.eval_batch]
    x0 = latents[idx]
    s = torch.rand(len(idx), generator=generator)
    z = torch.randn(x0.shape, generator=generator)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * z
    scale = transformer.config.timestep_scale
    losses = {}
    for name, net in (("teacher", None), ("teacher_with_controlnet", controlnet)):
        v = flow_velocity(transformer, net, x_s, s, embeds[idx], masks[idx], control[idx], scale)
        losses[name] = F.mse_loss(v, z - x0).item()
    return losses


def main(argv=None):
    args = parse_args(argv)
    common.set_up(args)
    t0 = time.time()

    pipe = SanaPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    transformer, vae = pipe.transformer.eval().requires_grad_(False), pipe.vae.eval().requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)

    dataset = load_emoji_dataset(resolution=args.resolution)
    captions = list(dataset["caption"])
    rows = torch.arange(len(captions)).repeat(args.variants)  # variant v of emoji i is sample v * N + i
    layouts = random_layouts(len(rows), torch.Generator().manual_seed(args.seed + 2), args.max_shift)
    pixels = relayout(images_to_tensor(dataset["image"])[rows], layouts)
    edges = edge_maps((pixels + 1) / 2, args.edge_threshold)
    edge_pixels = edges[:, None].float().expand(-1, 3, -1, -1) * 2 - 1  # white edges on black, in [-1, 1]
    latents, control = encode(vae, pixels), encode(vae, edge_pixels)
    max_length = max(len(ids) for ids in pipe.tokenizer(captions).input_ids)
    embeds, masks = common.encode_captions(pipe, captions, max_length)
    embeds, masks = embeds[rows], masks[rows]
    null_embed, null_mask = common.encode_captions(pipe, [""], max_length)
    print(
        f"{len(captions)} emoji x {args.variants} layouts, edge density {edges.float().mean():.3f}, "
        f"latents {tuple(latents.shape[1:])} ({time.time() - t0:.0f}s)",
        flush=True,
    )

    controlnet = controlnet_from_teacher(transformer, args.layers)
    params = list(controlnet.parameters())
    print(f"controlnet: {sum(p.numel() for p in params) / 1e6:.3f}M params, {args.layers} blocks", flush=True)
    ema = EMAModel(params, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    scale = transformer.config.timestep_scale
    controlnet.train()
    t_train, running, log = time.time(), None, []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * common.lr_at(step, args.steps, args.warmup_steps)
        idx, x0, cond, mask, s, z, x_s = common.flow_matching_batch(
            latents, embeds, masks, null_embed[0], null_mask[0], args.batch_size, args.cfg_dropout, generator
        )
        v = flow_velocity(transformer, controlnet, x_s, s, cond, mask, control[idx], scale)
        loss = F.mse_loss(v, z - x0)
        common.optimizer_step(loss, optimizer, params, ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            line = f"step {step:5d}  loss {running:.4f}  {time.time() - t_train:6.0f}s"
            print(line, flush=True)
            log.append(line)
    train_seconds = time.time() - t_train
    ema.copy_to(params)
    controlnet.eval()

    losses = fixed_batch_losses(transformer, controlnet, latents, control, embeds, masks, args)
    print(f"fixed-batch flow loss: {losses}", flush=True)
    controlnet.save_pretrained(args.output_dir, safe_serialization=True)
    recorded = dict(vars(args))
    if args.teacher == TOY_TEACHER_PATH:
        recorded["teacher"] = "diffusers_sprint.toy.TOY_TEACHER_PATH"
    info = {
        "script": "examples/toy/train_toy_controlnet.py",
        "args": recorded,
        "condition": f"edge_maps(relaid emoji, threshold={args.edge_threshold}) as white-on-black RGB, VAE-encoded",
        "dataset_size": len(captions),
        "training_samples": len(rows),
        "edge_density": round(float(edges.float().mean()), 4),
        "controlnet_params": sum(p.numel() for p in params),
        "fixed_batch_flow_loss": {k: round(v, 4) for k, v in losses.items()},
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - t0),
        "torch_threads": torch.get_num_threads(),
        "log": log,
        "credits": "Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0",
    }
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    print(f"saved {args.output_dir}; total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
