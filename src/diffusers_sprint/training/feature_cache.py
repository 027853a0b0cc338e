"""On-disk caches of VAE latents and text embeddings, shared by runs and processes (safetensors shards).

A cache folder holds one sub-folder per *namespace*: everything the stored tensors depend on besides the sample
itself. Latents: the VAE (a digest of its config and weight files, [`model_digest`]) and the crop rule; text: the
tokenizer and text encoder digests, `max_sequence_length` and the prompt instruction. Inside, each entry is keyed by
a content hash: the image's bytes + the target `(height, width)` + flip for latents, the caption text (+ whether the
instruction is prepended) for text. So the same images at another bin, another VAE or another instruction are other
entries, and a renamed, re-ordered or re-sharded dataset still hits the cache.

Entries are written in shards `shard-<writer>-<uuid>.safetensors` (atomically: a temporary file, then `os.replace`),
each process its own, so any number of ranks fill one cache at once without locks; readers index every shard's
header (the tensor names, no data) and read tensors lazily with `safe_open`. A duplicate key in two shards holds the
same tensor (same inputs, same model): the first found wins.

Stored units: latents as `vae_latent * scaling_factor` (float32; `training.data.encode_images` multiplies by
`sigma_data` after, in the same order, so cached and fresh latents are bit-identical for the same VAE batch); text
embeddings in the encoder's dtype, cut after the last unmasked token (Sana's cross-attention gives masked tokens an
additive -10000 bias, so their values do not change any output; they are zeros when read back), with the full mask.
"""

import hashlib
import io
import json
import logging
import numbers
import os
import uuid
from collections.abc import Iterable, Mapping

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .data import (
    _draw_flip,
    _pick_caption,
    augmentation_generator,
    caption_choices,
    collate_examples,
    invalid_image_error,
    row_name,
)


logger = logging.getLogger(__name__)


SHARD_PREFIX = "shard-"
_CONFIG_SUFFIXES = (".json", ".txt", ".model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack")
BAD_SHARD_SUFFIX = ".bad"


