#!/usr/bin/env python
"""`make demo-controlnet`: distil the toy teacher + its edge ControlNet into a 1-4 step Sprint ControlNet, offline.

    python examples/toy/demo_controlnet.py                 # ~10 minutes on 2 CPU cores
    python examples/toy/demo_controlnet.py --quick         # a smoke run (tests)

What it does (docs/controlnet.md, section 5):
  1. Builds the embedded emoji dataset at 32 px, each emoji relaid by its fixed layout (mirrored or not, shifted by up
     to 4 px: `diffusers_sprint.toy.layout`, which the caption does not imply), with a `conditioning_image` column: the
     Sobel edge map of each relaid emoji (`diffusers_sprint.evaluation.edges`, the toy ControlNet's condition), white
     on black.
  2. Runs `examples/train_sana_sprint.py --controlnet_model_name_or_path <toy ControlNet> --controlnet_training_mode
     joint` (student transformer + ControlNet from the toy teacher + toy ControlNet; the T2I demo's toy recipe) under
     `accelerate launch` with 2 gloo processes (DDP on the CPU; `--num_processes 1` to use one).
  3. Scores, on emoji held out from the FID reference (their captions as prompts, their edge maps as the condition)
     over `--seeds`: the teacher + ControlNet (20 flow-Euler steps, CFG 4.5, `eval_toy_controlnet.py`'s sampler) and
     the student (`SanaSprintControlNetPipeline` from the output folder) at 1, 2 and 4 steps: edge F1 / precision /
     recall / L1 against the condition and FID against the toy protocol's 1,024 reference images. Also, edge scores
     only: the teacher without ControlNet and the 1-step student at `controlnet_conditioning_scale=0`.
  4. Writes `metrics.json` and a grid (condition | teacher | student 1 / 2 / 4 steps) to `--grid`.

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

# demo.py (beside this script) sets the HF offline variables when imported, before anything reads them.
from demo import (
    GUIDANCE_SCALE,
    REPO_ROOT,
    RESOLUTION,
    STUDENT_STEPS,
    TEACHER_STEPS,
    TOY_RECIPE,
    TRAIN_SCRIPT,
    TWO_STEP_INTERMEDIATE_TIME,
    parse_with_train_args,
)
from eval_toy_controlnet import GRID_NAMES, ToyControlNetTeacher, held_out_rows, teacher_images

from diffusers_sprint.toy.protocol import generate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="demo-controlnet-output")
    p.add_argument("--max_train_steps", type=int, default=None, help="Distillation iterations (default 300).")
    p.add_argument("--num_eval_samples", type=int, default=None, help="Held-out emoji per seed (default 100).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Evaluation noise seeds.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the training run.")
    p.add_argument("--num_processes", type=int, default=2, help="Training processes (DDP over gloo when > 1).")
    p.add_argument("--grid", default=None, help="Also write the grid here (e.g. docs/images/...png).")
    p.add_argument("--skip_training", action="store_true", help="Evaluate the student already in OUTPUT_DIR/student.")
    p.add_argument("--skip_fid", action="store_true", help="Edge adherence only (no Inception).")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process.")
    p.add_argument("--quick", action="store_true", help="Smoke run: 32 rows, 2 steps, 4 eval samples, 1 seed.")
    args = parse_with_train_args(p, argv)
    if args.max_train_steps is None:
        args.max_train_steps = 2 if args.quick else 300
    if args.num_eval_samples is None:
        args.num_eval_samples = 4 if args.quick else 100
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


def build_dataset(output_dir: str, limit: int | None):
    """The relaid emoji dataset with a `conditioning_image` column (their edge maps, white on black), saved with
    save_to_disk."""
    import datasets

    from diffusers_sprint.evaluation.edges import edge_images, edge_maps
    from diffusers_sprint.toy import load_emoji_dataset
    from diffusers_sprint.toy.layout import relaid_images

    dataset = load_emoji_dataset(resolution=RESOLUTION, limit=limit)
    images = relaid_images(list(dataset["image"]), range(dataset.num_rows))
    features = dataset.features.copy()
    features["conditioning_image"] = datasets.Image()
    columns = {name: dataset[name] for name in dataset.column_names}
    columns.update(image=images, conditioning_image=edge_images(edge_maps(images)))
    dataset = datasets.Dataset.from_dict(columns, features=features)
    path = os.path.join(output_dir, "dataset")
    dataset.save_to_disk(path)
    return dataset, path


def training_command(args, dataset_dir: str, student_dir: str) -> list[str]:
    from diffusers_sprint.toy import TOY_CONTROLNET_PATH, TOY_TEACHER_PATH

    recipe = list(TOY_RECIPE)
    batch = 4 if args.quick else 16
    per_process = max(1, batch // args.num_processes)
    recipe[recipe.index("--train_batch_size") + 1] = str(per_process)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--num_processes", str(args.num_processes)]
    if args.num_processes > 1:
        launch += ["--multi_gpu"]
    return [
        *launch,
        TRAIN_SCRIPT,
        "--pretrained_teacher_model_name_or_path", TOY_TEACHER_PATH,
        "--controlnet_model_name_or_path", TOY_CONTROLNET_PATH,
        "--controlnet_training_mode", "joint",
        "--conditioning_image_column", "conditioning_image",
        "--dataset_name", dataset_dir,
        *recipe,
        "--max_train_steps", str(args.max_train_steps),
        "--tangent_warmup_steps", str(max(1, args.max_train_steps // 5)),
        "--seed", str(args.seed),
        "--output_dir", student_dir,
        *args.train_args,
    ]  # fmt: skip


def run_training(command: list[str], num_processes: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"  # MULTI_CPU: DDP over gloo (docs/DESIGN section 7)
    print("$ " + shlex.join(command), flush=True)
    if subprocess.run(command, env=env, cwd=REPO_ROOT).returncode != 0:
        sys.exit("Training failed; see its log above.")


def student_images(pipe, prompts, controls, seed: int, steps: int, scale: float = 1.0, batch_size: int = 100):
    """`SanaSprintControlNetPipeline` samples at the toy's defaults (`diffusers_sprint.toy.protocol.generate`), a
    chunk of prompts with its control images at a time; image i uses the generator `seed * SEED_STRIDE + i`."""
    extra = {"intermediate_timesteps": TWO_STEP_INTERMEDIATE_TIME} if steps == 2 else {}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        images += generate(
            pipe,
            chunk,
            seed,
            batch_size=len(chunk),
            seed_base=start,  # the chunk's first image index
            control_image=controls[start : start + len(chunk)],
            controlnet_conditioning_scale=scale,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            **extra,
        )
    return images


def save_grid(columns: dict, path: str, scale: int = 3) -> None:
    """One row per entry of `columns` (condition, teacher, students), one column per grid emoji, with labels."""
    from PIL import Image, ImageDraw, ImageFont

    cell, gap, left = RESOLUTION * scale, 2 * scale, 120
    font = ImageFont.load_default(size=13)
    count = len(next(iter(columns.values())))
    grid = Image.new("RGB", (left + count * cell, len(columns) * (cell + gap) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for row, (title, images) in enumerate(columns.items()):
        y = row * (cell + gap)
        for line, text in enumerate(title.split("\n")):
            draw.text((6, y + cell // 2 - 16 + 15 * line), text, fill="black", font=font)
        for i, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left + i * cell, y))
    grid.save(path)


def summarize(scores: list[dict]) -> dict:
    summary = {"per_seed": scores}
    for key in ("f1", "precision", "recall", "l1", "fid"):
        values = [s[key] for s in scores if key in s]
        if values:
            summary[f"{key}_mean"] = float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers_sprint import SanaSprintControlNetPipeline
    from diffusers_sprint.evaluation.edges import edge_adherence, edge_images, edge_maps
    from diffusers_sprint.toy import TOY_CONTROLNET_PATH, TOY_TEACHER_PATH

    os.makedirs(args.output_dir, exist_ok=True)
    student_dir = os.path.join(args.output_dir, "student")
    wall, start = {}, time.perf_counter()
    print(f"[1/4] Emoji dataset at {RESOLUTION} px with edge-map control images", flush=True)
    dataset, dataset_dir = build_dataset(args.output_dir, 32 if args.quick else None)
    command = training_command(args, dataset_dir, student_dir)
    t0 = time.perf_counter()
    if args.skip_training:
        print(f"[2/4] Skipping training: evaluating {student_dir}", flush=True)
    else:
        print(f"[2/4] Distilling teacher + ControlNet: {args.max_train_steps} iterations, joint", flush=True)
        run_training(command, args.num_processes)
    wall["training"] = time.perf_counter() - t0

    print("[3/4] Sampling held-out emoji: teacher 20 steps vs student 1, 2, 4 steps", flush=True)
    t0 = time.perf_counter()
    teacher = ToyControlNetTeacher(TOY_TEACHER_PATH, TOY_CONTROLNET_PATH)
    teacher.pipe.set_progress_bar_config(disable=True)
    student = SanaSprintControlNetPipeline.from_pretrained(student_dir)
    student.set_progress_bar_config(disable=True)
    full = dataset.num_rows == 1628
    rows = held_out_rows(dataset.num_rows, args.num_eval_samples) if full else list(range(args.num_eval_samples))
    prompts = [dataset[i]["caption"] for i in rows]
    edges = edge_maps([dataset[i]["image"] for i in rows])
    controls = edge_images(edges)
    sample = dict(steps=TEACHER_STEPS, guidance_scale=GUIDANCE_SCALE)  # the teacher's
    samplers = {f"teacher-{TEACHER_STEPS}": None, **{f"student-{k}": k for k in STUDENT_STEPS}}
    edge_only = {"teacher-20 without ControlNet": None, "student-1 at controlnet_conditioning_scale 0": 1}
    images = {name: {} for name in [*samplers, *edge_only]}
    seconds = {}
    for name in images:
        t1 = time.perf_counter()
        for seed in args.seeds:
            if name.startswith("teacher"):
                images[name][seed] = teacher_images(teacher, prompts, edges, seed, "without" not in name, **sample)
            else:
                steps = int(name.split("-")[1].split()[0])
                scale = 0.0 if "scale 0" in name else 1.0
                images[name][seed] = student_images(student, prompts, controls, seed, steps, scale)
        seconds[name] = (time.perf_counter() - t1) / (len(args.seeds) * len(prompts))
        print(f"      {name}: {seconds[name] * 1000:.1f} ms/image", flush=True)
    wall["sampling"] = time.perf_counter() - t0

    print(f"[4/4] Edge adherence{'' if args.skip_fid else ' and FID'}, {len(rows)} emoji x {len(args.seeds)} seeds")
    t0 = time.perf_counter()
    reference = None
    if not args.skip_fid:
        from diffusers_sprint.evaluation import fid_from_features, inception_features
        from diffusers_sprint.toy import emoji_reference_features

        reference = emoji_reference_features(num_images=1024) if full else inception_features(list(dataset["image"]))
    report = {}
    for name, per_seed in images.items():
        scores = []
        for seed, generated in per_seed.items():
            score = {"seed": seed, **edge_adherence(generated, edges)}
            if reference is not None and name in samplers:
                score["fid"] = fid_from_features(inception_features(generated), reference)
            scores.append(score)
        report[name] = {**summarize(scores), "seconds_per_image": round(seconds[name], 5)}
    teacher_row = report[f"teacher-{TEACHER_STEPS}"]
    for row in report.values():
        row["f1_ratio_to_teacher"] = round(row["f1_mean"] / teacher_row["f1_mean"], 4)
        if "fid_mean" in row:
            row["fid_ratio_to_teacher"] = round(row["fid_mean"] / teacher_row["fid_mean"], 4)
    wall["metrics"] = time.perf_counter() - t0

    by_name = {n: i for i, n in enumerate(dataset["name"])}
    grid_rows = [by_name[n] for n in GRID_NAMES if n in by_name] or list(range(min(6, dataset.num_rows)))
    grid_prompts = [dataset[i]["caption"] for i in grid_rows]
    grid_edges = edge_maps([dataset[i]["image"] for i in grid_rows])
    grid_controls = edge_images(grid_edges)
    columns = {"condition": grid_controls, "teacher\n20 steps, CFG": None}
    columns["teacher\n20 steps, CFG"] = teacher_images(teacher, grid_prompts, grid_edges, 0, True, **sample)
    for k in STUDENT_STEPS:
        columns[f"student\n{k} step{'s' * (k > 1)}"] = student_images(student, grid_prompts, grid_controls, 0, k)
    grid_path = os.path.join(args.output_dir, "grid.png")
    save_grid(columns, grid_path)
    if args.grid:
        save_grid(columns, args.grid)
    wall["total"] = time.perf_counter() - start

    metrics = {
        "samplers": report,
        "num_eval_samples_per_seed": len(rows),
        "seeds": args.seeds,
        "eval_rows": "held out from the FID reference" if full else "the first rows (--quick)",
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "training_command": shlex.join(command),
        "student_dir": os.path.abspath(student_dir),
        "grid": os.path.abspath(grid_path),
    }
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    print(f"\n{'sampler':<44} {'edge F1':>15} {'F1/teacher':>10} {'FID':>15} {'FID/teacher':>11}")
    for name, row in report.items():
        f1 = f"{row['f1_mean']:.3f} ± {row['f1_std']:.3f}"
        fid = f"{row['fid_mean']:.1f} ± {row['fid_std']:.1f}" if "fid_mean" in row else "-"
        ratio = f"{row['fid_ratio_to_teacher']:.3f}" if "fid_ratio_to_teacher" in row else "-"
        print(f"{name:<44} {f1:>15} {row['f1_ratio_to_teacher']:>10.3f} {fid:>15} {ratio:>11}")
    print(f"(mean ± std over seeds {args.seeds}; {len(rows)} emoji per seed)")
    print(f"Wall time {wall['total']:.0f}s (training {wall['training']:.0f}s); metrics -> {args.output_dir}")
    print(f"The student is a SanaSprintControlNetPipeline folder: {os.path.abspath(student_dir)}")
    return metrics


if __name__ == "__main__":
    main()
