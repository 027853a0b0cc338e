#!/usr/bin/env python
"""Does a Sprint-LoRA distilled on the base teacher accelerate a style fine-tune of it? (docs/lora.md)

    python examples/toy/train_toy_style_lora.py --style grayscale --output_dir lora-transfer/style-lora
    python examples/toy/lora_transfer.py --output_dir lora-transfer      # distils both Sprint-LoRAs, evaluates

Steps (each skipped when its output exists):
  1. Datasets: the emoji (all 1,628, as the demo) and the style's training set (the tuning split restyled, the rows
     the style LoRA was trained on), saved with `save_to_disk`.
  2. Two Sprint-LoRA distillations with `examples/train_sana_sprint.py --lora_rank` and the demo's toy recipe
     (`demo.training_command`): `sprint-base` from the base teacher on the emoji (what a model hub would ship), and
     `sprint-direct` from the styled teacher (`--teacher_lora <style LoRA>`, on the styled set: the personalised
     one-step student, the upper bound).
  3. Evaluation on the held-out split in the style (`diffusers_sprint.toy.protocol`: `--count` prompts per seed, the
     split's noise seeds; FID against the Inception features of the 1,024 restyled reference images; prompt adherence
     with the emoji classifier), every model built with diffusers' LoRA API:

         pipe.load_lora_weights(style, adapter_name="style")
         pipe.load_lora_weights(sprint, adapter_name="sprint")
         pipe.set_adapters(["style", "sprint"], [style_weight, sprint_weight])

     styled teacher (20 steps, CFG 4.5: the reference), transfer = style + sprint-base (1/2/4 steps), direct = style
     fused + sprint-direct (1/2/4 steps), floor = sprint-base alone (1 step, no style), and the real restyled images.
     `--transfer_weights S P ...` adds transfer rows at other adapter weights (1 step).

Also reported: the colour spread (mean over pixels of the std across R, G, B; 0 = grayscale), the style's own
measure. Writes `NAME.json` and `NAME_grid.png` under `--output_dir` (`--name`, default `metrics`).

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import demo  # examples/toy/demo.py, beside this script
import torch

from diffusers_sprint.evaluation import fid_from_features, inception_features
from diffusers_sprint.toy import STYLES, TOY_TEACHER_PATH, emoji_reference_features, load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor, load_classifier, prompt_adherence
from diffusers_sprint.toy.protocol import FID_REFERENCE_IMAGES, SPLIT_SEED_BASES, SPLITS, evaluation_set, split_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` go to both distillations (examples/train_sana_sprint.py).",
    )
    p.add_argument("--output_dir", default="lora-transfer")
    p.add_argument("--style", default="grayscale", choices=STYLES)
    p.add_argument("--style_lora", default=None, help="the style LoRA folder (default OUTPUT_DIR/style-lora)")
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--count", type=int, default=100, help="evaluation prompts per seed")
    p.add_argument("--split", choices=SPLITS, default="held_out")
    p.add_argument("--student_steps", type=int, nargs="+", default=list(demo.STUDENT_STEPS))
    p.add_argument(
        "--transfer_weights",
        type=float,
        nargs="+",
        default=[],
        help="extra (style, sprint) adapter-weight pairs for 1-step transfer rows, e.g. 1.0 0.8 1.2 1.0",
    )
    p.add_argument("--skip_training", action="store_true")
    p.add_argument("--skip_fid", action="store_true", help="adherence and colour spread only (no Inception)")
    p.add_argument("--name", default="metrics", help="writes OUTPUT_DIR/NAME.json and OUTPUT_DIR/NAME_grid.png")
    p.add_argument("--threads", type=int, default=None)
    args = demo.parse_with_train_args(p, argv)
    if len(args.transfer_weights) % 2:
        p.error("--transfer_weights takes (style, sprint) pairs: an even number of values.")
    args.style_lora = args.style_lora or os.path.join(args.output_dir, "style-lora")
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1-2. data and distillation


def distil(args, name: str, dataset_dir: str, extra: list[str]) -> str:
    """Runs `examples/train_sana_sprint.py --lora_rank` with the demo's toy recipe unless OUTPUT_DIR/name exists."""
    output = os.path.join(args.output_dir, name)
    if os.path.isfile(os.path.join(output, "pytorch_lora_weights.safetensors")) or args.skip_training:
        return output
    recipe = argparse.Namespace(
        quick=False,
        max_train_steps=args.max_train_steps,
        seed=0,
        train_args=[
            "--lora_rank", str(args.lora_rank),
            "--learning_rate", str(args.learning_rate),
            "--guidance_scales", str(demo.GUIDANCE_SCALE),  # a LoRA student learns one CFG scale
            *extra,
            *args.train_args,
        ],
    )  # fmt: skip
    command = demo.training_command(recipe, TOY_TEACHER_PATH, dataset_dir, output)
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=demo.REPO_ROOT)
    return output


