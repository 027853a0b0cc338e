"""evaluation.edges: Sobel edge maps and boundary F1 on inputs with known answers."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_sprint.evaluation.edges import edge_adherence, edge_f1, edge_images, edge_maps, sobel_magnitude


def _square(size=32, low=8, high=24, shift=0):
    """A white image with a black filled square (shifted right by `shift` pixels)."""
    array = np.full((size, size, 3), 255, dtype=np.uint8)
    array[low:high, low + shift : high + shift] = 0
    return Image.fromarray(array)


def _line_maps(column, size=16, rows=slice(None)):
    maps = torch.zeros(1, size, size, dtype=torch.bool)
    maps[0, rows, column] = True
    return maps


def test_sobel_of_a_sharp_step_is_its_height_and_the_border_is_no_edge():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 0.6
    magnitude = sobel_magnitude(image)
    torch.testing.assert_close(magnitude[0, :, 3], torch.full((8,), 0.6))  # the step height, on both sides
    torch.testing.assert_close(magnitude[0, :, 4], torch.full((8,), 0.6))
    assert magnitude[0, :, [0, 1, 2, 5, 6, 7]].abs().max() == 0
    assert sobel_magnitude(torch.ones(1, 3, 8, 8)).abs().max() == 0


def test_edge_maps_outline_a_square_and_accept_pil_arrays_and_tensors():
    edges = edge_maps([_square()])
    assert edges.shape == (1, 32, 32) and edges.dtype == torch.bool
    inside, outside = edges[0, 12:20, 12:20], edges[0, :6, :]
    assert not inside.any() and not outside.any()
    assert edges[0, 16, 7] and edges[0, 16, 8] and edges[0, 7, 16] and edges[0, 23, 16] and edges[0, 24, 16]
    array = np.array(_square())[None]
    assert torch.equal(edge_maps(array), edges)
    assert torch.equal(edge_maps(torch.from_numpy(array).permute(0, 3, 1, 2) / 255.0), edges)
    with pytest.raises(ValueError, match="threshold"):
        edge_maps(array, threshold=0)


def test_identical_edges_score_one_and_zero_l1():
    images = [_square(), _square(low=4, high=12)]
    condition = edge_maps(images)
    report = edge_adherence(images, condition)
    assert report == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "l1": 0.0, "num_images": 2}


def test_blank_and_shifted_images_score_worse():
    condition = edge_maps([_square()])
    blank = edge_adherence([Image.new("RGB", (32, 32), "white")], condition)
    assert blank["f1"] == 0.0 and blank["recall"] == 0.0 and blank["precision"] == 0.0
    assert blank["l1"] == pytest.approx(condition.float().mean().item())
    scores = [edge_adherence([_square(shift=s)], condition)["f1"] for s in (0, 1, 3, 6)]
    assert scores[0] == 1.0 and scores[1] == 1.0  # within the 1-pixel tolerance
    assert scores[0] > scores[2] > scores[3] > 0  # the horizontal sides still overlap
    assert edge_adherence([_square(shift=1)], condition, tolerance=0)["f1"] < 1.0


def test_edge_f1_known_values():
    target = _line_maps(5)
    assert edge_f1(_line_maps(6), target, tolerance=1)["f1"][0] == 1.0
    assert edge_f1(_line_maps(7), target, tolerance=1)["f1"][0] == 0.0
    assert edge_f1(_line_maps(7), target, tolerance=2)["f1"][0] == 1.0
    half = edge_f1(_line_maps(5, rows=slice(0, 8)), target, tolerance=0)
    assert half["precision"][0] == 1.0 and half["recall"][0] == 0.5
    assert half["f1"][0] == pytest.approx(2 / 3)
    empty = torch.zeros(1, 16, 16, dtype=torch.bool)
    assert edge_f1(empty, empty)["f1"][0] == 1.0
    assert edge_f1(empty, target)["f1"][0] == 0.0 and edge_f1(target, empty)["f1"][0] == 0.0


def test_argument_errors():
    target = _line_maps(5)
    with pytest.raises(ValueError, match="same shape"):
        edge_f1(target, torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(target, target, tolerance=-1)
    with pytest.raises(ValueError, match="predicted"):
        edge_f1(target[0], target)
    with pytest.raises(ValueError, match="condition_edges"):
        edge_adherence([_square()], torch.zeros(2, 32, 32, dtype=torch.bool))


def test_edge_images_are_white_edges_on_black():
    edges = edge_maps([_square()])
    (image,) = edge_images(edges)
    array = np.asarray(image)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert set(np.unique(array)) == {0, 255}
    np.testing.assert_array_equal(array[..., 0] == 255, edges[0].numpy())
