#!/usr/bin/env python
"""The paper's Table 3 ablation on the emoji toy: sCM only / LADD only / sCM + LADD, and sCM + LADD without max-time
weighting, without the CFG embedding, or as the demo runs it (the official separate calls: D at chance).

    python benchmarks/ablation_toy.py                         # 6 variants x 3 seeds, ~1.5 hours on 2 CPU cores
                                                              # (--jobs 2: two runs at a time, 1 thread each)
    python benchmarks/ablation_toy.py --variants scm scm_ladd --seeds 0 --max_train_steps 50   # a quick look

Every run is `make demo` (examples/toy/demo.py) with one training flag changed, so each variant gets the demo's
recipe, step count, sample count and metrics: FID (standard Inception) of the 1- and 2-step student against the
dataset, the teacher's 20-step FID on the same prompts and seeds, and the classifier's prompt adherence. Seed k
seeds both the training run and the evaluation noise. Results are written to `--results` (docs/results.md) as a
table beside the paper's numbers, with per-seed values in `--output_dir/ablation.json`, and a grid of 1-step
samples (one row per variant, seed 0) to `--grid`.

Not in CI (it trains 18 students). Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "examples", "toy", "demo.py")

# variant -> (label, training flags passed after `--` to examples/train_sana_sprint.py) on top of the demo's recipe
# (adaptive weight, 400 iterations). The LADD rows use the discriminator that learns (shared norm groups) at the
# weight chosen on the tuning split (docs/results.md, "LADD on the 15k-step teacher"); the last row is the demo's own
# LADD (the official separate calls, weight 0.5), whose discriminator stays at chance.
LEARNING_LADD = ["--discriminator_shared_norm_groups", "--adversarial_lambda", "0.03"]
VARIANTS = {
    "scm": ("sCM only", ["--adversarial_lambda", "0"]),
    "ladd": ("LADD only", [*LEARNING_LADD, "--scm_lambda", "0"]),
    "scm_ladd": ("sCM + LADD", LEARNING_LADD),
    "scm_ladd_no_max_time": ("sCM + LADD, no max-time weighting", [*LEARNING_LADD, "--max_time_probability", "0"]),
    # No guidance embedder: the student can only learn one CFG scale, the one it is evaluated at (4.5).
    "scm_ladd_no_cfg_embedding": (
        "sCM + LADD, no CFG embedding",
        [*LEARNING_LADD, "--no-guidance_embeds", "--guidance_scales", "4.5"],
    ),
    "demo": ("sCM + LADD, the demo (D at chance)", []),
}
# SANA-Sprint (arXiv 2503.09641) Table 3: FID / CLIP on MJHQ-30K, 1024 px, 0.6B, 1 step.
PAPER_TABLE_3 = {"scm": 8.93, "ladd": 12.20, "scm_ladd": 8.11}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="benchmarks/out/ablation_toy")
    parser.add_argument("--results", default="docs/results.md", help="Markdown report ('' to skip).")
    parser.add_argument("--grid", default="docs/images/ablation_toy_grid.png", help="1-step grid ('' to skip).")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Default: the demo's.")
    parser.add_argument("--num_eval_samples", type=int, default=None, help="Default: the demo's.")
    parser.add_argument(
        "--split",
        default="held_out",
        choices=("tuning", "held_out"),
        help="Evaluation split (diffusers_sprint.toy.protocol): report on held_out, choose on tuning.",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (each with --threads 1 when > 1).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 if --jobs > 1).")
    done = parser.add_mutually_exclusive_group()
    done.add_argument("--reuse", action="store_true", help="Keep runs whose metrics.json already exists.")
    done.add_argument(
        "--reevaluate",
        action="store_true",
        help="Runs whose metrics.json exists are not trained again: only the demo's evaluation re-runs on their "
        "student (after a change to the sampling or metrics), keeping the earlier training record. Missing runs "
        "are trained.",
    )
    return parser.parse_args(argv)


def run_variant(args, variant: str, seed: int) -> dict:
    out = os.path.join(args.output_dir, f"{variant}-seed{seed}")
    metrics_path = os.path.join(out, "metrics.json")
    if args.reuse and os.path.isfile(metrics_path):
        with open(metrics_path) as handle:
            return json.load(handle)
    previous = None
    if args.reevaluate and os.path.isfile(metrics_path):
        with open(metrics_path) as handle:
            previous = json.load(handle)
    command = [sys.executable, DEMO, "--output_dir", out, "--seed", str(seed), "--split", args.split]
    if previous is not None:
        command += ["--skip_training"]
    if args.max_train_steps is not None:
        command += ["--max_train_steps", str(args.max_train_steps)]
    if args.num_eval_samples is not None:
        command += ["--num_eval_samples", str(args.num_eval_samples)]
    threads = args.threads or (1 if args.jobs > 1 else None)
    if threads:
        command += ["--threads", str(threads)]
    command += ["--", *VARIANTS[variant][1]]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    log_name = "log.txt" if previous is None else "log_reevaluate.txt"
    with open(os.path.join(out, log_name), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    with open(metrics_path) as handle:
        metrics = json.load(handle)
    if previous is not None:  # the student is the earlier run's: so are its training record, time and memory
        metrics["training"] = previous["training"]
        metrics["wall_seconds"]["training"] = previous["wall_seconds"]["training"]
        metrics["peak_memory_mb"]["training_process"] = previous["peak_memory_mb"]["training_process"]
        metrics["reevaluated"] = True
        with open(metrics_path, "w") as handle:
            json.dump(metrics, handle, indent=2)
    print(f"  {variant} seed {seed}: {time.perf_counter() - start:.0f}s", flush=True)
    return metrics


def summarize(runs: dict) -> dict:
    """{variant: {sampler: {fid_mean, fid_std, ratio_mean, adherence_mean, per_seed_fid}}}"""
    summary = {}
    for variant, by_seed in runs.items():
        rows = {}
        for sampler in ("teacher-20", "student-1", "student-2", "student-4"):
            fids = np.array([m["samplers"][sampler]["fid"] for m in by_seed.values()], dtype=float)
            ratios = np.array([m["samplers"][sampler]["fid_ratio_to_teacher"] for m in by_seed.values()], dtype=float)
            adherence = np.array([m["samplers"][sampler]["adherence"] for m in by_seed.values()], dtype=float)
            rows[sampler] = {
                "fid_mean": float(fids.mean()),
                "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
                "fid_ratio_mean": float(ratios.mean()),
                "adherence_mean": float(adherence.mean()),
                "per_seed_fid": [float(f) for f in fids],
            }
        summary[variant] = rows
    return summary


def markdown(summary: dict, runs: dict, args) -> str:
    first = next(iter(next(iter(runs.values())).values()))
    count, steps = first["num_eval_samples"], first["training"]["max_train_steps"]
    two_step_grid = ", ".join(f"{t:g}" for t in first["samplers"]["student-2"]["timesteps"])
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        "| variant | 1-step FID | 1-step / teacher | 2-step FID | 2-step / teacher | 1-step adherence | "
        "paper Table 3 (1 step, FID) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rows in summary.items():
        one, two = rows["student-1"], rows["student-2"]
        paper = PAPER_TABLE_3.get(variant)
        lines.append(
            f"| {VARIANTS[variant][0]} | {one['fid_mean']:.1f} ± {one['fid_std']:.1f} | {one['fid_ratio_mean']:.2f} | "
            f"{two['fid_mean']:.1f} ± {two['fid_std']:.1f} | {two['fid_ratio_mean']:.2f} | "
            f"{one['adherence_mean']:.2f} | {paper if paper is not None else '-'} |"
        )
    # The teacher's samples depend only on the seed: the same in every variant.
    teacher = np.array(next(iter(summary.values()))["teacher-20"]["per_seed_fid"])
    adherence = np.mean([rows["teacher-20"]["adherence_mean"] for rows in summary.values()])
    lines.append(
        f"| teacher, 20 steps, CFG 4.5 | {teacher.mean():.1f} ± {teacher.std(ddof=1):.1f} | 1.00 | | | "
        f"{adherence:.2f} | 5.76-5.81 |"
    )
    table = "\n".join(lines)
    return (
        f"<!-- written by benchmarks/ablation_toy.py; seeds {seeds}; {steps} iterations; {count} samples -->\n"
        f"{table}\n\n"
        f"FID: standard Inception, {count} samples per run ({args.split} split of diffusers_sprint.toy.protocol: "
        "captions drawn by the seed, one torch.Generator per image) against the fixed 1,024-image dataset reference; "
        f"mean ± std over seeds {seeds} (each seed: its own training run and evaluation noise). {steps} distillation "
        f"iterations at batch 16 per run. 2 steps: times {two_step_grid} rad. '/ teacher': the run's FID over the "
        "teacher's FID on the "
        "same prompts and noise, averaged over seeds.\n"
    )


def write_grid(args, path: str) -> None:
    import torch
    from PIL import Image, ImageDraw, ImageFont

    sys.path.insert(0, os.path.dirname(DEMO))
    import demo  # examples/toy/demo.py

    from diffusers_sprint import SanaSprintPipeline

    seed = args.seeds[0]
    prompts = list(demo.GRID_PROMPTS)
    cell, left, pad = 96, 290, 4
    font = ImageFont.load_default(size=13)
    grid = Image.new("RGB", (left + len(prompts) * (cell + pad), len(args.variants) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for row, variant in enumerate(args.variants):
        pipe = SanaSprintPipeline.from_pretrained(os.path.join(args.output_dir, f"{variant}-seed{seed}", "student"))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images = demo.sample(pipe, "student-1", prompts, seed)
        y = row * (cell + pad)
        draw.text((6, y + cell // 2 - 8), VARIANTS[variant][0], fill="black", font=font)
        for col, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left + col * (cell + pad), y))
    grid.save(path)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]  # seed-major
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job is a subprocess
        results = list(pool.map(lambda job: run_variant(args, *job), jobs))
    runs = {variant: {} for variant in args.variants}
    for (variant, seed), metrics in zip(jobs, results):
        runs[variant][seed] = metrics
    summary = summarize(runs)
    with open(os.path.join(args.output_dir, "ablation.json"), "w") as handle:
        json.dump({"seeds": args.seeds, "summary": summary}, handle, indent=2)
    report = markdown(summary, runs, args)
    print(report)
    if args.results:
        marker = "<!-- ablation table -->"
        if os.path.isfile(args.results) and marker in open(args.results).read():
            text = open(args.results).read()
            head, _, rest = text.partition(marker)
            _, _, tail = rest.partition("<!-- end ablation table -->")
            text = f"{head}{marker}\n{report}<!-- end ablation table -->{tail}"
        else:
            text = f"# Results\n\n{marker}\n{report}<!-- end ablation table -->\n"
        with open(args.results, "w") as handle:
            handle.write(text)
        print(f"-> {args.results}")
    if args.grid:
        write_grid(args, args.grid)
        print(f"-> {args.grid}")


if __name__ == "__main__":
    main()
