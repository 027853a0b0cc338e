#!/usr/bin/env python
"""Score the embedded toy ControlNet: edge adherence and FID of the toy teacher with and without it.

    python examples/toy/eval_toy_controlnet.py --threads 2 --seeds 0 1 --json /tmp/toy_controlnet_eval.json

Protocol. Prompts and conditions come from emoji *outside* the fixed 1,024-image FID reference subset
(`reference_indices(1628, 1024)`), so a controlled sample cannot score well by copying a reference image: the
condition of prompt `i` is the edge map (`edge_maps`) of that emoji relaid by its fixed layout
(`diffusers_sprint.toy.layout.relaid_images`: mirrored or not, shifted by up to 4 px), which the caption does not
imply, as in the ControlNet's training. For each seed, image `i` starts from
`torch.Generator().manual_seed(seed * 100000 + i)`; the teacher without and with the ControlNet get the same noise.
Sampling: 20 flow-Euler steps (shift 1), CFG 4.5, written as TrigFlow ODE steps over
`trigflow_forward(..., controlnet=...)` (equal to diffusers' `SanaControlNetPipeline` to 1e-5, see
tests/unit/pipelines/test_pipeline_controlnet.py; unlike it, the transformer's dense time `timestep_scale` is
honoured). Scores:
edge F1 (tolerance 1 px; `f1_exact`: 0 px) / precision / recall / L1 of the samples' edges against the condition,
and FID against the 1,024 (upright, centred) reference images. Also reported: the relaid real emoji (the FID floor of
relaid images; their edge F1 is 1 by construction) and their VAE reconstructions (the edge F1 a perfect latent can
reach through this autoencoder).

Writes a grid with `--grid`: one column per emoji; rows: relaid source emoji, condition, teacher, teacher + ControlNet.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaControlNetModel

from diffusers_sprint import SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.evaluation.edges import edge_adherence, edge_images, edge_maps
from diffusers_sprint.toy import TOY_CONTROLNET_PATH, TOY_TEACHER_PATH, load_emoji_dataset
from diffusers_sprint.toy.layout import relaid_images
from diffusers_sprint.toy.protocol import SEED_STRIDE


GRID_NAMES = [
    "red apple", "grinning face", "heavy black heart", "cat face", "sun with face", "tangerine",
    "automobile", "ghost", "snowman", "rocket", "dog face", "banana",
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=TOY_TEACHER_PATH)
    p.add_argument("--controlnet", default=TOY_CONTROLNET_PATH)
    p.add_argument("--num_samples", type=int, default=300, help="held-out emoji per seed (at most 604)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--controlnet_conditioning_scale", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--grid", default=None, help="write the image grid here (PNG)")
    p.add_argument("--skip_fid", action="store_true", help="edge adherence only (no Inception)")
    return p.parse_args(argv)


class ToyControlNetTeacher:
    """The toy flow teacher (as a TrigFlow model) + its ControlNet, with CFG sampling over the ODE scheduler."""

    def __init__(self, teacher_path: str, controlnet_path: str | None):
        from diffusers import SanaPipeline

        pipe = SanaPipeline.from_pretrained(teacher_path)
        self.pipe = pipe
        self.vae = pipe.vae
        self.transformer = SanaSprintTransformer2DModel.from_pretrained(teacher_path, subfolder="transformer").eval()
        self.controlnet = SanaControlNetModel.from_pretrained(controlnet_path).eval() if controlnet_path else None
        self.flow_shift = pipe.scheduler.config.shift

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, mask, null, null_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", complex_human_instruction=None
        )
        return embeds, mask, null, null_mask

    @torch.no_grad()
    def control_latents(self, edges: torch.Tensor) -> torch.Tensor:
        """Edge maps `(N, H, W)` -> VAE latents x scaling_factor of the white-on-black edge image (as the pipeline)."""
        pixels = edges[:, None].float().expand(-1, 3, -1, -1) * 2 - 1
        return self.vae.encode(pixels).latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def sample(self, prompts, noise, control=None, steps=20, guidance_scale=4.5, conditioning_scale=1.0):
        """Images (PIL) from unit `noise`; `control` latents switch the ControlNet on."""
        sigma_data = 0.5
        flow = FlowMatchEulerDiscreteScheduler(shift=self.flow_shift)
        flow.set_timesteps(steps)
        scheduler = TrigFlowScheduler(sampler="ode", sigma_data=sigma_data)
        scheduler.set_timesteps(timesteps=TrigFlowScheduler.timesteps_from_flow_sigmas(flow.sigmas))
        embeds, mask, null, null_mask = self.encode_prompts(prompts)
        pair = {}
        if control is not None:
            pair = dict(
                controlnet=self.controlnet,
                controlnet_cond=torch.cat([control, control]),
                controlnet_conditioning_scale=conditioning_scale,
            )
        x = noise * sigma_data
        for t in scheduler.timesteps[:-1]:
            velocity = self.transformer.trigflow_forward(
                torch.cat([x, x]) / sigma_data, t, torch.cat([null, embeds]), torch.cat([null_mask, mask]), **pair
            ).sample
            uncond, cond = velocity.chunk(2)
            x = scheduler.step(sigma_data * (uncond + guidance_scale * (cond - uncond)), t, x).prev_sample
        image = self.vae.decode(x / sigma_data / self.vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(image, output_type="pil")


def held_out_rows(num_rows: int, count: int) -> list[int]:
    from diffusers_sprint.evaluation.fid import reference_indices

    reference = set(reference_indices(num_rows, 1024).tolist())
    rows = [i for i in range(num_rows) if i not in reference]
    if count > len(rows):
        raise ValueError(f"`--num_samples` must be at most {len(rows)} (held-out emoji), got {count}.")
    return sorted(np.random.default_rng(1).choice(rows, size=count, replace=False).tolist())


def teacher_images(model, prompts, edges, seed: int, controlled: bool, batch_size: int = 100, **sample_kwargs):
    """`model.sample` images (`sample_kwargs`: steps, guidance_scale, conditioning_scale), `batch_size` at a time;
    image i starts from the noise of generator `seed * SEED_STRIDE + i`, with the control of `edges[i]` when
    `controlled`."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = torch.cat(
            [
                torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + start + i))
                for i in range(len(chunk))
            ]
        )
        control = model.control_latents(edges[start : start + len(chunk)]) if controlled else None
        images += model.sample(chunk, noise, control, **sample_kwargs)
    return images


