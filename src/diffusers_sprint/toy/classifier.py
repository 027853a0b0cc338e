"""Prompt adherence on the emoji toy: a small CNN that predicts an emoji's Unicode category from its 32x32 image.

score = accuracy of the predicted category against the category of the emoji named in the prompt. The shipped
weights (`emoji_classifier.safetensors`, ~0.4 MB) come from `examples/toy/train_emoji_classifier.py`; the classifier's
penultimate features also give a cheap Fréchet distance (`classifier_fid`), a fast second opinion next to FID.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .emoji import CAPTION_TEMPLATE, CATEGORIES


WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji_classifier.safetensors")


class EmojiClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), global average pool, linear head. Input: float NCHW in [-1, 1]."""

    def __init__(self, num_classes: int = len(CATEGORIES), width: int = 32, resolution: int = 32):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "resolution": resolution}

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config["resolution"] or x.shape[-2] != self.config["resolution"]:
            x = F.interpolate(x, size=(self.config["resolution"],) * 2, mode="bilinear", antialias=True)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: EmojiClassifier, path: str = WEIGHTS_PATH, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    info = {"config": json.dumps(model.config), "categories": json.dumps(list(CATEGORIES))}
    info.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=info)


def load_classifier(path: str = WEIGHTS_PATH, device: str = "cpu") -> EmojiClassifier:
    """The shipped classifier (eval mode). Its metadata records the held-out accuracy it was trained to."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train it with examples/toy/train_emoji_classifier.py")
    with safe_open(path, framework="pt") as handle:
        config = json.loads((handle.metadata() or {})["config"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    model = EmojiClassifier(**config)
    model.load_state_dict(state)
    return model.to(device).eval()


def classifier_metadata(path: str = WEIGHTS_PATH) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def images_to_tensor(images) -> torch.Tensor:
    """PIL list / uint8 NHWC array / uint8 or [0, 1] float NCHW tensor -> float NCHW in [-1, 1]."""
    from ..evaluation.fid import to_uint8_tensor

    return to_uint8_tensor(images).float() / 127.5 - 1


@torch.no_grad()
def predict_categories(images, model: EmojiClassifier | None = None, batch_size: int = 256) -> list[str]:
    model = model or load_classifier()
    x = images_to_tensor(images)
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return [CATEGORIES[i] for i in logits.argmax(dim=1).tolist()]


@torch.no_grad()
def classifier_features(images, model: EmojiClassifier | None = None, batch_size: int = 256) -> np.ndarray:
    model = model or load_classifier()
    x = images_to_tensor(images)
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def classifier_fid(images_a, images_b, model: EmojiClassifier | None = None) -> float:
    """Fréchet distance in the classifier's 128-d feature space (fast; not comparable with Inception FID)."""
    from ..evaluation.fid import fid_from_features

    model = model or load_classifier()
    return fid_from_features(classifier_features(images_a, model), classifier_features(images_b, model))


def prompt_categories(prompts: Sequence[str], template: str = CAPTION_TEMPLATE) -> list[str]:
    """Category of the emoji each prompt names ("an emoji of red apple" -> "Food & Drink")."""
    from .emoji import emoji_records

    by_name = {r["name"]: r["category"] for r in emoji_records()}
    prefix, _, suffix = template.partition("{name}")
    categories = []
    for prompt in prompts:
        name = prompt[len(prefix) :] if prompt.startswith(prefix) else prompt
        name = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        if name not in by_name:
            raise KeyError(f"No emoji named {name!r} (from prompt {prompt!r}).")
        categories.append(by_name[name])
    return categories


def prompt_adherence(images, prompts: Sequence[str], model: EmojiClassifier | None = None) -> float:
    """Fraction of images whose predicted category is the category of the emoji their prompt names."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    predicted = predict_categories(images, model)
    expected = prompt_categories(prompts)
    return float(np.mean([p == e for p, e in zip(predicted, expected)]))
