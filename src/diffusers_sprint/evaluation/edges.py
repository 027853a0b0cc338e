"""Edge maps and edge adherence: how well generated images follow an edge condition (ControlNet evaluation).

    from diffusers_sprint.evaluation.edges import edge_maps, edge_adherence
    condition = edge_maps(source_images)                      # (N, H, W) bool, the ControlNet's condition
    report = edge_adherence(generated_images, condition)      # {"f1": ..., "precision": ..., "recall": ..., ...}

Edges are thresholded Sobel gradient magnitudes of the luminance in `[0, 1]` (replicate padding, so the image border
is not an edge). Adherence is the boundary F1 of BSDS-style edge benchmarks with a pixel tolerance: a generated edge
pixel is correct (precision) when a condition edge lies within `tolerance` pixels (Chebyshev distance), and a
condition edge pixel is found (recall) when a generated edge lies within `tolerance`. F1 is computed per image and
averaged. Generic: any image size, any source of condition maps (a binary map from another detector works too).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# A luminance step above this height is an edge (the Sobel magnitude is normalised so that a sharp step of height h
# scores h). 0.2 keeps the dark features and colour boundaries of the toy images and most of their outlines.
DEFAULT_THRESHOLD = 0.2
DEFAULT_TOLERANCE = 1
_LUMA = (0.299, 0.587, 0.114)


def _images_to_tensor(images) -> torch.Tensor:
    """PIL images, a uint8/float array `(N, H, W[, 3])` or a float tensor `(N, 3|1, H, W)` in `[0, 1]` -> float
    tensor `(N, C, H, W)` in `[0, 1]`."""
    if isinstance(images, torch.Tensor):
        tensor = images.float()
        return tensor if tensor.ndim == 4 else tensor[:, None]
    if isinstance(images, (list, tuple)) and len(images) > 0 and not isinstance(images[0], np.ndarray):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"`images` must be (N, H, W) or (N, H, W, C), got shape {array.shape}.")
    tensor = torch.from_numpy(array.astype(np.float32)).permute(0, 3, 1, 2)
    return tensor / 255.0 if array.dtype == np.uint8 else tensor


def luminance(images) -> torch.Tensor:
    """Luminance `(N, 1, H, W)` in `[0, 1]` (ITU-R 601 weights for RGB; grey images are returned as they are)."""
    tensor = _images_to_tensor(images)
    if tensor.shape[1] == 1:
        return tensor
    if tensor.shape[1] != 3:
        raise ValueError(f"`images` must have 1 or 3 channels, got {tensor.shape[1]}.")
    weights = torch.tensor(_LUMA, dtype=tensor.dtype).view(1, 3, 1, 1)
    return (tensor * weights).sum(dim=1, keepdim=True)


def sobel_magnitude(images) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance, `(N, H, W)`, divided by 4: a sharp step of height `h` gives `h` on
    the pixel either side of it (a 2-pixel-wide edge)."""
    gray = F.pad(luminance(images), (1, 1, 1, 1), mode="replicate")
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]
    gradients = F.conv2d(gray, kernels.to(gray.dtype)) / 4.0
    return gradients.square().sum(dim=1).sqrt()


