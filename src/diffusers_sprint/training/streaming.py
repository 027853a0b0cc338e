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

Local shards are checked before anything is read ([`check_shards`]): `datasets`' reader stops silently at the cut of
a truncated tar, so a shard that is empty, not a tar archive, cut short, or holds a text member that does not decode
fails at start naming it (or, with `skip_bad_shards`, is left out with a warning naming it). The checked shard list
(paths and sizes) is part of the checkpointed [`StreamPosition`], and a resume over another list is refused.
"""

import bz2
import glob
import gzip
import logging
import lzma
import os
import tarfile
import zlib
from collections.abc import Sequence

import torch

from .data import (
    _draw_flip,
    _pick_caption,
    augmentation_generator,
    check_metadata_files,
    collate_examples,
    preprocess_image,
    read_image,
)
from .seeding import derive_seed


logger = logging.getLogger(__name__)

_TAR_BLOCK = tarfile.BLOCKSIZE
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}
# the members `datasets`' webdataset reader decodes as text / JSON / int: checked at start (cheap: small files)
_TEXT_EXTENSIONS = ("txt", "text", "transcript", "json", "jsn", "cls", "cls2", "index", "inx", "id")


def resolve_shards(patterns: Sequence[str]) -> list[str]:
    """Local tar shard paths from paths and globs (sorted, duplicates removed); a pattern matching nothing raises."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ValueError(f"--train_shards {pattern!r} matches no file.")
        files += [match for match in matches if match not in files]
    return files


def _text_member_problem(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    """Why a text member (`.txt`, `.json`, ...) does not decode as `datasets`' webdataset reader decodes it."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    extension = member.name.rsplit(".", 1)[-1].lower()
    if not (member.isfile() and extension in _TEXT_EXTENSIONS):
        return None
    try:
        WebDataset.DECODERS[extension](tar.extractfile(member).read())
    except ValueError as error:  # UnicodeDecodeError, JSONDecodeError, int("x")
        return f"member {member.name!r} does not decode as .{extension}: {type(error).__name__}: {error}"
    return None


def shard_problem(path: str) -> str | None:
    r"""
    Why the WebDataset tar shard `path` cannot be read in full, or `None` when it can. Reads the member headers (a
    seek per member) and checks that every member's data lies inside the file and that the end-of-archive block
    follows the last member (a tar cut at a member boundary otherwise looks complete), and decodes the text members
    `datasets` decodes (`.txt`, `.json`, ...: UTF-8 / JSON / int). A compressed tar (`.tar.gz`, `.bz2`, `.xz`) is
    decompressed on the way (a cut stream fails).
    """
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as file:
        magic = file.read(6)
    opener = next((o for prefix, o in _DECOMPRESSORS.items() if magic.startswith(prefix)), open)
    try:
        with opener(path, "rb") as file:
            return _tar_problem(file, size if opener is open else None)
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as error:  # a cut or damaged compressed stream
        return f"it is truncated or damaged: {type(error).__name__}: {error}"


def _tar_problem(file, size: int | None) -> str | None:
    """[`shard_problem`] of an open tar stream; `size` is the file's (`None` when decompressed on the fly)."""
    try:
        tar = tarfile.open(fileobj=file, mode="r:")
    except tarfile.TarError as error:
        return f"it is not a tar archive ({error})"
    end, count = 0, 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as error:
            return f"it is truncated or damaged after its member {count} ({error})"
        if member is None:
            break
        count += 1
        end = member.offset_data + member.size
        if size is not None and end > size:
            return f"it is truncated: member {member.name!r} ends at byte {end}, the file has {size} bytes"
        if problem := _text_member_problem(tar, member):
            return problem
        end += -end % _TAR_BLOCK
    file.seek(end)
    block = file.read(_TAR_BLOCK)
    if len(block) < _TAR_BLOCK or block.strip(b"\0"):
        total = f"{size}" if size is not None else "the decompressed stream"
        return f"it is truncated: no end-of-archive block after its {count} members (at byte {end} of {total})"
    return None


def check_shards(files: Sequence[str], skip_bad_shards: bool = False) -> list[dict]:
    r"""
    Check every WebDataset shard ([`shard_problem`]) and return `[{"path", "size"}]` of those to read, in order.

    Args:
        files (`Sequence[str]`): Shard paths ([`resolve_shards`]).
        skip_bad_shards (`bool`, defaults to `False`): Leave unreadable shards out with one warning naming each and
            the count, instead of raising a `ValueError` that names them.
    """
    good, bad = [], []
    for path in files:
        problem = shard_problem(path)
        if problem is None:
            good.append({"path": path, "size": os.path.getsize(path)})
        else:
            bad.append(f"{path}: {problem}")
    if bad:
        listing = "\n".join(f"  {line}" for line in bad)
        if not skip_bad_shards or not good:
            raise ValueError(
                f"{len(bad)} of {len(files)} WebDataset shards (--train_shards) cannot be read in full:\n{listing}\n"
                "Repair or remove them, or leave them out with `skip_bad_shards`."
            )
        logger.warning(f"Skipping {len(bad)} of {len(files)} WebDataset shards (`skip_bad_shards`):\n{listing}")
    return good


def load_streaming_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_shards: Sequence[str] | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    skip_bad_shards: bool = False,
    shards: Sequence[dict] | None = None,
):
    r"""
    A streaming `datasets.IterableDataset`: local WebDataset tar shards (`train_shards`, paths or globs, read by
    `datasets`' `webdataset` loader: one column per file extension of a sample, e.g. `jpg`, `txt`, `json`) or a
    dataset `datasets.load_dataset(..., streaming=True)` understands (`dataset_name`).

    Shards are checked first ([`check_shards`], with `skip_bad_shards`); pass `shards`, the result of an earlier
    `check_shards` (the list a [`StreamPosition`] records), to read exactly those instead of `train_shards`.
    """
    import datasets

    if (dataset_name is None) == (not train_shards and not shards):
        raise ValueError("Give exactly one of `dataset_name` and `train_shards` for streaming.")
    if train_shards or shards:
        if shards is None:
            shards = check_shards(resolve_shards(train_shards), skip_bad_shards)
        files = [shard["path"] for shard in shards]
        return datasets.load_dataset("webdataset", data_files={split: files}, split=split, streaming=True)
    if os.path.isdir(dataset_name):  # a local data folder (e.g. images + metadata.jsonl)
        check_metadata_files(dataset_name)
    return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=True, cache_dir=cache_dir)


