"""Training data for SANA-Sprint: captioned images, VAE latents, prompt embeddings, and a deterministic batch order.

Everything random here (shuffling, random crop, random flip, the choice among several captions) is a fixed function
of `(seed, epoch, sample index)` via `training.seeding.derive_seed`, never of a global RNG, a worker id or the
number of processes. Two consequences the training script relies on:

- a run resumed from a checkpoint sees exactly the batches and augmentations of the uninterrupted run;
- with [`LayoutInvariantBatchSampler`], `P` processes with accumulation `A` see the same micro-batches as one process
  with accumulation `P * A` (see `training.seeding`).

Latents are in the units of the training library: `x0 = vae_latent * scaling_factor * sigma_data`
([`encode_images`]). Prompts are encoded by the inference pipeline's own code ([`PromptEncoder`]), so training and
sampling see identical text conditioning.
"""

import abc
import io
import json
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from ..pipelines.pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION, SanaSprintPipeline
from .seeding import make_generator


# ---------------------------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------------------------


class StepGroupBatchSampler(torch.utils.data.Sampler, abc.ABC):
    r"""
    The process-layout logic shared by the batch samplers: an epoch is a sequence of *step groups*, the
    `batch_size * num_processes * gradient_accumulation_steps` sample indices of one optimisation step, and
    micro-batch `m` of process `p` in a step is global micro-batch `m * num_processes + p` of its group. So any layout
    with the same global batch sees the same micro-batches, and resuming at step `k` of an epoch skips its first `k`
    groups.

    Subclasses set `steps_per_epoch` and implement `step_groups(epoch)`; batches are lists of `(epoch, index)` keys.
    """

    def __init__(
        self,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("num_processes", num_processes),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index}.")
        self.batch_size = int(batch_size)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.micro_batches_per_step = self.num_processes * self.gradient_accumulation_steps
        self.group_size = self.batch_size * self.micro_batches_per_step
        self.epoch = 0
        self.start_step = 0

    @abc.abstractmethod
    def step_groups(self, epoch: int) -> Sequence[Sequence[int]]:
        """The sample indices of every step of `epoch`, in order."""

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from its step `start_step` on (to resume mid-epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"`start_step` must be in [0, {self.steps_per_epoch}], got {start_step}.")
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def __iter__(self):
        for group in self.step_groups(self.epoch)[self.start_step :]:
            for micro in range(self.gradient_accumulation_steps):
                start = (micro * self.num_processes + self.process_index) * self.batch_size
                yield [(self.epoch, index) for index in group[start : start + self.batch_size]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.gradient_accumulation_steps


class LayoutInvariantBatchSampler(StepGroupBatchSampler):
    r"""
    Batches of `(epoch, index)` keys for one process, in an order that does not depend on the process layout.

    Each epoch is a permutation of the dataset (`derive_seed(seed, "data_order", epoch)`; identity without
    `shuffle`) cut into global batches of `batch_size`. An optimisation step consumes `num_processes *
    gradient_accumulation_steps` consecutive global batches: micro-batch `m` of this process in step `k` is global
    batch `k * num_processes * gradient_accumulation_steps + m * num_processes + process_index`. Samples that do not
    fill a whole step at the end of an epoch are dropped, so every process yields the same number of batches.

    The keys carry the epoch so that a dataset can draw its per-sample augmentation from `(seed, epoch, index)`.

    Args:
        num_samples (`int`): Dataset size.
        batch_size (`int`): Samples per micro-batch (per process).
        num_processes (`int`, defaults to 1), process_index (`int`, defaults to 0): The data-parallel layout.
        gradient_accumulation_steps (`int`, defaults to 1): Micro-batches per process and step.
        seed (`int`, defaults to 0): Base seed of the shuffling.
        shuffle (`bool`, defaults to `True`): Shuffle each epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
        super().__init__(batch_size, num_processes, process_index, gradient_accumulation_steps, seed, shuffle)
        self.num_samples = int(num_samples)
        self.steps_per_epoch = self.num_samples // self.group_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The dataset has {num_samples} samples, fewer than one step's global batch of "
                f"{self.group_size} (batch_size {batch_size} x {num_processes} "
                f"processes x {gradient_accumulation_steps} accumulation steps)."
            )

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices of `epoch`."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=make_generator(self.seed, "data_order", epoch))

    def step_groups(self, epoch: int) -> list[list[int]]:
        order = self.epoch_order(epoch).tolist()
        return [order[step * self.group_size : (step + 1) * self.group_size] for step in range(self.steps_per_epoch)]


# ---------------------------------------------------------------------------------------------------------------------
# Reading images: one rule for every loader
# ---------------------------------------------------------------------------------------------------------------------

WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class InvalidImageError(ValueError):
    r"""
    A dataset row whose image cannot be read or converted. `index` is the dataset row, `path` the image file when the
    dataset records one (else `None`). The message names both; the original error is the `__cause__`.
    """

    def __init__(self, message: str, index: int | None = None, path: str | None = None):
        super().__init__(message)
        self.index = index
        self.path = path


def image_to_rgb(image: Image.Image, background: Sequence[int] = WHITE) -> Image.Image:
    r"""
    The one conversion of every loader here (training data and the toy set) to an 8-bit RGB image.

    - 16-bit grey (`I;16*`, and `I`, which Pillow and `datasets` use for the same data): `round(v / 257)`, i.e. the
      full range 0..65535 maps linearly onto 0..255 (Pillow's own `convert` clips it to white at 255). Values outside
      0..65535 raise.
    - Float grey (`F`): values in [0, 1] map to `round(255 v)`; values outside [0, 1] (beyond half an 8-bit level)
      raise, since their scale cannot be told from the data.
    - Transparency (`RGBA`, `LA`, `PA`, premultiplied `RGBa`/`La`, and a palette or grey/RGB image with a `tRNS`
      colour): alpha-composited onto `background` (default white), as `Image.alpha_composite` does.
    - Everything else: Pillow's `convert("RGB")` (grey, bilevel, palette, CMYK, YCbCr).

    Args:
        image (`PIL.Image.Image`): A loaded image.
        background (`tuple[int, int, int]`, defaults to white): RGB colour under transparent pixels.

    Returns:
        `PIL.Image.Image` in mode `RGB`, same size.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        array = np.asarray(image)
        if array.size:
            low, high = float(array.min()), float(array.max())
            if image.mode == "F":
                if not (np.isfinite(array).all() and low >= -0.5 / 255 and high <= 1 + 0.5 / 255):
                    raise ValueError(
                        f"A float image (mode F) must hold values in [0, 1]; this one spans [{low:g}, {high:g}]."
                    )
                scaled = array.astype(np.float64) * 255.0
            else:
                if low < 0 or high > 65535:
                    raise ValueError(
                        f"A 16-bit image (mode {image.mode}) must hold values in [0, 65535]; this one spans "
                        f"[{low:g}, {high:g}]."
                    )
                scaled = array.astype(np.float64) / 257.0
        else:
            scaled = np.zeros(array.shape, np.float64)
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(int(c) for c in background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _open_header(source) -> Image.Image:
    """`Image.open` of any source [`open_image`] takes: the header is read (size, mode), the pixels are not."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Image.open(source)
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, dict) and ("bytes" in source or "path" in source):
        if source.get("bytes") is not None:
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path") is not None:
            return Image.open(source["path"])
        raise ValueError("The image entry holds neither bytes nor a path.")
    if source is None:
        raise ValueError("The image is missing (None).")
    return Image.fromarray(np.asarray(source))


def open_image(source) -> Image.Image:
    r"""
    A fully decoded `PIL.Image.Image` from a PIL image, a file path, encoded bytes, a `datasets` image dict
    (`{"bytes": ..., "path": ...}`, the undecoded form of `datasets.Image`) or an array. Decoding errors (a truncated
    or unknown file) surface here rather than later inside a resize.
    """
    image = _open_header(source)
    image.load()
    if image.width < 1 or image.height < 1:
        raise ValueError(f"The image is empty ({image.width} x {image.height} pixels).")
    return image


def _source_path(source) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict):
        return source.get("path")
    return getattr(source, "filename", None) or None


def row_name(index: int) -> str:
    """How errors name row `index` of a map-style training dataset."""
    return f"Row {index} of the training data"


def invalid_image_error(error: Exception, source, index: int | None = None, where: str | None = None):
    r"""
    The [`InvalidImageError`] of every image reader here for `error` raised while reading `source`: it names the
    dataset row `index` (or `where`, e.g. a shard and sample key) and the file when known. Raise it `from error`.
    """
    path = _source_path(source)
    if where is None:
        where = "The image" if index is None else row_name(index)
    where += f" ({path})" if path else ""
    return InvalidImageError(
        f"{where} cannot be used: {type(error).__name__}: {error}. `validate_image_dataset` (the training "
        "script's --validate_data) lists every such row.",
        index=index,
        path=path,
    )


def read_image(
    source, index: int | None = None, background: Sequence[int] = WHITE, where: str | None = None
) -> Image.Image:
    r"""
    [`open_image`] then [`image_to_rgb`]; any failure becomes an [`InvalidImageError`] naming the dataset row `index`
    (or `where`) and the file (when known).
    """
    try:
        return image_to_rgb(open_image(source), background)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise invalid_image_error(error, source, index, where) from error


def read_image_size(source, index: int | None = None, where: str | None = None) -> tuple[int, int]:
    r"""
    `(height, width)` of an image from its header only (the pixels are not decoded), for the same sources as
    [`open_image`]; a failure (not an image, a decompression-bomb header, a missing file) becomes the
    [`InvalidImageError`] [`read_image`] raises for the same row.
    """
    try:
        image = _open_header(source)
        height, width = image.height, image.width
        if image is not source:
            image.close()
    except Exception as error:  # noqa: BLE001 - as in `read_image`
        raise invalid_image_error(error, source, index, where) from error
    if height < 1 or width < 1:
        error = ValueError(f"The image is empty ({width} x {height} pixels).")
        raise invalid_image_error(error, source, index, where) from error
    return height, width


# ---------------------------------------------------------------------------------------------------------------------
# Images and captions
# ---------------------------------------------------------------------------------------------------------------------


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation draws, in this order: flip, crop offsets, caption choice."""
    return make_generator(seed, "augment", epoch, index)


def _draw_flip(generator: torch.Generator, random_flip: bool) -> bool:
    draw = torch.rand((), generator=generator).item()  # always drawn: the later draws do not depend on the flag
    return random_flip and draw < 0.5


def preprocess_image(
    image: Image.Image,
    resolution: int | Sequence[int],
    center_crop: bool = False,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    diffusers' text-to-image preprocessing: resize (bilinear, antialiased) so the image just covers the target,
    crop the target (centred, or at an offset drawn from `generator`), optionally flip left-right, and map to
    `[-1, 1]`. The image is first made 8-bit RGB by [`image_to_rgb`] (16-bit scaled, transparency on white).

    Args:
        resolution (`int` or `(height, width)`): A square side, or the `(height, width)` of an aspect-ratio bin
            (`training.buckets`). For a square target the shorter side is resized to `resolution`.

    Returns:
        `torch.Tensor` of shape `(3, height, width)`, float32.
    """
    if isinstance(resolution, numbers.Integral):
        target_height = target_width = int(resolution)
    else:
        target_height, target_width = (int(side) for side in resolution)
    image = image_to_rgb(image)
    width, height = image.size
    scale = max(target_height / height, target_width / width)
    new_size = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    width, height = image.size
    if center_crop:
        top = int(round((height - target_height) / 2.0))
        left = int(round((width - target_width) / 2.0))
    else:
        top = int(torch.randint(0, height - target_height + 1, (), generator=generator))
        left = int(torch.randint(0, width - target_width + 1, (), generator=generator))
    image = image.crop((left, top, left + target_width, top + target_height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def caption_choices(caption, where: str | None = None) -> list[str]:
    r"""
    The one check of a caption value, used wherever a caption is read (map-style and streaming datasets, the feature
    cache, fallback columns): a string, or a non-empty list (tuple, array) of strings, as a list of its choices.
    Anything else (`None` alone or inside a list, a number, an empty list) raises a `ValueError` prefixed by
    `where` (e.g. `"Row 3 of the training data"`), naming the bad item.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
        for position, item in enumerate(caption):
            if not isinstance(item, str):
                raise ValueError(
                    f"{prefix}Captions must be strings or non-empty lists of strings; item {position} of "
                    f"{list(caption)!r} is {item!r} ({type(item).__name__})."
                )
        return [str(item) for item in caption]
    raise ValueError(f"{prefix}Captions must be strings or non-empty lists of strings, got {caption!r}.")


def _pick_caption(caption, generator: torch.Generator | None, where: str | None = None) -> str:
    """A sample's caption: the first choice without `generator`, else one drawn from it ([`caption_choices`])."""
    choices = caption_choices(caption, where)
    if generator is None or isinstance(caption, str):
        return choices[0]
    return choices[int(torch.randint(0, len(choices), (), generator=generator))]


class ImageCaptionDataset(torch.utils.data.Dataset):
    r"""
    Map-style dataset of `(epoch, index)` keys -> `{"pixel_values": (3, R, R) in [-1, 1], "caption": str}`.

    Flip, crop offsets and (for a list of captions) the caption are drawn from
    [`augmentation_generator`]`(seed, epoch, index)`. A plain integer key means epoch 0.

    Images go through [`read_image`]: an unreadable one raises [`InvalidImageError`] naming the row and the file. For
    a `datasets.Dataset` the images are decoded here rather than by `datasets` (the column is read undecoded), so the
    file is known when decoding fails.

    Args:
        dataset: Anything indexable by int returning a dict (e.g. a `datasets.Dataset`).
        image_column (`str`), caption_column (`str`): Column names.
        resolution (`int`): Output side in pixels.
        target_sizes (`Sequence[tuple[int, int]]`, *optional*): Per-row `(height, width)` overriding `resolution`
            (the aspect-ratio bin of each row, see `training.buckets.assign_buckets`).
        center_crop (`bool`, defaults to `False`): Centre crop instead of a random crop.
        random_flip (`bool`, defaults to `False`): Flip left-right with probability 0.5.
        seed (`int`, defaults to 0): Base seed of the augmentations.
        conditioning_image_column (`str`, *optional*): ControlNet training: a column of control images, returned as
            `"conditioning_pixel_values"`: resized to the row's image size, then cropped and flipped exactly like it.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        caption_column: str,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        conditioning_image_column: str | None = None,
    ):
        if target_sizes is not None and len(target_sizes) != len(dataset):
            raise ValueError(f"`target_sizes` has {len(target_sizes)} entries for {len(dataset)} rows.")
        self.dataset = dataset
        self.target_sizes = target_sizes
        self.rows = undecoded_images(dataset, image_column)
        if conditioning_image_column is not None:
            self.rows = undecoded_images(self.rows, conditioning_image_column)
        self.conditioning_image_column = conditioning_image_column
        self.image_column = image_column
        self.caption_column = caption_column
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def target_size(self, index: int) -> tuple[int, int]:
        """`(height, width)` in pixels of row `index` after preprocessing."""
        if self.target_sizes is not None:
            height, width = self.target_sizes[int(index)]
            return int(height), int(width)
        return self.resolution, self.resolution

    def load(self, index: int, epoch: int = 0, flip: bool | None = None, pick_caption: bool = True) -> dict:
        """One sample; `flip` overrides the drawn flip (the crop stays that of `(epoch, index)`)."""
        generator = augmentation_generator(self.seed, epoch, index)
        drawn_flip = _draw_flip(generator, self.random_flip)
        row = self.rows[int(index)]
        image = read_image(row[self.image_column], index=int(index))
        crop_state = generator.get_state()
        flip = drawn_flip if flip is None else flip
        pixel_values = preprocess_image(image, self.target_size(index), self.center_crop, flip, generator)
        sample = {}
        if self.conditioning_image_column is not None:  # the same resize, crop offsets and flip as the image
            control = read_image(row[self.conditioning_image_column], index=int(index))
            if control.size != image.size:
                control = control.resize(image.size, Image.Resampling.BILINEAR)
            crop = torch.Generator().set_state(crop_state)
            sample["conditioning_pixel_values"] = preprocess_image(
                control, self.target_size(index), self.center_crop, flip, crop
            )
        caption = _pick_caption(row[self.caption_column], generator if pick_caption else None, row_name(index))
        return {"pixel_values": pixel_values, "caption": caption, **sample}

    def __getitem__(self, key) -> dict:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        return self.load(index, epoch)


def undecoded_images(dataset, image_column: str):
    """`dataset` with its `datasets.Image` column left undecoded (`{"bytes", "path"}`), else `dataset` itself."""
    if not hasattr(dataset, "cast_column") or not isinstance(getattr(dataset, "features", None), dict):
        return dataset
    import datasets

    feature = dataset.features.get(image_column)
    if not (isinstance(feature, datasets.Image) and feature.decode):
        return dataset
    return dataset.cast_column(image_column, datasets.Image(decode=False))


@dataclass(frozen=True)
class InvalidRow:
    """One bad row found by [`validate_image_dataset`]: its index, image file (if known) and what is wrong."""

    index: int
    path: str | None
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}" + (f" ({self.path})" if self.path else "") + f": {self.reason}"


def validate_image_dataset(
    dataset,
    image_column: str = "image",
    caption_column: str | None = "text",
    raise_error: bool = False,
    progress=None,
) -> list[InvalidRow]:
    r"""
    Scan every row once and list those [`ImageCaptionDataset`] could not use: images that do not decode (truncated,
    missing, not an image), cannot be converted by [`image_to_rgb`] or are empty, and captions that are not a string
    or a non-empty list of strings.

    Args:
        dataset: A `datasets.Dataset` or anything indexable by int returning dicts.
        image_column (`str`), caption_column (`str`, *optional*): Columns to check; `None` skips the captions.
        raise_error (`bool`, defaults to `False`): Raise a `ValueError` listing every bad row instead of returning.
        progress: Optional callable `progress(num_done)` (e.g. a tqdm `update`).

    Returns:
        `list[InvalidRow]`, empty when every row is usable. Keep the good rows with
        `dataset.select(sorted(set(range(len(dataset))) - {row.index for row in bad}))`.
    """
    rows = undecoded_images(dataset, image_column)
    bad = []
    for index in range(len(rows)):
        row = rows[index]
        try:
            read_image(row[image_column], index=index)
        except InvalidImageError as error:
            cause = error.__cause__
            bad.append(InvalidRow(index, error.path, f"{type(cause).__name__}: {cause}"))
        if caption_column is not None:
            try:
                caption_choices(row[caption_column])
            except ValueError as error:
                bad.append(InvalidRow(index, _source_path(row[image_column]), str(error)))
        if progress is not None:
            progress(1)
    if bad and raise_error:
        raise ValueError(
            f"{len({row.index for row in bad})} of {len(rows)} rows of the training data cannot be used:\n"
            + "\n".join(f"  {row}" for row in bad)
        )
    return bad


class CachedLatentDataset(torch.utils.data.Dataset):
    r"""
    Precomputed training inputs: `(epoch, index)` -> `{"latents", "prompt_embeds", "prompt_attention_mask"}`.

    With `flipped_latents`, the flip is drawn per `(epoch, index)` exactly as [`ImageCaptionDataset`] draws it; the
    crop is the one fixed when the cache was built (epoch 0). Build it with [`build_latent_cache`].
    """

    def __init__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        flipped_latents: torch.Tensor | None = None,
        seed: int = 0,
        control_latents: torch.Tensor | None = None,
        flipped_control_latents: torch.Tensor | None = None,
    ):
        if control_latents is not None and control_latents.shape != latents.shape:
            raise ValueError("`control_latents` must have the shape of `latents`.")
        if (flipped_control_latents is None) != (control_latents is None or flipped_latents is None):
            raise ValueError("`flipped_control_latents` goes exactly with `control_latents` and `flipped_latents`.")
        self.control_latents, self.flipped_control_latents = control_latents, flipped_control_latents
        if not latents.shape[0] == prompt_embeds.shape[0] == prompt_attention_mask.shape[0]:
            raise ValueError("`latents`, `prompt_embeds` and `prompt_attention_mask` need the same length.")
        if flipped_latents is not None and flipped_latents.shape != latents.shape:
            raise ValueError("`flipped_latents` must have the shape of `latents`.")
        self.latents, self.flipped_latents = latents, flipped_latents
        self.prompt_embeds, self.prompt_attention_mask = prompt_embeds, prompt_attention_mask
        self.seed = seed

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, key) -> dict:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        flip = _draw_flip(augmentation_generator(self.seed, epoch, index), self.flipped_latents is not None)
        latents = self.flipped_latents[index] if flip else self.latents[index]
        sample = {
            "latents": latents,
            "prompt_embeds": self.prompt_embeds[index],
            "prompt_attention_mask": self.prompt_attention_mask[index],
        }
        if self.control_latents is not None:
            sample["control_latents"] = (self.flipped_control_latents if flip else self.control_latents)[index]
        return sample


def collate_examples(examples: Sequence[dict]) -> dict:
    r"""
    Collate a list of samples: a field that is a tensor in every sample is stacked, any other field (strings, or a
    field some samples lack or hold as `None`, e.g. the latents of a partly cached batch,
    [`~training.feature_cache.CachedLatentImageDataset`]) becomes a list with `None` where absent.
    """
    keys = list(dict.fromkeys(key for example in examples for key in example))
    batch = {}
    for key in keys:
        values = [example.get(key) for example in examples]
        stack = all(isinstance(value, torch.Tensor) for value in values)
        batch[key] = torch.stack(values) if stack else list(values)
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    r"""
    Data latents in the training library's units: `x0 = vae_latent * scaling_factor * sigma_data` (float32).

    Works with Sana's `AutoencoderDC` (deterministic `latent`); a KL autoencoder's posterior mode is used otherwise.
    """
    encoded = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype))
    latent = encoded.latent if hasattr(encoded, "latent") else encoded.latent_dist.mode()
    return latent.float() * vae.config.scaling_factor * sigma_data


class _TextEncodingPipeline(SanaSprintPipeline):
    """`SanaSprintPipeline`'s prompt encoding without a transformer, VAE or scheduler."""

    def __init__(self, tokenizer, text_encoder):
        DiffusionPipeline.__init__(self)
        modules = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
        self.register_modules(**modules)


class PromptEncoder:
    r"""
    Encodes captions with the exact code of [`SanaSprintPipeline`] (right padding to `max_sequence_length`, Sana's
    prompt-enhancing instruction, first + last tokens selection), so training and inference conditioning match.

    The empty prompt for classifier-free guidance ([`null`]) is encoded without the instruction, as diffusers'
    `SanaPipeline` encodes its negative prompt.

    Args:
        tokenizer, text_encoder: Gemma(-like) tokenizer and text encoder (frozen).
        max_sequence_length (`int`, defaults to 300): Tokens kept per prompt.
        complex_human_instruction (`list[str]`, *optional*): Defaults to Sana's instruction; `None` encodes the
            prompt alone.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
    ):
        self.pipeline = _TextEncodingPipeline(tokenizer, text_encoder)
        self.max_sequence_length = max_sequence_length
        self.complex_human_instruction = complex_human_instruction

    @torch.no_grad()
    def __call__(
        self, prompts: str | list[str], device: torch.device | str | None = None, instruction: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds (B, L, D), prompt_attention_mask (B, L))`, `L = max_sequence_length`."""
        device = device if device is not None else self.pipeline.text_encoder.device
        return self.pipeline.encode_prompt(
            [prompts] if isinstance(prompts, str) else list(prompts),
            device=device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.complex_human_instruction if instruction else None,
        )

    def null(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt, `(1, L, D)` and `(1, L)`."""
        return self([""], device=device, instruction=False)


def trim_prompt_padding(
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    null_prompt_embeds: torch.Tensor,
    null_prompt_attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    Drop the trailing token columns that are padding in every row of the batch and of the empty prompt.

    Sana's cross-attention gives masked keys an additive bias of -10000, whose softmax weight underflows to exactly 0,
    so these columns change no output; cutting them saves the cross-attention cost of up to `max_sequence_length`
    padded tokens per sample. The conditional and empty prompts keep a common length (the teacher's CFG batches them).
    """
    if prompt_attention_mask.shape[1] != null_prompt_attention_mask.shape[1]:
        raise ValueError("The prompt and the empty prompt must be padded to the same length.")
    used = prompt_attention_mask.bool().any(dim=0) | null_prompt_attention_mask.bool().any(dim=0)
    columns = used.nonzero()
    length = int(columns.max()) + 1 if columns.numel() else 1
    return (
        prompt_embeds[:, :length],
        prompt_attention_mask[:, :length],
        null_prompt_embeds[:, :length],
        null_prompt_attention_mask[:, :length],
    )


@torch.no_grad()
def build_latent_cache(
    dataset: ImageCaptionDataset,
    vae,
    prompt_encoder: PromptEncoder,
    sigma_data: float = 0.5,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress=None,
) -> CachedLatentDataset:
    r"""
    Encode every sample once: latents of the epoch-0 crop (and of its mirror image when the dataset flips), the
    prompt embeddings of the first caption, and with a `conditioning_image_column` the control latents (unit scale:
    `vae_latent * scaling_factor`, diffusers' `controlnet_cond`), flipped alike. Tensors are kept on the CPU.
    `progress` is an optional callable `progress(num_done)` (e.g. a tqdm `update`).
    """
    device = device if device is not None else vae.device
    latents, flipped, embeds, masks = [], [], [], []
    controls, flipped_controls = [], []
    with_control = getattr(dataset, "conditioning_image_column", None) is not None
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        samples = [dataset.load(index, epoch=0, flip=False, pick_caption=False) for index in indices]
        pixels = torch.stack([sample["pixel_values"] for sample in samples]).to(device)
        latents.append(encode_images(vae, pixels, sigma_data).cpu())
        if dataset.random_flip:
            flipped.append(encode_images(vae, pixels.flip(-1), sigma_data).cpu())
        if with_control:
            control = torch.stack([sample["conditioning_pixel_values"] for sample in samples]).to(device)
            controls.append(encode_images(vae, control, sigma_data=1.0).cpu())
            if dataset.random_flip:
                flipped_controls.append(encode_images(vae, control.flip(-1), sigma_data=1.0).cpu())
        prompt_embeds, prompt_mask = prompt_encoder([sample["caption"] for sample in samples], device=device)
        embeds.append(prompt_embeds.cpu())
        masks.append(prompt_mask.cpu())
        if progress is not None:
            progress(len(samples))
    return CachedLatentDataset(
        torch.cat(latents),
        torch.cat(embeds),
        torch.cat(masks),
        torch.cat(flipped) if dataset.random_flip else None,
        seed=dataset.seed,
        control_latents=torch.cat(controls) if with_control else None,
        flipped_control_latents=torch.cat(flipped_controls) if with_control and dataset.random_flip else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loading a captioned image dataset
# ---------------------------------------------------------------------------------------------------------------------


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def check_metadata_files(folder: str) -> None:
    r"""
    Check the `metadata.jsonl` / `metadata.csv` files of an image folder before `datasets` reads them (its error, "An
    error occurred while generating the dataset", names neither file nor line): every file must be UTF-8 and every
    non-empty `.jsonl` line a JSON object. Raises a `ValueError` naming the file, line and byte.
    """
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(set(names) & set(METADATA_FILES)):
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                lines = file.read().split(b"\n")
            for number, line in enumerate(lines, start=1):
                where = f"The metadata file {path}, line {number}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(
                        f"{where}, is not UTF-8 (byte {error.start + 1} of the line: "
                        f"{line[error.start : error.end]!r})."
                    ) from error
                if name.endswith(".jsonl") and text.strip():
                    try:
                        value = json.loads(text)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{where}, is not JSON: {error}.") from error
                    if not isinstance(value, dict):
                        raise ValueError(f"{where}, is not a JSON object: {text.strip()[:80]!r}.")


def _generate(source: str, load, *args, **kwargs):
    """`load(*args, **kwargs)`; `datasets`' generation error gets `source` and its cause in the message."""
    import datasets

    try:
        return load(*args, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        raise ValueError(f"{source} cannot be read: {type(cause).__name__}: {cause}") from error


def load_image_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    split: str = "train",
):
    r"""
    A `datasets.Dataset` of images and captions, from one of:

    - `dataset_name`: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`load_from_disk`), or
      any name or path `datasets.load_dataset` understands (a Hub dataset id, a local script or data folder);
    - `train_data_dir`: an image folder with a `metadata.jsonl` holding `file_name` and the caption column
      (`load_dataset("imagefolder", data_dir=...)`).

    `max_train_samples` keeps the first samples (for debugging). Raises a `ValueError` naming the available columns
    when `image_column` or `caption_column` is missing, and one naming the folder or dataset when it holds no rows
    (an image folder without images, an empty saved dataset).
    """
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Loading training data needs the `datasets` package: `pip install datasets`.") from error
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Give exactly one of `dataset_name` and `train_data_dir`.")
    if dataset_name is not None:
        saved = os.path.isdir(dataset_name) and any(
            os.path.exists(os.path.join(dataset_name, name))
            for name in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
        source = f"The dataset {dataset_name!r}"
        if saved:
            try:
                data = datasets.load_from_disk(dataset_name)
            except IndexError as error:  # datasets concatenates the saved Arrow files and indexes the first
                raise ValueError(f"{source} (a `save_to_disk` folder) holds no rows.") from error
        else:
            if os.path.isdir(dataset_name):  # a local data folder (e.g. images + metadata.jsonl)
                check_metadata_files(dataset_name)
            data = _generate(source, datasets.load_dataset, dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        source = f"The image folder {train_data_dir!r}"
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"{source} (--train_data_dir) does not exist or is not a folder.")
        extensions = tuple(datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS)
        if not any(name.lower().endswith(extensions) for _, _, names in os.walk(train_data_dir) for name in names):
            raise ValueError(
                f"{source} (--train_data_dir) holds no image files (none of the {len(extensions)} extensions "
                "`imagefolder` reads, e.g. .png, .jpg, .webp)."
            )
        check_metadata_files(train_data_dir)
        data = _generate(source, datasets.load_dataset, "imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"The dataset has no {split!r} split; splits: {list(data)}.")
        data = data[split]
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in data.column_names:
            raise ValueError(f"`{role}` {column!r} is not a column of the dataset; columns: {data.column_names}.")
    if len(data) == 0:
        raise ValueError(f"{source} holds no rows ({split!r} split).")
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise ValueError(f"`max_train_samples` must be >= 1, got {max_train_samples}.")
        data = data.select(range(min(max_train_samples, len(data))))
    return data


__all__ = [
    "WHITE",
    "CachedLatentDataset",
    "ImageCaptionDataset",
    "InvalidImageError",
    "InvalidRow",
    "LayoutInvariantBatchSampler",
    "StepGroupBatchSampler",
    "PromptEncoder",
    "augmentation_generator",
    "build_latent_cache",
    "caption_choices",
    "check_metadata_files",
    "collate_examples",
    "encode_images",
    "image_to_rgb",
    "invalid_image_error",
    "load_image_caption_dataset",
    "open_image",
    "preprocess_image",
    "read_image",
    "read_image_size",
    "row_name",
    "trim_prompt_padding",
    "undecoded_images",
    "validate_image_dataset",
]
