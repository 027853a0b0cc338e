"""The image arguments of the image-to-image (`image`) and ControlNet (`control_image`) pipelines: every PIL mode as
the training data reads it, numpy arrays and tensors of 1-4 channels, their value ranges, batches, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_sprint.pipelines.image_input import normalize_image_input
from diffusers_sprint.training.data import image_to_rgb


ARGUMENTS = ["image", "control_image"]
FAST = dict(complex_human_instruction=None, output_type="np", use_resolution_binning=False, height=32, width=32)


@pytest.fixture(scope="module")
def pipes(make_sprint_pipelines):
    """`{argument: pipeline}`: image-to-image and ControlNet pipelines on the same tiny components."""
    pipes = make_sprint_pipelines()
    return {"image": pipes["img2img"], "control_image": pipes["controlnet"]}


def _run(pipes, argument, value, prompt="a red cat", **kwargs):
    call = dict(FAST, prompt=prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
    if argument == "image":
        call["strength"] = 0.7
    return pipes[argument](**call, **{argument: value}).images


def _rgba(seed=0, size=32) -> np.ndarray:
    """`(size, size, 4)` uint8: colour gradients and an alpha ramp from transparent to opaque."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    rgb = np.stack([0.5 + 0.5 * np.sin(5 * x + 3 * y + p) for p in phase], axis=-1)
    return np.round(255 * np.concatenate([rgb, x[..., None]], axis=-1)).astype(np.uint8)


def _pil(mode: str) -> Image.Image:
    rgba = Image.fromarray(_rgba(), mode="RGBA")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgba.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
        return image
    if mode == "P-transparency":
        palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        palette.info["transparency"] = 3
        return palette
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "P-transparency", "RGBA", "1", "LA", "I;16", "CMYK"])
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_pil_images_of_any_mode_are_read_as_the_training_data_reads_them(pipes, argument, mode):
    image = _pil(mode)
    rgb = image_to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    expected = _run(pipes, argument, rgb)
    assert np.abs(_run(pipes, argument, image) - expected).max() == 0
    assert np.abs(_run(pipes, argument, [image]) - expected).max() == 0


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_the_image_changes_the_output(pipes, argument):
    """The control for the equalities in this file: another image gives another output."""
    first = _run(pipes, argument, _pil("RGBA").convert("RGB"))
    second = _run(pipes, argument, Image.fromarray(_rgba(seed=1)[..., :3]))
    assert np.abs(first - second).max() > 1e-2


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_uint8_arrays_are_the_pil_images_of_their_pixels(pipes, argument, channels):
    pixels = _rgba()
    array = {1: pixels[..., 0], 2: pixels[..., [0, 3]], 3: pixels[..., :3], 4: pixels}[channels]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    expected = _run(pipes, argument, Image.fromarray(array, mode=mode))
    for form in (array, array[..., None] if channels == 1 else array[None], [array]):
        assert np.abs(_run(pipes, argument, form) - expected).max() == 0


def test_float_grey_and_alpha_are_read_like_their_8_bit_images():
    """One rule for every form: grey is repeated, alpha composited onto white (to 1/255 of the 8-bit PIL result)."""
    pixels = _rgba()
    for channels, array in ((1, pixels[..., :1]), (2, pixels[..., [0, 3]]), (4, pixels)):
        mode = {1: "L", 2: "LA", 4: "RGBA"}[channels]
        expected = np.asarray(image_to_rgb(Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)))
        expected = expected.astype(np.float32) / 255
        floats = array.astype(np.float32) / 255
        as_array = normalize_image_input(floats, "image")
        as_tensor = normalize_image_input(torch.from_numpy(floats).permute(2, 0, 1), "image")
        signed = normalize_image_input(torch.from_numpy(2 * floats - 1).permute(2, 0, 1), "image")
        assert as_array.shape == (1, 32, 32, 3) and as_tensor.shape == signed.shape == (1, 3, 32, 32)
        assert np.abs(as_array[0] - expected).max() <= 1 / 255 + 1e-6, channels
        # [-1, 1] input is composited in [0, 1]; grey alone keeps its range (diffusers reads it as [-1, 1]).
        signed_expected = 2 * expected - 1 if channels == 1 else expected
        for result, target in ((as_tensor, expected), (signed, signed_expected)):
            assert np.abs(result[0].permute(1, 2, 0).numpy() - target).max() <= 2 / 255 + 1e-6, channels
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(normalize_image_input(grey, "image"), grey.repeat(1, 3, 1, 1), rtol=0, atol=0)
    rgb = torch.rand(2, 3, 8, 8)
    assert normalize_image_input(rgb, "image") is rgb  # diffusers' own forms pass unchanged


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_grey_and_rgba_tensors_and_float_arrays_run_in_the_pipelines(pipes, argument):
    floats = _rgba().astype(np.float32) / 255
    composite = floats[..., :3] * floats[..., 3:] + 1 - floats[..., 3:]
    expected = _run(pipes, argument, torch.from_numpy(composite).permute(2, 0, 1))
    assert np.abs(_run(pipes, argument, torch.from_numpy(floats).permute(2, 0, 1)) - expected).max() <= 1e-6
    assert np.abs(_run(pipes, argument, floats) - _run(pipes, argument, composite)).max() <= 1e-6
    grey = floats[..., :1]
    expected = _run(pipes, argument, np.repeat(grey, 3, axis=-1))
    assert np.abs(_run(pipes, argument, grey) - expected).max() <= 1e-6
    assert np.abs(_run(pipes, argument, torch.from_numpy(grey).permute(2, 0, 1)) - expected).max() <= 1e-6