def edge_maps(images, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Binary edge maps `(N, H, W)` (bool): Sobel magnitude of the luminance above `threshold`."""
    if not threshold > 0:
        raise ValueError(f"`threshold` must be positive, got {threshold}.")
    return sobel_magnitude(images) > threshold


def edge_images(edges: torch.Tensor):
    """Binary edge maps `(N, H, W)` -> RGB PIL images, white edges on black (the usual ControlNet edge condition)."""
    from PIL import Image

    edges = _as_edge_tensor(edges, "edges")
    array = edges.to(torch.uint8).mul(255).numpy()
    return [Image.fromarray(np.repeat(a[..., None], 3, axis=-1)) for a in array]


def _as_edge_tensor(edges, name: str) -> torch.Tensor:
    edges = torch.as_tensor(np.asarray(edges) if not isinstance(edges, torch.Tensor) else edges)
    if edges.ndim != 3:
        raise ValueError(f"`{name}` must be binary maps of shape (N, H, W), got shape {tuple(edges.shape)}.")
    return edges.bool()


def _dilate(edges: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return edges
    return F.max_pool2d(edges[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def edge_f1(predicted, target, tolerance: int = DEFAULT_TOLERANCE) -> dict[str, np.ndarray]:
    r"""
    Per-image boundary precision, recall and F1 of binary edge maps.

    Args:
        predicted (`(N, H, W)` bool): edges of the generated images.
        target (`(N, H, W)` bool): the condition edges.
        tolerance (`int`, defaults to 1): match radius in pixels (Chebyshev); 0 is exact pixel overlap.

    Returns:
        `{"precision", "recall", "f1"}`, each an array of shape `(N,)`. An image without predicted edges has
        precision 0 (1 if the target is empty too), one without target edges recall 0 (1 if both are empty); F1 is
        0 when precision + recall is 0.
    """
    predicted, target = _as_edge_tensor(predicted, "predicted"), _as_edge_tensor(target, "target")
    if predicted.shape != target.shape:
        raise ValueError(
            f"`predicted` {tuple(predicted.shape)} and `target` {tuple(target.shape)} must have the same shape."
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"`tolerance` must be an int >= 0 (pixels), got {tolerance!r}.")
    dims = (1, 2)
    num_predicted, num_target = predicted.sum(dims).double(), target.sum(dims).double()
    hits_predicted = (predicted & _dilate(target, tolerance)).sum(dims).double()
    hits_target = (target & _dilate(predicted, tolerance)).sum(dims).double()
    both_empty = (num_predicted == 0) & (num_target == 0)
    precision = torch.where(num_predicted > 0, hits_predicted / num_predicted.clamp(min=1), both_empty.double())
    recall = torch.where(num_target > 0, hits_target / num_target.clamp(min=1), both_empty.double())
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), torch.zeros_like(recall))
    return {"precision": precision.numpy(), "recall": recall.numpy(), "f1": f1.numpy()}


def edge_adherence(
    images, condition_edges, threshold: float = DEFAULT_THRESHOLD, tolerance: int = DEFAULT_TOLERANCE
) -> dict[str, float]:
    r"""
    How well `images` follow `condition_edges`: mean per-image boundary F1 (with precision and recall) of the
    images' own edge maps (`edge_maps(images, threshold)`) against the condition, and the mean L1 distance between the
    two binary maps (the fraction of pixels that disagree).

    Args:
        images: the generated images (PIL list, array or tensor in `[0, 1]`), `N` of them.
        condition_edges (`(N, H, W)` bool): the edge maps the images were conditioned on, same size.
        threshold (`float`, defaults to 0.2): edge threshold applied to `images`.
        tolerance (`int`, defaults to 1): match radius in pixels.

    Returns:
        `{"f1", "precision", "recall", "l1", "num_images"}` (means over images).
    """
    predicted = edge_maps(images, threshold)
    target = _as_edge_tensor(condition_edges, "condition_edges")
    if predicted.shape != target.shape:
        raise ValueError(
            f"`condition_edges` must have shape {tuple(predicted.shape)} (one map per image, the images' size), got "
            f"{tuple(target.shape)}."
        )
    scores = edge_f1(predicted, target, tolerance)
    l1 = (predicted != target).float().mean(dim=(1, 2))
    return {
        "f1": float(scores["f1"].mean()),
        "precision": float(scores["precision"].mean()),
        "recall": float(scores["recall"].mean()),
        "l1": float(l1.mean()),
        "num_images": int(predicted.shape[0]),
    }


__all__ = ["edge_adherence", "edge_f1", "edge_images", "edge_maps", "luminance", "sobel_magnitude"]
