"""Emoji layouts that a caption does not imply (mirror and shift), the toy ControlNet's conditions.

The toy teacher draws each emoji upright and centred, as in its data, and a strong teacher already matches the edge
map of that centred emoji (docs/toy.md): an edge condition taken from the emoji itself tells it nothing its caption
does not. The toy ControlNet is therefore trained and scored on *relaid* emoji: mirrored left-right or not, and
shifted by up to `MAX_SHIFT` pixels in x and y with a white fill, so only the condition says where the edges go.

A layout is a row `(mirror, dx, dy)` of an int64 tensor: `mirror` in {0, 1}, `dx` / `dy` in pixels (positive:
right / down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .protocol import SEED_STRIDE


MAX_SHIFT = 4
"""Largest shift in pixels at 32 px (half a latent cell of the toy autoencoder; the emoji stays inside the frame)."""


def random_layouts(count: int, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """`count` layouts `(count, 3)`: mirror with probability 1/2, `dx`, `dy` uniform over `[-max_shift, max_shift]`."""
    if max_shift < 0:
        raise ValueError(f"`max_shift` must be >= 0, got {max_shift}.")
    mirror = torch.randint(2, (count, 1), generator=generator)
    shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator)
    return torch.cat([mirror, shifts], dim=1)


def row_layouts(rows, seed: int = 0, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """The fixed layout of each dataset row (the evaluation's), `(len(rows), 3)`: row `i` draws from generator
    `seed * SEED_STRIDE + i`, so a row's layout does not depend on which other rows are chosen."""
    layouts = [random_layouts(1, torch.Generator().manual_seed(seed * SEED_STRIDE + int(i)), max_shift) for i in rows]
    return torch.cat(layouts) if layouts else torch.zeros(0, 3, dtype=torch.long)


def relayout(images: torch.Tensor, layouts: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Mirror and shift each image `(N, C, H, W)` by its layout `(N, 3)`; uncovered pixels get `fill` (white: 1 in
    `[0, 1]` and `[-1, 1]` pixels, 255 in uint8 ones)."""
    if images.ndim != 4 or layouts.shape != (images.shape[0], 3):
        shapes = f"{tuple(images.shape)} and {tuple(layouts.shape)}"
        raise ValueError(f"`images` must be (N, C, H, W) and `layouts` (N, 3), got {shapes}.")
    margin = int(layouts[:, 1:].abs().max()) if len(layouts) else 0
    height, width = images.shape[-2:]
    padded = F.pad(images, (margin,) * 4, value=fill)
    out = []
    for image, (mirror, dx, dy) in zip(padded, layouts.tolist()):
        if mirror:
            image = image.flip(-1)
        top, left = margin - dy, margin - dx  # output pixel (y, x) shows input pixel (y - dy, x - dx)
        out.append(image[:, top : top + height, left : left + width])
    return torch.stack(out)


def relaid_images(images, rows, seed: int = 0, max_shift: int = MAX_SHIFT) -> list:
    """PIL images of the dataset rows `rows` (one image per row, in order), each relaid by its [`row_layouts`]
    layout: the toy ControlNet's evaluation images (their edge maps are the conditions)."""
    from PIL import Image

    from ..evaluation.fid import to_uint8_tensor

    if len(images) != len(rows):
        raise ValueError(f"`images` and `rows` must have the same length, got {len(images)} and {len(rows)}.")
    if not images:
        return []
    relaid = relayout(to_uint8_tensor(images), row_layouts(rows, seed, max_shift), fill=255)  # exact on uint8
    return [Image.fromarray(array) for array in relaid.permute(0, 2, 3, 1).numpy()]