def _sha256(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def model_digest(folder: str) -> str:
    r"""
    A digest of a model folder (e.g. `<pipeline>/vae`) computed without constructing the model: the full content of
    its config / tokenizer files and of its weight files (name, size and sha256 of every byte, so a change of any one
    tensor anywhere gives another digest; about 1 s per GB, see docs/data.md). Two copies of the same model on two
    machines get the same digest; a fine-tuned model gets another.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"Model folder {folder!r} does not exist.")
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if name.endswith(_CONFIG_SUFFIXES):
                with open(path, "rb") as file:
                    digest.update(relative.encode() + b"\0" + file.read() + b"\0")
            elif name.endswith(_WEIGHT_SUFFIXES):
                with open(path, "rb") as file:
                    content = hashlib.file_digest(file, "sha256").digest()
                digest.update(f"{relative}\0{os.path.getsize(path)}\0".encode() + content + b"\0")
    return digest.hexdigest()


def image_content_hash(source) -> str:
    r"""
    sha256 of an image's content: its encoded bytes (bytes, a path, or a `datasets` `{"bytes", "path"}` dict), or for
    a decoded PIL image its mode, size and pixels.
    """
    if isinstance(source, dict):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return _sha256(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            return _sha256(file.read())
    if isinstance(source, Image.Image):
        return _sha256(source.mode, f"{source.size}", source.tobytes())
    if source is None:
        raise ValueError("The image is missing (None).")
    buffer = io.BytesIO()
    torch.save(torch.as_tensor(source), buffer)
    return _sha256(buffer.getvalue())


def latent_key(content_hash: str, size: tuple[int, int], flip: bool) -> str:
    """The entry key of one image's latent at `(height, width)`, mirrored or not."""
    return f"{content_hash}-{int(size[0])}x{int(size[1])}{'-flip' if flip else ''}"


def text_key(caption: str, instruction: bool) -> str:
    """The entry key of one caption's embedding, with or without the prompt instruction."""
    return _sha256("instruction" if instruction else "plain", caption)


class FeatureCache:
    r"""
    One namespace of a cache folder: `{key: {name: tensor}}` entries in safetensors shards.

    Args:
        root (`str`): The cache folder (shared by runs and processes).
        kind (`str`): `"latents"` or `"text"` (the sub-folder prefix).
        namespace (`Mapping`): What the entries depend on besides their key (JSON-serialisable); its hash names the
            sub-folder, and it is written beside the shards as `namespace.json` for humans.
        writer (`str`, defaults to `"0"`): Distinguishes the shards of concurrent writers (the process index).
        shard_size (`int`, defaults to 256): Entries buffered before a shard is written.
    """

    def __init__(self, root: str, kind: str, namespace: Mapping, writer: str = "0", shard_size: int = 256):
        text = json.dumps(dict(namespace), sort_keys=True)
        self.folder = os.path.join(root, f"{kind}-{_sha256(text)[:16]}")
        info = os.path.join(self.folder, "namespace.json")
        try:
            os.makedirs(self.folder, exist_ok=True)
            if not os.path.exists(info):
                tmp = f"{info}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "w") as file:
                    file.write(text)
                os.replace(tmp, info)
        except OSError as error:
            raise ValueError(
                f"The feature cache folder {self.folder!r} (--feature_cache_dir {root!r}) cannot be created: "
                f"{type(error).__name__}: {error}. Give a writable folder."
            ) from error
        self.writer = str(writer)
        self.shard_size = int(shard_size)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: dict[str, object] = {}
        self._shards: set[str] = set()
        self.index: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        r"""
        Index the shards now on disk (those other processes wrote since). A shard that does not open (truncated,
        not safetensors) is dropped with a warning naming it: it is renamed `<shard>.bad` when the folder is writable
        (else left and skipped), and its entries count as misses, so they are encoded again.
        """
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith(SHARD_PREFIX) and name.endswith(".safetensors")):
                continue
            path = os.path.join(self.folder, name)
            if path in self._shards:
                continue
            self._shards.add(path)
            try:
                with safe_open(path, framework="pt") as file:
                    names = list(file.keys())
            except (SafetensorError, OSError) as error:
                self._drop_shard(path, error)
                continue
            for tensor_name in names:
                self.index.setdefault(tensor_name.split("/", 1)[0], path)

    def _drop_shard(self, path: str, error: Exception) -> None:
        try:
            os.replace(path, path + BAD_SHARD_SUFFIX)
            action = f"renamed to {os.path.basename(path) + BAD_SHARD_SUFFIX!r}"
        except OSError as rename_error:  # a read-only folder, or another process renamed it first
            action = f"skipped (not renamed: {type(rename_error).__name__})"
        logger.warning(
            f"Feature cache shard {path} cannot be read ({type(error).__name__}: {error}); {action}, its entries "
            "will be encoded again."
        )

    def writable(self) -> str | None:
        """`None` when a shard can be written to the cache folder now, else the reason (the `OSError`'s text)."""
        probe = os.path.join(self.folder, f".write-probe-{uuid.uuid4().hex}")
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as error:
            return f"{type(error).__name__}: {error}"
        return None

    def require_writable(self, missing: int, total: int) -> None:
        r"""
        Raise a `ValueError` at start, naming the folder, when `missing` of the `total` entries a run needs are not
        cached and the folder is not writable (the run would encode them and crash when writing the first shard). A
        complete cache may be read-only.
        """
        if missing and (reason := self.writable()) is not None:
            raise ValueError(
                f"The feature cache folder {self.folder!r} is not writable ({reason}) and misses {missing} of the "
                f"{total} entries this run needs: fill it first (--precompute_only, with write access) or give a "
                "writable --feature_cache_dir."
            )

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending

    def __len__(self) -> int:
        return len(set(self.index) | set(self._pending))

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of entry `key` (CPU); `KeyError` when absent."""
        if key in self._pending:
            return dict(self._pending[key])
        path = self.index[key]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt")
        prefix = f"{key}/"
        return {name[len(prefix) :]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add an entry (buffered; a shard is written every `shard_size` entries and by [`flush`])."""
        if key in self:
            return
        self._pending[key] = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered entries as one new shard; returns its path (None when nothing was buffered)."""
        if not self._pending:
            return None
        tensors = {f"{key}/{name}": t for key, entry in self._pending.items() for name, t in entry.items()}
        path = os.path.join(self.folder, f"{SHARD_PREFIX}{self.writer}-{uuid.uuid4().hex}.safetensors")
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        self._shards.add(path)
        for key in self._pending:
            self.index.setdefault(key, path)
        self._pending = {}
        return path

    def __getstate__(self):  # DataLoader workers: open handles do not pickle; they reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# ---------------------------------------------------------------------------------------------------------------------
# Using the caches in training
# ---------------------------------------------------------------------------------------------------------------------


def pad_text_entry(entry: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored text entry -> `(embeds (L, D), mask (L,))`, the cut-off padding restored as zeros."""
    embeds, mask = entry["embeds"], entry["mask"]
    full = embeds.new_zeros(mask.shape[0], embeds.shape[1])
    full[: embeds.shape[0]] = embeds
    return full, mask