def sample_name(row: dict, position: int) -> str:
    """How errors name a stream row: its WebDataset shard and sample key when known, and its position in the epoch."""
    if row.get("__url__") is not None:
        return f"Sample {row.get('__key__')!r} of shard {row['__url__']} (row {position} of the stream)"
    return f"Row {position} of the stream"


def find_caption(row: dict, columns: Sequence[str], where: str | None = None):
    r"""
    The first of `columns` present (and not `None`) in `row`; a dotted name reads into a dict column, e.g.
    `json.caption` is `row["json"]["caption"]` (WebDataset's JSON sidecar). Raises naming `where` (the sample) and the
    columns tried.
    """
    for column in columns:
        value = row
        for part in column.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                break
        if value is not None:
            return value
    keys = sorted(key for key in row if row[key] is not None)
    raise ValueError(f"{where or 'The sample'}: no caption (tried {list(columns)}; its non-null keys: {keys}).")


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
        where = sample_name(row, position)
        if row.get(self.image_column) is None:
            present = sorted(key for key in row if row[key] is not None)
            raise ValueError(f"{where}: no image in column {self.image_column!r} (its non-null keys: {present}).")
        image = read_image(row[self.image_column], index=position, where=where)
        pixel_values = preprocess_image(image, self.resolution, self.center_crop, flip, generator)
        caption = _pick_caption(find_caption(row, self.caption_columns, where), generator, where)
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
    r"""
    `(epoch, step in epoch)` of a stream, checkpointed with `accelerator.register_for_checkpointing`.

    With `shards` (the [`check_shards`] list the stream reads), the list (paths and sizes) is saved too, and loading a
    state saved over another list raises naming the added, removed and changed shards: a position means the same rows
    only over the same shards (a glob that gained a shard would otherwise train some rows twice and others never).
    """

    def __init__(self, shards: Sequence[dict] | None = None):
        self.epoch, self.step = 0, 0
        self.shards = None if shards is None else [{"path": s["path"], "size": int(s["size"])} for s in shards]

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step": self.step}
        if self.shards is not None:
            state["shards"] = [dict(shard) for shard in self.shards]
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("shards")
        if self.shards is not None and saved is None:
            logger.warning("The checkpoint's stream position records no shard list (an older run): not checked.")
        elif self.shards is not None and (differences := _shard_differences(saved, self.shards)):
            raise ValueError(
                f"The shards of --train_shards differ from those of the checkpoint ({differences}): resuming at "
                f"epoch {state['epoch']}, step {state['step']} would train some rows twice and others never. Restore "
                "the checkpoint's shards, or start a new run."
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def _shard_differences(saved: Sequence[dict], current: Sequence[dict]) -> str:
    """The added / removed / changed (size) shards between two shard lists, `""` when they are the same list."""
    before = {s["path"]: int(s["size"]) for s in saved}
    after = {s["path"]: int(s["size"]) for s in current}
    parts = []
    if added := [path for path in after if path not in before]:
        parts.append(f"added: {', '.join(added)}")
    if removed := [path for path in before if path not in after]:
        parts.append(f"removed: {', '.join(removed)}")
    if changed := [f"{p} ({before[p]} -> {after[p]} bytes)" for p in after if p in before and before[p] != after[p]]:
        parts.append(f"changed: {', '.join(changed)}")
    if not parts and [s["path"] for s in saved] != [s["path"] for s in current]:
        parts.append("the same shards in another order")
    return "; ".join(parts)


__all__ = [
    "StreamPosition",
    "StreamingImageCaptionDataset",
    "check_shards",
    "find_caption",
    "load_streaming_dataset",
    "resolve_shards",
    "sample_name",
    "shard_problem",
]
