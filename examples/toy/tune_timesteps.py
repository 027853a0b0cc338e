#!/usr/bin/env python
"""Tune the `make demo` student's 2-, 3- and 4-step time grids with `diffusers_sprint.tune_timesteps`, offline.

    python examples/toy/demo.py --output_dir demo-output                 # trains the student (~10 min)
    python examples/toy/tune_timesteps.py --student demo-output/student --json tuned.json

Protocol (docs/demo.md, "Tuned time grids"): the search scores grids on TUNING prompts, the captions of the dataset
rows outside the demo's FID reference (604 rows), with the emoji classifier's Fréchet distance to those rows' real
images (fast). The tuned and the default grids are then compared on HELD-OUT prompts, the demo's evaluation protocol
(captions of the 1,024 FID-reference rows, Inception FID against their features), which the search never saw.
Defaults: diffusers' 2-step grid `[1.5708, 1.3]` and the demo's `[1.5708, 0.9]`; evenly spaced 3 and 4 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

# demo.py (beside this script) sets the HF offline variables when imported, before anything reads them.
from demo import GUIDANCE_SCALE, MAX_SEQUENCE_LENGTH, RESOLUTION

from diffusers_sprint import SanaSprintPipeline, TrigFlowScheduler, tune_timesteps
from diffusers_sprint.toy.protocol import FID_REFERENCE_IMAGES, generate


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="The student pipeline folder (demo-output/student).")
    parser.add_argument("--max_steps", type=int, default=4, help="Tune grids of 2 .. max_steps steps (default 4).")
    parser.add_argument("--num_tune_prompts", type=int, default=160, help="Tuning prompts (default 160 of 604).")
    parser.add_argument("--num_eval_samples", type=int, default=300, help="Held-out images per grid (default 300).")
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[1], help="Held-out noise seeds (default 1).")
    parser.add_argument("--grid_size", type=int, default=6, help="Candidates per search round (default 6).")
    parser.add_argument("--refinements", type=int, default=1, help="Refinement rounds (default 1).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--json", default=None, metavar="PATH", help="Write grids, scores and the search table.")
    return parser.parse_args(argv)


def call_kwargs(pipe) -> dict:
    guidance = GUIDANCE_SCALE if pipe.transformer.config.guidance_embeds else None
    return dict(
        height=RESOLUTION,
        width=RESOLUTION,
        guidance_scale=guidance,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        use_resolution_binning=False,
        complex_human_instruction=None,
    )


def default_grids(max_steps: int) -> dict[str, list[float]]:
    grids = {"diffusers-2": [1.57080, 1.3], "demo-2": [1.57080, 0.9]}
    scheduler = TrigFlowScheduler()
    for steps in range(3, max_steps + 1):
        scheduler.set_timesteps(steps)
        grids[f"default-{steps}"] = [round(t, 5) for t in scheduler.timesteps[:-1].tolist()]
    return grids


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from diffusers_sprint.evaluation import fid_from_features, inception_features
    from diffusers_sprint.evaluation.fid import reference_indices
    from diffusers_sprint.toy import emoji_reference_features, load_emoji_dataset
    from diffusers_sprint.toy.classifier import classifier_features, load_classifier

    pipe = SanaSprintPipeline.from_pretrained(args.student)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_emoji_dataset(resolution=RESOLUTION)
    reference_rows = [int(i) for i in reference_indices(dataset.num_rows, FID_REFERENCE_IMAGES)]
    reference_set = set(reference_rows)
    tune_rows = [i for i in range(dataset.num_rows) if i not in reference_set]
    tune_rows = [tune_rows[i] for i in np.random.default_rng(0).permutation(len(tune_rows))[: args.num_tune_prompts]]
    tune_prompts = [dataset[i]["caption"] for i in tune_rows]

    # Tuning score: classifier Fréchet distance to the real images of the tuning rows.
    classifier = load_classifier()
    tune_reference = classifier_features([dataset[i]["image"] for i in tune_rows], classifier)

    def score(images, prompts):
        return fid_from_features(classifier_features(images, classifier), tune_reference)

    start = time.perf_counter()
    result = tune_timesteps(
        pipe,
        tune_prompts,
        score,
        args.max_steps,
        grid_size=args.grid_size,
        refinements=args.refinements,
        **call_kwargs(pipe),
    )
    search_seconds = time.perf_counter() - start
    print(f"search: {len(result.table)} grids in {search_seconds:.0f} s", flush=True)
    for steps, grid in result.schedules.items():
        print(f"  {steps} step(s): {[round(t, 4) for t in grid]}  classifier FD {result.scores[steps]:.3f}")

    # Held-out: the demo's evaluation protocol, Inception FID against the reference rows.
    reference = emoji_reference_features(resolution=RESOLUTION, num_images=FID_REFERENCE_IMAGES)
    grids = default_grids(args.max_steps)
    grids.update({f"tuned-{steps}": grid for steps, grid in result.schedules.items() if steps >= 2})
    held_out = {}
    for name, grid in grids.items():
        fids = []
        for seed in args.eval_seeds:
            order = np.random.default_rng(seed).permutation(len(reference_rows))[: args.num_eval_samples]
            prompts = [dataset[reference_rows[i]]["caption"] for i in order]
            images = generate(pipe, prompts, seed, timesteps=grid, **call_kwargs(pipe))
            fids.append(fid_from_features(inception_features(images), reference))
        held_out[name] = dict(timesteps=[round(t, 5) for t in grid], fid=float(np.mean(fids)), fid_per_seed=fids)
        print(f"  held-out {name:12s} FID {held_out[name]['fid']:.2f}  {held_out[name]['timesteps']}", flush=True)

    print("\n| steps | default grid | default FID | tuned grid | tuned FID | tuned / default |")
    print("|---:|---|---:|---|---:|---:|")
    for steps in range(2, args.max_steps + 1):
        for default in [k for k in grids if k.endswith(f"-{steps}") and not k.startswith("tuned")]:
            tuned = held_out[f"tuned-{steps}"]
            base = held_out[default]
            print(
                f"| {steps} | {default} {base['timesteps']} | {base['fid']:.2f} | {tuned['timesteps']} "
                f"| {tuned['fid']:.2f} | {tuned['fid'] / base['fid']:.3f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args),
                    search_seconds=search_seconds,
                    tuned=result.schedules,
                    tuning_scores=result.scores,
                    table=result.table,
                    held_out=held_out,
                ),
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