BAD_INPUTS = [
    (np.full((32, 32, 3), 1.5, np.float32), ValueError, r"is a float numpy array with values in \[1.5, 1.5\]"),
    (torch.full((3, 32, 32), -2.0), ValueError, r"is a float torch tensor with values in \[-2, -2\]"),
    (np.full((32, 32, 3), np.nan, np.float32), ValueError, "is a float numpy array with non-finite values"),
    (torch.full((1, 3, 32, 32), float("inf")), ValueError, "is a float torch tensor with non-finite values"),
    (np.zeros((32, 32, 3), np.int64), TypeError, "is a numpy array of dtype int64; it must be uint8 or float"),
    (torch.zeros((3, 32, 32), dtype=torch.uint8), TypeError, "is a torch tensor of dtype torch.uint8"),
    (torch.zeros(1, 32, 4, 4), ValueError, r"of shape \(1, 32, 4, 4\).*\(VAE latents are not accepted\)"),
    (torch.zeros(1, 5, 32, 32), ValueError, r"of shape \(1, 5, 32, 32\); a torch tensor must be \(C, H, W\)"),
    (np.zeros((32, 32, 6), np.float32), ValueError, r"of shape \(1, 32, 32, 6\); a numpy array must be \(H, W\)"),
    (torch.zeros(32, 32), ValueError, r"of shape \(32, 32\); a torch tensor must be"),
    (np.zeros(32, np.float32), ValueError, r"numpy array of shape \(32,\)"),
    (np.zeros((0, 32, 32, 3), np.float32), ValueError, "is an empty numpy array"),
    ([], ValueError, "must not be an empty list"),
    ("picture.png", TypeError, "is of type str; pass a PIL image"),
    ([Image.new("RGB", (32, 32)), np.zeros((32, 32, 3))], TypeError, "mixes PIL image, numpy array"),
    ([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3))], TypeError, "mixes uint8 and float numpy arrays"),
    ([torch.zeros(3, 32, 32), torch.zeros(3, 16, 32)], ValueError, r"sizes \[\(16, 32\), \(32, 32\)\]"),
    ([torch.zeros(3, 32, 32), 7], TypeError, r"`\w+\[1\]` is of type int"),
    (Image.fromarray(np.full((32, 32), 2.0, np.float32), mode="F"), ValueError, r"mode F\) cannot be read"),
]


@pytest.mark.parametrize("value, error, match", BAD_INPUTS)
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_bad_images_raise_naming_the_argument_the_form_and_the_range(pipes, argument, value, error, match):
    with pytest.raises(error, match=match) as raised:
        _run(pipes, argument, value)
    assert f"`{argument}" in str(raised.value)
    assert argument == "image" or "`image" not in str(raised.value).replace("`control_image", "")


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_batches_must_fit_the_prompts(pipes, argument):
    """Counted on the images themselves: a list holding one `(B, H, W, C)` array has `B` images."""
    prompts = ["a red cat", "a blue dog"]
    three = [np.zeros((3, 32, 32, 3), np.float32)]
    expected = {
        "image": r"`image` holds 3 image\(s\), which does not divide the batch of 2",
        "control_image": r"`control_image` holds 3 images; pass 1 \(shared by all prompts\) or one per prompt \(2\)",
    }[argument]
    with pytest.raises(ValueError, match=expected):
        _run(pipes, argument, three, prompt=prompts)
    two = _run(pipes, argument, [np.full((2, 32, 32, 3), 0.5, np.float32)], prompt=prompts)
    assert two.shape == (2, 32, 32, 3)