def text_entry(embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`(embeds (L, D), mask (L,))` -> the stored form: embeds cut after the last unmasked token (at least one)."""
    used = mask.bool().nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return {"embeds": embeds[:length], "mask": mask}


class CachedPromptEncoder:
    r"""
    A [`~training.data.PromptEncoder`] in front of a text [`FeatureCache`]: cached captions are read, the others
    encoded by `make_encoder()` (called, and so the tokenizer and text encoder constructed, only at the first miss)
    and stored. Same call signature and outputs as `PromptEncoder`.
    """

    def __init__(self, cache: FeatureCache, make_encoder, max_sequence_length: int):
        self.cache = cache
        self.make_encoder = make_encoder
        self.max_sequence_length = max_sequence_length
        self.encoder = None

    def __call__(self, prompts, device=None, instruction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        keys = [text_key(prompt, instruction) for prompt in prompts]
        missing = sorted({prompt for prompt, key in zip(prompts, keys) if key not in self.cache})
        if missing:
            if self.encoder is None:
                self.encoder = self.make_encoder()
            embeds, mask = self.encoder(missing, instruction=instruction)
            for prompt, row_embeds, row_mask in zip(missing, embeds, mask):
                self.cache.put(text_key(prompt, instruction), text_entry(row_embeds, row_mask))
        rows = [pad_text_entry(self.cache.get(key)) for key in keys]
        embeds = torch.stack([row[0] for row in rows])
        mask = torch.stack([row[1] for row in rows])
        return embeds.to(device) if device is not None else embeds, mask.to(device) if device is not None else mask

    def null(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt, without the instruction (as `PromptEncoder.null`)."""
        return self([""], device=device, instruction=False)


class CachedLatentImageDataset(torch.utils.data.Dataset):
    r"""
    An [`~training.data.ImageCaptionDataset`] (centre crop) in front of a latent [`FeatureCache`]:
    `(epoch, index)` -> `{"latents": vae_latent * scaling_factor, "caption"}` when the latent of the row's image at its
    target size and drawn flip is cached (the image is then not decoded), else
    `{"pixel_values", "latent_key", "caption"}` for the training loop to encode and store. The flip and the caption
    choice are drawn exactly as `ImageCaptionDataset` draws them.
    """

    def __init__(self, images, cache: FeatureCache):
        if not images.center_crop:
            raise ValueError(
                "The latent cache stores one crop per image and bin: it needs --center_crop (a random crop would be "
                "fixed at its first draw)."
            )
        self.images = images
        self.cache = cache
        self._hashes: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.images)

    def latent_key(self, index: int, flip: bool) -> str:
        index = int(index)
        if index not in self._hashes:
            source = self.images.rows[index][self.images.image_column]
            try:
                self._hashes[index] = image_content_hash(source)
            except (OSError, ValueError) as error:  # a missing file, no image
                raise invalid_image_error(error, source, index) from error
        return latent_key(self._hashes[index], self.images.target_size(index), flip)

    def missing_entries(self) -> int:
        """How many latent entries (every row, both flips with `random_flip`) are not cached (hashes every image)."""
        flips = (False, True) if self.images.random_flip else (False,)
        return sum(self.latent_key(index, flip) not in self.cache for index in range(len(self)) for flip in flips)

    def __getitem__(self, key) -> dict:
        epoch, index = (0, key) if isinstance(key, numbers.Integral) else key
        generator = augmentation_generator(self.images.seed, epoch, index)
        flip = _draw_flip(generator, self.images.random_flip)
        cache_key = self.latent_key(index, flip)
        if cache_key not in self.cache:
            sample = self.images.load(index, epoch)
            return {"pixel_values": sample["pixel_values"], "latent_key": cache_key, "caption": sample["caption"]}
        caption = _pick_caption(self.images.rows[int(index)][self.images.caption_column], generator, row_name(index))
        return {"latents": self.cache.get(cache_key)["latents"], "latent_key": cache_key, "caption": caption}


def collate_cached_examples(examples) -> dict:
    r"""
    [`~training.data.collate_examples`] of [`CachedLatentImageDataset`] samples (cached and uncached ones mix in one
    batch: `latents` / `pixel_values` are lists with `None` where absent); [`resolve_latents`] completes them.
    """
    return collate_examples(examples)


