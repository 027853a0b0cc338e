"""The image arguments of the pipelines (`image`, `control_image`): every form diffusers documents, checked, and
brought to the 3-channel forms `VaeImageProcessor.preprocess` reads as diffusers does.

- PIL images of any mode become RGB as the training data does ([`~training.data.image_to_rgb`]: 16-bit and float
  grey scaled to 8 bits, transparency composited onto white, everything else Pillow's `convert("RGB")`).
- uint8 numpy arrays (`(H, W)`, `(H, W, C)`, `(B, H, W, C)`, values 0..255) are read as the PIL images of the same
  pixels (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), so they give exactly the images of those PIL images.
- Float numpy arrays (`(H, W)`, `(H, W, C)`, `(B, H, W, C)`) and float tensors (`(C, H, W)`, `(B, C, H, W)`) hold
  values in `[0, 1]`, or in `[-1, 1]` as diffusers' `VaeImageProcessor` reads them: a batch with any negative value is
  taken as already in `[-1, 1]`. RGB (C = 3) passes unchanged (diffusers' images); grey (C = 1) is repeated to RGB;
  grey + alpha (C = 2) and RGBA (C = 4) are composited onto white like a transparent PIL image.
- VAE latents are refused: neither diffusers' image-to-image nor its ControlNet pipeline can use them (the first
  resizes them to pixel size, the second passes them to `vae.encode`).
"""

import numpy as np
import PIL.Image
import torch

from ..training.data import image_to_rgb


IMAGE_FORMS = (
    "a PIL image (any mode), a numpy array (H, W), (H, W, C) or (B, H, W, C) of uint8 in [0, 255] or float in "
    "[0, 1], a torch tensor (C, H, W) or (B, C, H, W) of float in [-1, 1] (or [0, 1]), with C = 1 (grey), 2 (grey + "
    "alpha), 3 (RGB) or 4 (RGBA) channels, or a list of one of these forms"
)
_PIL_MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

NormalizedImage = list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _form(item) -> str:
    if isinstance(item, PIL.Image.Image):
        return "PIL image"
    if isinstance(item, np.ndarray):
        return "numpy array"
    if isinstance(item, torch.Tensor):
        return "torch tensor"
    return type(item).__name__


def _where(name: str, index: int | None) -> str:
    return f"`{name}`" if index is None else f"`{name}[{index}]`"


def _pil_to_rgb(image: PIL.Image.Image, name: str, index: int | None) -> PIL.Image.Image:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{_where(name, index)} is an empty image ({image.width}x{image.height} pixels).")
    try:
        return image_to_rgb(image)
    except (ValueError, OSError) as error:
        raise ValueError(f"{_where(name, index)} (a PIL image of mode {image.mode}) cannot be read: {error}") from None


def _as_batch(array, name: str, index: int | None, form: str, layout: str):
    """`array` as `(B, H, W, C)` (numpy) or `(B, C, H, W)` (tensor) with C in 1..4; raises naming the form."""
    channel_axis = -1 if form == "numpy array" else 1
    if form == "numpy array" and array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    where = _where(name, index)
    if array.ndim != 4 or array.shape[channel_axis] not in _PIL_MODES_BY_CHANNELS:
        raise ValueError(
            f"{where} is a {form} of shape {tuple(array.shape)}; a {form} must be {layout} with 1 (grey), 2 (grey + "
            "alpha), 3 (RGB) or 4 (RGBA) channels (VAE latents are not accepted)."
        )
    height, width = array.shape[1:3] if form == "numpy array" else array.shape[2:4]
    if array.shape[0] == 0 or height == 0 or width == 0:
        raise ValueError(f"{where} is an empty {form} of shape {tuple(array.shape)}.")
    return array


def _uint8_to_pil(array: np.ndarray, name: str, index: int | None) -> list[PIL.Image.Image]:
    """`(B, H, W, C)` uint8 -> the RGB PIL images of those pixels (grey / grey + alpha / RGB / RGBA)."""
    mode = _PIL_MODES_BY_CHANNELS[array.shape[-1]]
    pixels = array[..., 0] if mode == "L" else array
    return [_pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(p), mode=mode), name, index) for p in pixels]


def _check_float_range(image, name: str, form: str) -> bool:
    """Raises unless all values are finite and in `[-1, 1]`; returns whether they are read as `[-1, 1]`."""
    low, high = float(image.min()), float(image.max())
    finite = bool(np.isfinite(image).all()) if form == "numpy array" else bool(torch.isfinite(image).all())
    if not finite or low < -1 or high > 1:
        span = "non-finite values" if not finite else f"values in [{low:g}, {high:g}]"
        raise ValueError(
            f"`{name}` is a float {form} with {span}; float arrays and tensors must hold values in [0, 1], or in "
            "[-1, 1] (read as diffusers' VaeImageProcessor does: any negative value means the [-1, 1] range); "
            "8-bit pixels go in a uint8 numpy array."
        )
    return low < 0


