"""Aspect-ratio buckets (multi-scale training): Sana's bins, nearest-bin assignment, a one-bin-per-step sampler.

Sana trains on images of about `resolution**2` pixels at many aspect ratios (the official `--multi_scale` with
`AspectRatioBatchSampler`). Here:

- the bins are diffusers' own tables (`ASPECT_RATIO_512_BIN`, `..._1024_BIN`, ...; other base sizes scale the
  1024 px table, see `pipelines.resolution_bins.aspect_ratio_bins`), so training and `use_resolution_binning` at
  inference agree;
- each image goes to the bin whose aspect ratio (`height / width`) is nearest its own
  (`PixArtImageProcessor.classify_height_width_bin`'s rule), and is resized to cover the bin and cropped to it
  (`training.data.preprocess_image`);
- [`AspectRatioBucketBatchSampler`] gives every optimisation step one bin: all micro-batches of all processes in the
  step share it, so DDP / FSDP2 ranks run the same shapes in lock-step. Bins are drawn in proportion to the data
  (each bin contributes as many steps per epoch as it fills), and the order is a fixed function of
  `(seed, epoch)`: deterministic, resumable from any step, and the same for every process layout with the same global
  batch (as [`~training.data.LayoutInvariantBatchSampler`]).
"""

from collections.abc import Hashable, Sequence

import torch
from diffusers.image_processor import PixArtImageProcessor

from ..pipelines.resolution_bins import aspect_ratio_bins
from .data import StepGroupBatchSampler, read_image_size
from .seeding import make_generator


def training_bins(resolution: int, multiple_of: int) -> dict[str, tuple[int, int]]:
    r"""
    `{aspect_ratio: (height, width)}` bins of about `resolution**2` pixels, sides multiples of `multiple_of` (VAE
    scale x patch size). Ratios whose sizes collapse onto the same `(height, width)` after rounding (small base sizes)
    keep the one nearest to the true ratio of that size.
    """
    if resolution < multiple_of or resolution % multiple_of:
        raise ValueError(f"`resolution` must be a positive multiple of {multiple_of}, got {resolution}.")
    bins = {}
    for ratio, (height, width) in aspect_ratio_bins(resolution, multiple_of).items():
        size = (int(height), int(width))
        previous = next((key for key, value in bins.items() if value == size), None)
        if previous is not None:
            true_ratio = size[0] / size[1]
            if abs(float(ratio) - true_ratio) >= abs(float(previous) - true_ratio):
                continue
            del bins[previous]
        bins[ratio] = size
    return dict(sorted(bins.items(), key=lambda item: float(item[0])))


def nearest_bin(height: int, width: int, bins: dict[str, Sequence[int]]) -> tuple[int, int]:
    """The `(height, width)` of the bin whose aspect ratio is nearest `height / width` (diffusers' rule)."""
    if height < 1 or width < 1:
        raise ValueError(f"An image needs a positive size, got {height} x {width}.")
    binned = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)
    return int(binned[0]), int(binned[1])


def image_size(source, index: int | None = None) -> tuple[int, int]:
    r"""
    `(height, width)` of an image without decoding its pixels (only the header is read): a PIL image, a path, encoded
    bytes or a `datasets` image dict (`{"bytes", "path"}`). An unreadable image (junk bytes, a decompression-bomb
    header, a missing file) raises the [`~training.data.InvalidImageError`] of `training.data.read_image`, naming the
    dataset row `index` and the file.
    """
    return read_image_size(source, index)


def assign_buckets(sizes: Sequence[tuple[int, int]], bins: dict[str, Sequence[int]]) -> list[tuple[int, int]]:
    """The nearest bin `(height, width)` of every `(height, width)` in `sizes`."""
    return [nearest_bin(height, width, bins) for height, width in sizes]