def save_datasets(args) -> tuple[str, str]:
    """The emoji (all rows) and the style's training set (tuning split, restyled), as `save_to_disk` folders."""
    paths = (os.path.join(args.output_dir, "dataset"), os.path.join(args.output_dir, f"dataset-{args.style}"))
    if not os.path.isdir(paths[0]):
        load_emoji_dataset(resolution=demo.RESOLUTION).save_to_disk(paths[0])
    if not os.path.isdir(paths[1]):
        styled = load_emoji_dataset(resolution=demo.RESOLUTION, style=args.style)
        styled.select(split_rows("tuning", styled.num_rows)).save_to_disk(paths[1])
    return paths


# ----------------------------------------------------------------------------------------------------------------
# 3. models


def styled_teacher(style_lora: str):
    """diffusers' `SanaPipeline` of the toy teacher with the style adapter."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.load_lora_weights(style_lora, adapter_name="style")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sprint_on_teacher(adapters: dict[str, str], weights: list[float], fuse_first: str | None = None):
    """`SanaSprintPipeline` on the toy teacher with `adapters` (name -> LoRA folder) active at `weights`; with
    `fuse_first`, that adapter is fused (and unloaded) before the others load: the personalised teacher."""
    from diffusers_sprint import SanaSprintPipeline

    pipe = SanaSprintPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    if fuse_first is not None:
        pipe.load_lora_weights(adapters[fuse_first], adapter_name=fuse_first)
        pipe.fuse_lora(adapter_names=[fuse_first])
        pipe.unload_lora_weights()
    names = [name for name in adapters if name != fuse_first]
    for name in names:
        pipe.load_lora_weights(adapters[name], adapter_name=name)
    pipe.set_adapters(names, weights[-len(names) :])
    return pipe


def samplers(args, sprint_base: str, sprint_direct: str) -> dict[str, tuple]:
    """Row name -> (pipeline factory, `demo.sample` kind "teacher-20" / "student-k")."""
    style = args.style_lora
    rows = {"styled teacher, 20 steps": (lambda: styled_teacher(style), f"teacher-{demo.TEACHER_STEPS}")}
    transfer = lambda w=(1.0, 1.0): sprint_on_teacher({"style": style, "sprint": sprint_base}, list(w))  # noqa: E731
    direct = lambda: sprint_on_teacher({"style": style, "sprint": sprint_direct}, [1.0], fuse_first="style")  # noqa: E731
    for k in args.student_steps:
        rows[f"transfer, {k} step{'s' * (k > 1)}"] = (transfer, f"student-{k}")
    pairs = list(zip(args.transfer_weights[::2], args.transfer_weights[1::2]))
    for s, p in pairs:
        rows[f"transfer, 1 step, weights {s:g}/{p:g}"] = (lambda w=(s, p): transfer(w), "student-1")
    for k in args.student_steps:
        rows[f"direct, {k} step{'s' * (k > 1)}"] = (direct, f"student-{k}")
    rows["base Sprint-LoRA, 1 step (no style)"] = (
        lambda: sprint_on_teacher({"sprint": sprint_base}, [1.0]),
        "student-1",
    )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 4. evaluation


def colour_spread(images) -> float:
    """Mean over pixels of the standard deviation across R, G, B, in 0-255 units: 0 for a grayscale image."""
    return float(((images_to_tensor(images) + 1) * 127.5).std(dim=1, unbiased=False).mean())


def score(images, prompts, reference, classifier) -> dict:
    """FID against `reference` (unless it is None), prompt adherence and colour spread of one seed's images."""
    row = {"adherence": prompt_adherence(images, prompts, classifier), "colour_spread": colour_spread(images)}
    if reference is not None:
        row["fid"] = fid_from_features(inception_features(images), reference)
    return row


