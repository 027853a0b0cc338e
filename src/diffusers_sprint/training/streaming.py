"""Streaming input: a `datasets` `IterableDataset` (Hub streaming, or local WebDataset tar shards) as micro-batches.

The stream (optionally shuffled by `datasets`' shard order + buffer, seeded by `(seed, epoch)`) is cut into global
micro-batches of `batch_size` rows exactly as [`~training.data.LayoutInvariantBatchSampler`] cuts a map-style epoch:
step `k` holds global micro-batches `k * P * A ... (k + 1) * P * A - 1`, and process `p`'s micro-batch `m` is number
`m * P + p` of its step. Every process reads the whole stream (the undecoded bytes) but decodes only its own rows,
and inside a process DataLoader worker `w` of `W` decodes its micro-batches `w, w + W, ...` (the DataLoader returns
them round-robin, i.e. in order). So the batches do not depend on the process or worker count (for one global batch),
an epoch ends on the same step everywhere (a last, incomplete step is dropped), and the position is just
`(epoch, step)`: resuming reads the stream again from the epoch's start and skips the steps before the position
without decoding them. That resume is exact (the same rows, augmentations and order as the uninterrupted run) as
long as the stream itself is deterministic for a given seed and epoch (local shards, or a pinned Hub revision);
its cost is re-reading the skipped part of the epoch.
"""

import glob
import os
from collections.abc import Sequence

import torch

from .data import _draw_flip, _pick_caption, augmentation_generator, collate_examples, preprocess_image, read_image
from .seeding import derive_seed


def resolve_shards(patterns: Sequence[str]) -> list[str]:
    """Local tar shard paths from paths and globs (sorted, duplicates removed); a pattern matching nothing raises."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ValueError(f"--train_shards {pattern!r} matches no file.")
        files += [match for match in matches if match not in files]
    return files


def load_streaming_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_shards: Sequence[str] | None = None,
    cache_dir: str | None = None,
    split: str = "train",
):
    r"""
    A streaming `datasets.IterableDataset`: local WebDataset tar shards (`train_shards`, paths or globs, read by
    `datasets`' `webdataset` loader: one column per file extension of a sample, e.g. `jpg`, `txt`, `json`) or a
    dataset `datasets.load_dataset(..., streaming=True)` understands (`dataset_name`).
    """
    import datasets

    if (dataset_name is None) == (not train_shards):
        raise ValueError("Give exactly one of `dataset_name` and `train_shards` for streaming.")
    if train_shards:
        files = resolve_shards(train_shards)
        return datasets.load_dataset("webdataset", data_files={split: files}, split=split, streaming=True)
    return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=True, cache_dir=cache_dir)


def find_caption(row: dict, columns: Sequence[str]):
    r"""
    The first of `columns` present (and not `None`) in `row`; a dotted name reads into a dict column, e.g.
    `json.caption` is `row["json"]["caption"]` (WebDataset's JSON sidecar). Raises naming the columns tried.
    """
    for column in columns:
        value = row
        for part in column.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                break
        if value is not None:
            return value
    raise ValueError(f"No caption in the sample (tried {list(columns)}; its keys: {sorted(row)}).")


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    r"""
    Collated micro-batches `{"pixel_values": (B, 3, R, R), "caption": [str]}` of one process from a stream, in the
    layout-invariant order described in the module docstring. Use it in a `DataLoader(dataset, batch_size=None)`.

    Augmentations (crop, flip, caption choice) are drawn from `augmentation_generator(seed, epoch, row)`, `row` the
    position of the sample in the epoch's stream, as `ImageCaptionDataset` draws them.

    Args:
        stream: A `datasets.IterableDataset` (or any iterable of dict rows; then no shuffling).
        image_column (`str`), caption_columns (`Sequence[str]`): Columns (caption: first present, see
            [`find_caption`]).
        resolution (`int`): Output side in pixels.
        batch_size (`int`), num_processes (`int`), process_index (`int`), gradient_accumulation_steps (`int`): The
            layout.
        seed (`int`): Base seed of shuffling and augmentations.
        shuffle_buffer_size (`int`, defaults to 0): `datasets`' shuffle buffer (0: the stream's order; shards are
            then read in order too).
        center_crop (`bool`), random_flip (`bool`): As in `ImageCaptionDataset`.
    """

    def __init__(
        self,
        stream,
        image_column: str,
        caption_columns: Sequence[str],
        resolution: int,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 0,
        center_crop: bool = False,
        random_flip: bool = False,
    ):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index}.")
        if shuffle_buffer_size < 0:
            raise ValueError(f"`shuffle_buffer_size` must be >= 0, got {shuffle_buffer_size}.")
        self.stream = stream
        if hasattr(stream, "cast_column") and getattr(stream, "features", None) is not None:
            import datasets

            if isinstance(stream.features.get(image_column), datasets.Image):
                self.stream = stream.cast_column(image_column, datasets.Image(decode=False))  # decoded by us
        self.image_column = image_column
        self.caption_columns = list(caption_columns)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_batches_per_step = num_processes * gradient_accumulation_steps
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from its step `start_step` on."""
        if start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {start_step}.")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def epoch_stream(self, epoch: int):
        """The stream of `epoch`: shuffled (shard order + buffer) by `derive_seed(seed, "stream", epoch)`."""
        stream = self.stream
        if self.shuffle_buffer_size and hasattr(stream, "shuffle"):
            seed = derive_seed(self.seed, "stream", epoch) % 2**32
            stream = stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        return stream

    def steps(self, epoch: int):
        """`(step, [raw rows of the step])` for every complete step of `epoch` (no decoding)."""
        stream, group = self.epoch_stream(epoch), self.batch_size * self.micro_batches_per_step
        if hasattr(stream, "iter"):
            # `IterableDataset.iter` reads the whole stream also inside a DataLoader worker (plain iteration would
            # give each worker a share of the shards, and an order that depends on the worker count).
            for step, columns in enumerate(stream.iter(batch_size=group, drop_last_batch=True)):
                yield step, [dict(zip(columns, values)) for values in zip(*columns.values())]
            return
        rows, step = iter(stream), 0
        while len(chunk := [row for _, row in zip(range(group), rows)]) == group:
            yield step, chunk
            step += 1

    def sample(self, row: dict, epoch: int, position: int) -> dict:
        generator = augmentation_generator(self.seed, epoch, position)
        flip = _draw_flip(generator, self.random_flip)
        image = read_image(row[self.image_column], index=position)
        pixel_values = preprocess_image(image, self.resolution, self.center_crop, flip, generator)
        caption = _pick_caption(find_caption(row, self.caption_columns), generator)
        return {"pixel_values": pixel_values, "caption": caption}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, group = self.epoch, self.batch_size * self.micro_batches_per_step
        local = 0  # this process's micro-batch counter within the yielded part of the epoch
        for step, rows in self.steps(epoch):
            if step < self.start_step:
                continue
            for micro in range(self.gradient_accumulation_steps):
                if local % num_workers == worker:
                    first = (micro * self.num_processes + self.process_index) * self.batch_size
                    yield collate_examples(
                        [self.sample(rows[first + i], epoch, step * group + first + i) for i in range(self.batch_size)]
                    )
                local += 1


class StreamPosition:
    """`(epoch, step in epoch)` of a stream, checkpointed with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.epoch, self.step = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


__all__ = [
    "StreamPosition",
    "StreamingImageCaptionDataset",
    "find_caption",
    "load_streaming_dataset",
    "resolve_shards",
]