class AspectRatioBucketBatchSampler(StepGroupBatchSampler):
    r"""
    Batches of `(epoch, index)` keys for one process; every optimisation step draws all its samples from one bucket.

    Per epoch, the samples of each bucket are permuted (`derive_seed(seed, "bucket_order", epoch, bucket)`) and cut
    into *step groups* of `batch_size * num_processes * gradient_accumulation_steps` samples (a bucket's remainder that
    does not fill a group is dropped for that epoch; a new permutation next epoch drops other samples). The step
    groups of all buckets are then permuted together (`derive_seed(seed, "bucket_steps", epoch)`): a bucket holding a
    fraction `f` of the data takes about `f` of the steps, in an order that does not depend on the process layout.
    Inside a step group, micro-batch `m` of process `p` is global micro-batch `m * num_processes + p` (as in
    [`~training.data.LayoutInvariantBatchSampler`]), so 1 process x accumulation 2 and 2 processes x 1 see the same
    micro-batches, and every process is in the same bucket at every step.

    Args:
        buckets (`Sequence[Hashable]`): The bucket of every sample, e.g. its bin `(height, width)`
            ([`assign_buckets`]). Buckets are ordered by `sorted`, so they must be comparable.
        batch_size (`int`): Samples per micro-batch (per process).
        num_processes (`int`, defaults to 1), process_index (`int`, defaults to 0): The data-parallel layout.
        gradient_accumulation_steps (`int`, defaults to 1): Micro-batches per process and step.
        seed (`int`, defaults to 0): Base seed of the orders.
        shuffle (`bool`, defaults to `True`): Permute within buckets and the step order; without it, the buckets'
            steps come in sorted bucket order, samples in index order.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(batch_size, num_processes, process_index, gradient_accumulation_steps, seed, shuffle)
        if len(buckets) == 0:
            raise ValueError("`buckets` is empty: the dataset has no samples.")
        members: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            members.setdefault(bucket, []).append(index)
        self.bucket_names = sorted(members)
        self.bucket_members = [members[name] for name in self.bucket_names]
        self.steps_per_bucket = [len(m) // self.group_size for m in self.bucket_members]
        self.steps_per_epoch = sum(self.steps_per_bucket)
        self.num_samples = len(buckets)
        self.dropped_per_epoch = self.num_samples - self.steps_per_epoch * self.group_size
        if self.steps_per_epoch == 0:
            counts = ", ".join(f"{name}: {len(m)}" for name, m in zip(self.bucket_names, self.bucket_members))
            raise ValueError(
                f"No aspect-ratio bucket fills one step's global batch of {self.group_size} samples (batch_size "
                f"{batch_size} x {num_processes} processes x {gradient_accumulation_steps} accumulation steps); "
                f"samples per bucket: {counts}."
            )

    def epoch_steps(self, epoch: int) -> list[tuple[Hashable, list[int]]]:
        """`[(bucket, sample indices of the step group)]` for every step of `epoch`, in order."""
        groups = []
        for position, (name, indices) in enumerate(zip(self.bucket_names, self.bucket_members)):
            if self.shuffle:
                generator = make_generator(self.seed, "bucket_order", epoch, position)
                order = torch.randperm(len(indices), generator=generator)
                indices = [indices[i] for i in order.tolist()]
            for step in range(self.steps_per_bucket[position]):
                groups.append((name, indices[step * self.group_size : (step + 1) * self.group_size]))
        if self.shuffle:
            order = torch.randperm(len(groups), generator=make_generator(self.seed, "bucket_steps", epoch))
            groups = [groups[i] for i in order.tolist()]
        return groups

    def step_buckets(self, epoch: int) -> list[Hashable]:
        """The bucket of every step of `epoch` (the same on every process)."""
        return [name for name, _ in self.epoch_steps(epoch)]

    def step_groups(self, epoch: int) -> list[list[int]]:
        return [group for _, group in self.epoch_steps(epoch)]


__all__ = [
    "AspectRatioBucketBatchSampler",
    "assign_buckets",
    "image_size",
    "nearest_bin",
    "training_bins",
]