def resolve_latents(batch: Mapping, cache: FeatureCache, encode, sigma_data: float, device) -> torch.Tensor:
    r"""
    The batch's data latents `x0` (training units, on `device`): cached ones read, the others encoded by
    `encode(pixel_values) -> vae_latent * scaling_factor` (e.g. `encode_images(vae, pixels, sigma_data=1.0)`, called
    only when something is missing) and stored. `batch` is a [`collate_examples`] batch of
    [`CachedLatentImageDataset`] samples, whichever of them are cached (none, some or all).
    """
    keys = batch["latent_key"]
    latents = list(batch["latents"]) if "latents" in batch else [None] * len(keys)
    missing = [i for i, latent in enumerate(latents) if latent is None]
    for i in missing:  # another sample of this run may have stored it since the worker looked
        if keys[i] in cache:
            latents[i] = cache.get(keys[i])["latents"]
    missing = [i for i in missing if latents[i] is None]
    if missing:
        encoded = encode(torch.stack([batch["pixel_values"][i] for i in missing]).to(device)).cpu()
        for i, latent in zip(missing, encoded):
            cache.put(keys[i], {"latents": latent})
            latents[i] = latent
    return torch.stack(latents).to(device) * sigma_data


def row_captions(images, rows: Iterable[int]) -> list[str]:
    """Every caption choice of `rows` of an `ImageCaptionDataset` (each checked by `caption_choices`)."""
    column = images.caption_column
    return [caption for index in rows for caption in caption_choices(images.rows[int(index)][column], row_name(index))]


def check_caches_writable(
    dataset: CachedLatentImageDataset, prompt_encoder: "CachedPromptEncoder | None" = None, extra_prompts=()
) -> None:
    r"""
    Before training: when a cache folder is not writable, count what the run needs that it misses (every latent of
    `dataset`; every caption, the empty prompt and `extra_prompts` of `prompt_encoder`'s cache) and raise naming the
    folder if anything is missing (see [`FeatureCache.require_writable`]). Writable caches cost nothing here.
    """
    if dataset.cache.writable() is not None:
        flips = 2 if dataset.images.random_flip else 1
        dataset.cache.require_writable(dataset.missing_entries(), len(dataset) * flips)
    if prompt_encoder is not None and prompt_encoder.cache.writable() is not None:
        keys = {text_key(c, True) for c in row_captions(dataset.images, range(len(dataset))) + list(extra_prompts)}
        keys.add(text_key("", False))
        missing = [key for key in keys if key not in prompt_encoder.cache]
        prompt_encoder.cache.require_writable(len(missing), len(keys))


@torch.no_grad()
def fill_caches(
    dataset: CachedLatentImageDataset,
    prompt_encoder: CachedPromptEncoder | None,
    encode,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    extra_prompts=(),
    device=None,
    progress=None,
) -> dict:
    r"""
    `--precompute_only`: store every missing latent (both flips with `random_flip`) and text embedding (every caption
    of a list) of the rows `process_index, process_index + num_processes, ...`, plus the empty prompt and
    `extra_prompts` (validation prompts) on process 0. Latents are encoded in batches of one target size.
    Returns `{"latents": encoded, "captions": encoded}` counts of this process.
    """
    images = dataset.images
    flips = (False, True) if images.random_flip else (False,)
    rows = range(process_index, len(dataset), num_processes)
    todo: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for index in rows:
        for flip in flips:
            if dataset.latent_key(index, flip) not in dataset.cache:
                todo.setdefault(images.target_size(index), []).append((index, flip))
    encoded_latents = 0
    for size in sorted(todo):
        work = todo[size]
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            pixels = torch.stack(
                [images.load(i, 0, flip=flip, pick_caption=False)["pixel_values"] for i, flip in chunk]
            )
            latents = encode(pixels.to(device) if device is not None else pixels).cpu()
            for (index, flip), latent in zip(chunk, latents):
                dataset.cache.put(dataset.latent_key(index, flip), {"latents": latent})
            encoded_latents += len(chunk)
            if progress is not None:
                progress(len(chunk))
    dataset.cache.flush()
    encoded_captions = 0
    if prompt_encoder is not None:
        captions = row_captions(images, rows)
        missing = sorted({c for c in captions if text_key(c, True) not in prompt_encoder.cache})
        for start in range(0, len(missing), batch_size):
            prompt_encoder(missing[start : start + batch_size])
        encoded_captions = len(missing)
        if process_index == 0:
            prompt_encoder.null()
            if extra_prompts:
                prompt_encoder(list(extra_prompts))
        prompt_encoder.cache.flush()
    return {"latents": encoded_latents, "captions": encoded_captions}


__all__ = [
    "CachedLatentImageDataset",
    "CachedPromptEncoder",
    "FeatureCache",
    "check_caches_writable",
    "collate_cached_examples",
    "fill_caches",
    "pad_text_entry",
    "resolve_latents",
    "text_entry",
    "image_content_hash",
    "latent_key",
    "model_digest",
    "text_key",
]