def save_grid(model, dataset, args, path: str, scale: int = 3):
    from PIL import Image, ImageDraw

    by_name = {n: i for i, n in enumerate(dataset["name"])}
    rows = [by_name[n] for n in GRID_NAMES]
    sources = relaid_images([dataset[i]["image"] for i in rows], rows)
    edges = edge_maps(sources)
    prompts = [dataset[i]["caption"] for i in rows]
    noise = torch.cat([torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(len(rows))])
    kwargs = dict(steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    columns = [
        sources,
        edge_images(edges),
        model.sample(prompts, noise, None, **kwargs),
        model.sample(prompts, noise, model.control_latents(edges), **kwargs),
    ]
    r, gap = 32, 2  # one row per column above, one column per emoji
    grid = Image.new("RGB", (len(rows) * r, len(columns) * r + (len(columns) - 1) * gap), "white")
    for c, column in enumerate(columns):
        for i, image in enumerate(column):
            grid.paste(image, (i * r, c * (r + gap)))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(grid)
    for c in range(1, len(columns)):
        y = (c * (r + gap) - gap) * scale
        draw.rectangle([0, y, grid.width, y + gap * scale - 1], fill=(160, 160, 160))
    grid.save(path)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    dataset = load_emoji_dataset(resolution=32)
    model = ToyControlNetTeacher(args.teacher, args.controlnet)
    model.pipe.set_progress_bar_config(disable=True)
    rows = held_out_rows(dataset.num_rows, args.num_samples)
    prompts = [dataset[i]["caption"] for i in rows]
    sources = relaid_images([dataset[i]["image"] for i in rows], rows)
    edges = edge_maps(sources)

    if args.grid:
        save_grid(model, dataset, args, args.grid)
        print(f"grid: {args.grid}", flush=True)

    if not args.skip_fid:
        from diffusers_sprint.evaluation import fid_from_features, inception_features
        from diffusers_sprint.toy import emoji_reference_features

        reference = emoji_reference_features(num_images=1024)

    report = {"args": vars(args), "num_samples_per_seed": len(rows), "rows": {}}
    with torch.no_grad():
        pixels = model.pipe.image_processor.preprocess(sources)
        latents = model.vae.encode(pixels).latent
        reconstructions = model.pipe.image_processor.postprocess(model.vae.decode(latents).sample, output_type="pil")
    sets = {"relaid real images": {None: sources}, "VAE reconstructions": {None: reconstructions}}
    for name, controlled in (("teacher", False), ("teacher + ControlNet", True)):
        sets[name] = {}
        for seed in args.seeds:
            t0 = time.time()
            sets[name][seed] = teacher_images(
                model,
                prompts,
                edges,
                seed,
                controlled,
                args.batch_size,
                steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                conditioning_scale=args.controlnet_conditioning_scale,
            )
            print(f"{name} seed {seed}: {len(rows)} samples in {time.time() - t0:.0f}s", flush=True)

    for name, per_seed in sets.items():
        scores = []
        for seed, images in per_seed.items():
            score = edge_adherence(images, edges)
            score["f1_exact"] = edge_adherence(images, edges, tolerance=0)["f1"]
            if not args.skip_fid and name != "VAE reconstructions":
                score["fid"] = fid_from_features(inception_features(images), reference)
            score["seed"] = seed
            scores.append(score)
            print(f"{name} seed {seed}: {score}", flush=True)
        summary = {"per_seed": scores}
        for key in ("f1", "f1_exact", "precision", "recall", "l1", "fid"):
            values = [s[key] for s in scores if key in s]
            if values:
                summary[f"{key}_mean"] = float(np.mean(values))
                summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        report["rows"][name] = summary
    report["seconds"] = round(time.time() - start)
    print(json.dumps({k: {m: v for m, v in r.items() if m.endswith("mean")} for k, r in report["rows"].items()}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
