#!/usr/bin/env python
"""Can the LADD discriminator tell real toy latents from an easy fake? (docs/results.md, "Why the discriminator
stayed at chance")

    python benchmarks/ladd_discriminator_check.py --fake noise --steps 60 --lr 1e-4
    python benchmarks/ladd_discriminator_check.py --fake noise --calls separate   # real and fake in two forwards

Trains only the discriminator heads (the shipped `SanaDiscriminator` on the embedded toy teacher, default head blocks,
AdamW, grad clip 0.1, batch 16) on real dataset latents against a fake that any discriminator must reject:

- `noise`: pure Gaussian latents `N(0, sigma_data^2)` (same per-element scale as the data latents);
- `constant`: every latent the mean data latent;
- `shuffled`: real latents with their 16 tokens permuted (same per-token statistics, wrong layout);
- `student`: the untrained student's samples (`build_student` of the teacher), through the library's
  `discriminator_step` with the demo's settings (max-time weighting 0.5, misaligned pairs as extra fakes, CFG
  scales 4-5); `--calls separate` runs it with `discriminator_shared_norm_groups=False` (official), any other
  value with `True`.

Both branches are re-noised at the discriminator's `t_D` (`--p_mean`, `--p_std`). Prints the hinge loss and the mean
real / fake logits every `--every` steps. `--calls separate` runs real and fake through two discriminator calls (the
official layout); `concat` through one call on `cat([real, fake])` (the heads' batch-norm groups are still
all-real or all-fake); `reference` (the default, what `discriminator_step` does with
`discriminator_shared_norm_groups=True`) through one call with the real rows as `reference=`, interleaved so that
every local batch-norm group holds both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", choices=("noise", "constant", "shuffled", "student"), default="noise")
    parser.add_argument("--calls", choices=("separate", "concat", "reference"), default="reference")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--p_mean", type=float, default=-0.6)
    parser.add_argument("--p_std", type=float, default=1.0)
    parser.add_argument("--head_block_ids", type=int, nargs="+", default=None)
    parser.add_argument("--virtual_batch_size", type=int, default=8)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="Write the curve here.")
    return parser.parse_args(argv)


@torch.no_grad()
def toy_latents_and_embeds(max_sequence_length: int = 32):
    """sigma_data-scaled latents and prompt embeds of the whole emoji dataset (1,628 rows)."""
    import numpy as np
    from diffusers import SanaPipeline

    from diffusers_sprint.toy import TOY_TEACHER_PATH, load_emoji_dataset

    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    dataset = load_emoji_dataset(resolution=32)
    images = torch.from_numpy(np.stack([np.asarray(image) for image in dataset["image"]])).permute(0, 3, 1, 2)
    images = images.float() / 127.5 - 1.0
    latents = torch.cat([pipe.vae.encode(chunk).latent for chunk in images.split(256)])
    latents = latents * pipe.vae.config.scaling_factor * 0.5
    embeds, mask, _, _ = pipe.encode_prompt(
        list(dataset["caption"]),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        complex_human_instruction=None,
    )
    null, null_mask, _, _ = pipe.encode_prompt(
        "", do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, complex_human_instruction=None
    )
    return latents, embeds, mask, null, null_mask


def fake_like(args, real: torch.Tensor, mean_latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if args.fake == "noise":
        return 0.5 * torch.randn(real.shape, generator=generator)
    if args.fake == "constant":
        return mean_latent.expand_as(real).clone()
    b, c, h, w = real.shape  # shuffled tokens
    return real.flatten(2)[:, :, torch.randperm(h * w, generator=generator)].reshape(b, c, h, w)


def judge(args, discriminator, real, fake, e, m):
    """(real logits, fake logits) with both re-noised at t_D, judged as `--calls` says."""
    from diffusers_sprint.models import TrigFlowInputs
    from diffusers_sprint.training.ladd import renoise_for_discriminator

    generator = args.generator
    inputs = renoise_for_discriminator(
        real_x0=real, fake_x0=fake, p_mean=args.p_mean, p_std=args.p_std, generator=generator
    )
    if args.calls == "separate":
        return (
            discriminator(inputs.real_x_t / 0.5, inputs.real_t, e, m),
            discriminator(inputs.fake_x_t / 0.5, inputs.fake_t, e, m),
        )
    if args.calls == "concat":  # one call on cat([real, fake]): batch-norm groups still all-real or all-fake
        logits = discriminator(
            torch.cat([inputs.real_x_t, inputs.fake_x_t]) / 0.5,
            torch.cat([inputs.real_t, inputs.fake_t]),
            torch.cat([e, e]),
            torch.cat([m, m]),
        )
        return logits.split([len(real), len(fake)])
    # the library's joint call: the real rows as `reference`, interleaved in every batch-norm group
    reference = TrigFlowInputs(inputs.real_x_t / 0.5, inputs.real_t, e, m)
    fake_logits, real_logits = discriminator(inputs.fake_x_t / 0.5, inputs.fake_t, e, m, reference=reference).split(
        [len(fake), len(real)]
    )
    return real_logits, fake_logits


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers_sprint import SanaSprintTransformer2DModel
    from diffusers_sprint.models.trigflow_model import TrigFlowModel
    from diffusers_sprint.toy import TOY_TEACHER_PATH
    from diffusers_sprint.training.ladd import SanaDiscriminator, hinge_discriminator_loss

    start = time.perf_counter()
    latents, embeds, mask, null, null_mask = toy_latents_and_embeds()
    teacher = SanaSprintTransformer2DModel.from_pretrained(TOY_TEACHER_PATH, subfolder="transformer")
    torch.manual_seed(args.seed)
    discriminator = SanaDiscriminator(
        TrigFlowModel(teacher), head_block_ids=args.head_block_ids, virtual_batch_size=args.virtual_batch_size
    )
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.lr, weight_decay=0.0)
    generator = args.generator = torch.Generator().manual_seed(args.seed)
    mean_latent = latents.mean(0, keepdim=True)
    if args.fake == "student":
        from diffusers_sprint.training import DistillationBatch, DistillationConfig, build_student, discriminator_step

        student = TrigFlowModel(build_student(teacher, generator=torch.Generator().manual_seed(args.seed))).eval()
        config = DistillationConfig(discriminator_shared_norm_groups=args.calls != "separate")
    curve = []
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(latents), (args.batch_size,), generator=generator)
        real, e, m = latents[rows], embeds[rows], mask[rows]
        if args.fake == "student":
            batch = DistillationBatch(real, e, m, null, null_mask)
            out = discriminator_step(student, discriminator, batch, config, generator=generator)
            loss, real_logits, fake_logits = out.loss, out.logs["real_logits_mean"], out.logs["fake_logits_mean"]
        else:
            real_logits, fake_logits = judge(
                args, discriminator, real, fake_like(args, real, mean_latent, generator), e, m
            )
            loss = hinge_discriminator_loss(real_logits, fake_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), 0.1)
        optimizer.step()
        record = {
            "step": step,
            "hinge": loss.item(),
            "real_logits_mean": real_logits.mean().item(),
            "fake_logits_mean": fake_logits.mean().item(),
            "grad_norm": grad_norm.item(),
        }
        curve.append(record)
        if step == 1 or step % args.every == 0:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
    print(f"{time.perf_counter() - start:.0f}s", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            settings = {k: v for k, v in vars(args).items() if k != "generator"}
            json.dump({"args": settings, "curve": curve}, handle, indent=1)


if __name__ == "__main__":
    main()
