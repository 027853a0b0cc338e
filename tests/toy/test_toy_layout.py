"""The toy ControlNet's layouts (diffusers_sprint.toy.layout): mirror and shift moved pixel by pixel, row-seeded."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_sprint.toy.layout import MAX_SHIFT, random_layouts, relaid_images, relayout, row_layouts


def _ramp(height=6, width=7):
    return torch.arange(2 * height * width, dtype=torch.float32).view(1, 2, height, width)


def test_relayout_moves_each_pixel_by_its_layout():
    image = _ramp()
    out = relayout(image.expand(3, -1, -1, -1), torch.tensor([[0, 0, 0], [0, 2, -1], [1, 1, 0]]), fill=-5.0)
    torch.testing.assert_close(out[0], image[0], rtol=0, atol=0)  # the identity layout
    # dx=2, dy=-1: output (y, x) shows input (y + 1, x - 2); the uncovered left columns and bottom row get the fill
    torch.testing.assert_close(out[1, :, :-1, 2:], image[0, :, 1:, :-2], rtol=0, atol=0)
    assert (out[1, :, :, :2] == -5).all() and (out[1, :, -1, :] == -5).all()
    # mirrored, then shifted right by 1: output column x shows mirrored column x - 1, i.e. input column W - x
    torch.testing.assert_close(out[2, :, :, 1:], image[0].flip(-1)[:, :, :-1], rtol=0, atol=0)
    assert (out[2, :, :, 0] == -5).all()


def test_layouts_are_in_range_and_row_seeded():
    layouts = random_layouts(4000, torch.Generator().manual_seed(0))
    assert set(layouts[:, 0].tolist()) == {0, 1}
    assert layouts[:, 1:].min() == -MAX_SHIFT and layouts[:, 1:].max() == MAX_SHIFT
    assert abs(layouts[:, 0].float().mean().item() - 0.5) < 0.05
    # a row's layout does not depend on which other rows are asked for
    torch.testing.assert_close(row_layouts([5, 9, 700])[1:], row_layouts([9, 700]), rtol=0, atol=0)
    assert not torch.equal(row_layouts(range(50)), row_layouts(range(50), seed=1))
    with pytest.raises(ValueError, match="max_shift"):
        random_layouts(2, torch.Generator(), max_shift=-1)
    with pytest.raises(ValueError, match="layouts"):
        relayout(_ramp(), torch.zeros(2, 3, dtype=torch.long))


def test_relaid_images_match_the_tensor_relayout():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    rows = [3, 11, 40]
    relaid = relaid_images(images, rows)
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]).float() / 255
    expected = (relayout(pixels, row_layouts(rows)) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in relaid]), expected)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, relaid))
