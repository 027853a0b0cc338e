"""The emoji-toy protocol: sample a pipeline on dataset prompts over several seeds; FID + prompt adherence each seed.

    from diffusers_sprint.toy.protocol import evaluate_pipeline
    report = evaluate_pipeline(pipe, seeds=(0, 1, 2), num_inference_steps=20, guidance_scale=4.5)

Protocol (docs/toy.md): one image per prompt for `prompts` (default: all 1,628 captions), image i of seed k drawn
with `torch.Generator().manual_seed(k * 100_000 + i)`; FID against the Inception features of the whole dataset
(cached); prompt adherence with the shipped category classifier. FID at this sample count is biased upwards and
noisy: report the mean and spread over seeds, and compare only runs with the same prompts and counts.

Tuning and held-out splits ([`evaluation_set`], docs/toy.md "Protocols"): every choice (recipe, time grids,
checkpoints) is made on the `"tuning"` split, numbers are reported on the `"held_out"` split. They share no prompt
and no noise seed:

- `"tuning"`: captions of the FID-reference rows (`reference_indices(1628, 1024)`), noise seeds `k * 100_000 + i`.
  This is the set the demo reported on before the split, on which its recipe and 2-step time were chosen.
- `"held_out"`: captions of the other 604 rows (their images are not in the FID reference), noise seeds
  `1_000_000_000 + k * 100_000 + i`.

Both splits draw `count` rows with `numpy.random.default_rng(k)` (a permutation of the split's rows, cycled when
`count` exceeds them). The prompts are held out from the evaluation choices, not from training: the teacher and every
student train on all captions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


SEED_STRIDE = 100_000
FID_REFERENCE_IMAGES = 1024
SPLITS = ("tuning", "held_out")
SPLIT_SEED_BASES = {"tuning": 0, "held_out": 1_000_000_000}
"""First noise seed of each split: image i of evaluation seed k uses `base + k * SEED_STRIDE + i`."""


def split_rows(split: str, num_rows: int, num_reference: int | None = FID_REFERENCE_IMAGES) -> list[int]:
    """Dataset rows of `split`: the FID-reference rows (`"tuning"`) or all the others (`"held_out"`), sorted.

    `num_reference=None` or `>= num_rows` (e.g. a 32-row smoke run) takes half the rows as the reference, so that
    both splits are non-empty."""
    from ..evaluation.fid import reference_indices

    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    if num_reference is None or num_reference >= num_rows:
        num_reference = num_rows // 2
    reference = set(int(i) for i in reference_indices(num_rows, num_reference))
    return sorted(reference) if split == "tuning" else [i for i in range(num_rows) if i not in reference]


class EvaluationSet(NamedTuple):
    """Which dataset rows give the prompts and which generator seed each image uses."""

    split: str
    seed: int
    rows: list[int]
    noise_seeds: list[int]


def evaluation_set(
    split: str, count: int, seed: int, num_rows: int, num_reference: int | None = FID_REFERENCE_IMAGES
) -> EvaluationSet:
    """`count` prompts (dataset rows) of `split` drawn with `seed`, and their noise seeds (module docstring)."""
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}.")
    rows = split_rows(split, num_rows, num_reference)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-count // len(rows)))])
    base = SPLIT_SEED_BASES[split] + seed * SEED_STRIDE
    return EvaluationSet(split, seed, [rows[int(i)] for i in order[:count]], [base + i for i in range(count)])


def dataset_prompts(stride: int = 1, offset: int = 0) -> list[str]:
    """Captions of the emoji dataset in dataset order (every `stride`-th from `offset`)."""
    from .emoji import CAPTION_TEMPLATE, emoji_records

    return [CAPTION_TEMPLATE.format(name=r["name"]) for r in emoji_records()][offset::stride]


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int, batch_size: int = 64, seed_base: int = 0, **call_kwargs) -> list:
    """PIL images, one per prompt; image i uses generator seed `seed_base + seed * 100_000 + i` (independent of
    batching; `seed_base` is `SPLIT_SEED_BASES[split]`).

    Defaults for the 32 px toy (overridable by `call_kwargs`): no resolution binning, no Sana prompt instruction."""
    defaults = {"height": 32, "width": 32}
    if "Sana" in type(pipe).__name__:
        defaults.update(use_resolution_binning=False, complex_human_instruction=None)
    kwargs = {**defaults, **call_kwargs}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [
            torch.Generator().manual_seed(seed_base + seed * SEED_STRIDE + start + i) for i in range(len(chunk))
        ]
        images.extend(pipe(chunk, generator=generators, **kwargs).images)
    return images


def evaluate_images(images_per_seed: dict, prompts: Sequence[str], reference_features: np.ndarray) -> dict:
    """FID (vs `reference_features`) and prompt adherence for {seed: images}; adds mean / std over seeds."""
    from ..evaluation.fid import fid_from_features, inception_features
    from .classifier import load_classifier, prompt_adherence

    classifier = load_classifier()
    per_seed = {}
    for seed, images in images_per_seed.items():
        per_seed[seed] = {
            "fid": fid_from_features(inception_features(images), reference_features),
            "prompt_adherence": prompt_adherence(images, prompts, classifier),
        }
    fids = np.array([v["fid"] for v in per_seed.values()])
    adherence = np.array([v["prompt_adherence"] for v in per_seed.values()])
    return {
        "num_samples_per_seed": len(prompts),
        "num_reference": len(reference_features),
        "seeds": list(per_seed),
        "per_seed": per_seed,
        "fid_mean": float(fids.mean()),
        "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
        "prompt_adherence_mean": float(adherence.mean()),
        "prompt_adherence_std": float(adherence.std(ddof=1)) if len(adherence) > 1 else 0.0,
    }


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    reference_features: np.ndarray | None = None,
    batch_size: int = 64,
    **call_kwargs,
) -> dict:
    """Sample `pipe` on `prompts` for each seed and score it (see the module docstring for the protocol)."""
    prompts = list(prompts) if prompts is not None else dataset_prompts()
    if reference_features is None:
        reference_features = emoji_reference_features()
    start = time.time()
    images = {seed: generate(pipe, prompts, seed, batch_size=batch_size, **call_kwargs) for seed in seeds}
    sampling_seconds = time.time() - start
    report = evaluate_images(images, prompts, reference_features)
    report["sampling_seconds"] = sampling_seconds
    report["call_kwargs"] = {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))}
    return report


def emoji_reference_features(
    resolution: int = 32, num_images: int | None = None, cache_dir: str | None = None, **dataset_kwargs
) -> np.ndarray:
    """Inception features of the emoji dataset, cached as .npy: all 1,628 images (~4.5 min on 2 busy CPU cores) or
    the fixed subset `reference_indices(1628, num_images)`, in dataset order.

    `cache_dir` defaults to `$DIFFUSERS_SPRINT_CACHE` or `~/.cache/diffusers_sprint`; pass `cache_dir=""` to skip.
    """
    from ..evaluation.fid import inception_features, reference_indices
    from .emoji import load_emoji_dataset

    if cache_dir is None:
        cache_dir = os.environ.get(
            "DIFFUSERS_SPRINT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusers_sprint")
        )
    options = dict(dataset_kwargs, **({"n": num_images} if num_images is not None else {}))
    key = "_".join(f"{k}-{v}" for k, v in sorted(options.items())).replace(" ", "")
    path = (
        os.path.join(cache_dir, f"inception_emoji_{resolution}px{'_' + key if key else ''}.npy") if cache_dir else None
    )
    if path and os.path.isfile(path):
        return np.load(path)
    dataset = load_emoji_dataset(resolution=resolution, **dataset_kwargs)
    rows = reference_indices(dataset.num_rows, num_images)
    features = inception_features([dataset[int(i)]["image"] for i in rows])
    if path:  # write-then-rename: concurrent runs never read a half-written file
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial.npy"
        np.save(partial, features)
        os.replace(partial, path)
    return features