def summarise(per_seed: list[dict]) -> dict:
    """Per-seed values, mean and (for FID) std over seeds of each metric."""
    summary = {}
    for metric in per_seed[0]:
        values = [row[metric] for row in per_seed]
        summary[f"{metric}_per_seed"] = [round(v, 3) for v in values]
        summary[f"{metric}_mean"] = round(statistics.mean(values), 3)
        if metric == "fid":
            summary["fid_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(args.style_lora, "pytorch_lora_weights.safetensors")):
        sys.exit(f"No style LoRA in {args.style_lora}: train it with examples/toy/train_toy_style_lora.py.")
    base_dir, styled_dir = save_datasets(args)
    sprint_base = distil(args, "sprint-base", base_dir, [])
    sprint_direct = distil(args, "sprint-direct", styled_dir, ["--teacher_lora", args.style_lora])

    reference = None
    if not args.skip_fid:
        reference = emoji_reference_features(demo.RESOLUTION, num_images=FID_REFERENCE_IMAGES, style=args.style)
    classifier = load_classifier()
    styled = load_emoji_dataset(resolution=demo.RESOLUTION, style=args.style)
    sets = {seed: evaluation_set(args.split, args.count, seed, styled.num_rows) for seed in args.seeds}
    prompts = {seed: [styled[row]["caption"] for row in s.rows] for seed, s in sets.items()}
    results = {
        f"real {args.style} images": summarise(
            [
                score([styled[row]["image"] for row in s.rows], prompts[seed], reference, classifier)
                for seed, s in sets.items()
            ]
        )
    }
    grid_columns = {
        f"dataset\n{args.style}": [styled[list(styled["caption"]).index(p)]["image"] for p in demo.GRID_PROMPTS]
    }
    for name, (factory, kind) in samplers(args, sprint_base, sprint_direct).items():
        t0 = time.time()
        pipe = factory()
        per_seed = []
        for seed in args.seeds:
            images = demo.sample(pipe, kind, prompts[seed], seed, SPLIT_SEED_BASES[args.split])
            per_seed.append(score(images, prompts[seed], reference, classifier))
        results[name] = summarise(per_seed)
        results[name]["seconds"] = round(time.time() - t0, 1)
        if "weights" not in name and not name.startswith("direct, 2") and not name.startswith("transfer, 2"):
            grid_columns[name.replace(", ", "\n", 1)] = demo.sample(pipe, kind, list(demo.GRID_PROMPTS), 0)
        print(f"{name:<40} FID {results[name].get('fid_mean', '-')} ± {results[name].get('fid_std', '-')}  adherence "
              f"{results[name]['adherence_mean']:.3f}  colour spread {results[name]['colour_spread_mean']:.2f}  "
              f"({results[name]['seconds']:.0f}s)", flush=True)  # fmt: skip
    one_step = results.get("direct, 1 step", {}).get("fid_mean")
    for row in results.values():
        row["fid_ratio_to_direct_1_step"] = round(row["fid_mean"] / one_step, 3) if one_step else None
    grid = os.path.join(args.output_dir, f"{args.name}_grid.png")
    demo.make_grid(grid_columns, list(demo.GRID_PROMPTS), grid)
    report = {
        "style": args.style,
        "split": args.split,
        "count_per_seed": args.count,
        "seeds": args.seeds,
        "fid_reference": f"{FID_REFERENCE_IMAGES} restyled tuning-split images",
        "style_lora": os.path.abspath(args.style_lora),
        "sprint_base": os.path.abspath(sprint_base),
        "sprint_direct": os.path.abspath(sprint_direct),
        "rows": results,
        "seconds": round(time.time() - start),
    }
    with open(os.path.join(args.output_dir, f"{args.name}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"metrics -> {args.output_dir}/{args.name}.json; grid -> {grid}")
    return report


if __name__ == "__main__":
    main()