def _to_rgb_float(image, signed: bool, channel_axis: int):
    """Grey -> RGB; grey + alpha and RGBA composited onto white (in [0, 1], `(c * a + 1 - a)`); RGB unchanged."""
    channels = image.shape[channel_axis]
    if channels == 3:
        return image
    concat = np.concatenate if isinstance(image, np.ndarray) else torch.cat
    if channels == 1:
        return concat([image] * 3, channel_axis)
    if signed:  # composite in [0, 1]: the result is then read as [0, 1] downstream
        image = (image + 1) / 2
    index = [slice(None)] * image.ndim
    index[channel_axis] = slice(channels - 1, channels)
    alpha = image[tuple(index)]
    index[channel_axis] = slice(0, channels - 1)
    colour = image[tuple(index)]
    if channels == 2:
        colour = concat([colour] * 3, channel_axis)
    return colour * alpha + (1 - alpha)


def normalize_image_input(image, name: str) -> NormalizedImage:
    r"""
    `image` in a form `VaeImageProcessor.preprocess` reads as diffusers does: a list of RGB PIL images, a float
    `(B, H, W, 3)` numpy array or a float `(B, 3, H, W)` tensor (values in `[0, 1]`, or `[-1, 1]` when any is
    negative). Inputs diffusers takes (RGB PIL, 3-channel float arrays and tensors) come back unchanged (up to
    batching), so they give diffusers' images. Raises a `TypeError` / `ValueError` naming `name`, the form and the
    allowed ones ([`IMAGE_FORMS`]).
    """
    if image is None:
        raise ValueError(f"`{name}` is required: {IMAGE_FORMS}.")
    listed = isinstance(image, (list, tuple))
    items = list(image) if listed else [image]
    if not items:
        raise ValueError(f"`{name}` must not be an empty list; pass {IMAGE_FORMS}.")
    forms = [_form(item) for item in items]
    for index, form in enumerate(forms):
        if form not in ("PIL image", "numpy array", "torch tensor"):
            raise TypeError(f"{_where(name, index if listed else None)} is of type {form}; pass {IMAGE_FORMS}.")
    if len(set(forms)) > 1:
        raise TypeError(f"`{name}` mixes {', '.join(sorted(set(forms)))}; pass a list of one form: {IMAGE_FORMS}.")
    form = forms[0]
    if form == "PIL image":
        return [_pil_to_rgb(item, name, index if listed else None) for index, item in enumerate(items)]

    layout = "(H, W), (H, W, C) or (B, H, W, C)" if form == "numpy array" else "(C, H, W) or (B, C, H, W)"
    batches = [_as_batch(item, name, i if listed else None, form, layout) for i, item in enumerate(items)]
    kinds = set()
    for index, batch in enumerate(batches):
        if batch.dtype == np.uint8 and form == "numpy array":
            kinds.add("uint8")
        elif (form == "numpy array" and np.issubdtype(batch.dtype, np.floating)) or (
            form == "torch tensor" and batch.is_floating_point()
        ):
            kinds.add("float")
        else:
            allowed = "uint8 or float" if form == "numpy array" else "floating point"
            raise TypeError(
                f"{_where(name, index if listed else None)} is a {form} of dtype {batch.dtype}; it must be "
                f"{allowed}: {IMAGE_FORMS}."
            )
    if len(kinds) > 1:
        raise TypeError(f"`{name}` mixes uint8 and float numpy arrays; pass one dtype: {IMAGE_FORMS}.")
    if kinds == {"uint8"}:
        return [pil for i, batch in enumerate(batches) for pil in _uint8_to_pil(batch, name, i if listed else None)]

    channel_axis = -1 if form == "numpy array" else 1
    channels = sorted({batch.shape[channel_axis] for batch in batches})
    sizes = sorted({tuple(batch.shape[1:3] if form == "numpy array" else batch.shape[2:4]) for batch in batches})
    if len(channels) > 1 or len(sizes) > 1:
        raise ValueError(
            f"`{name}` holds {form}s of sizes {sizes} and channel counts {channels}; a list of arrays or tensors must "
            "share one size and channel count (a list of PIL images may differ: each is resized)."
        )
    image = batches[0] if len(batches) == 1 else (np.concatenate if form == "numpy array" else torch.cat)(batches)
    signed = _check_float_range(image, name, form)
    return _to_rgb_float(image, signed, channel_axis)


def image_batch_size(image: NormalizedImage) -> int:
    """The number of images in a [`normalize_image_input`] result."""
    return len(image) if isinstance(image, list) else image.shape[0]


def image_size(image: NormalizedImage) -> tuple[int, int]:
    """`(height, width)` of the first image of a [`normalize_image_input`] result."""
    if isinstance(image, list):
        return image[0].height, image[0].width
    return tuple(image.shape[1:3]) if isinstance(image, np.ndarray) else tuple(image.shape[2:4])


__all__ = ["IMAGE_FORMS", "image_batch_size", "image_size", "normalize_image_input"]
