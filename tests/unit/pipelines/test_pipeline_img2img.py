"""SanaSprintImg2ImgPipeline: parity with diffusers where its schedule is defined, continuous strength and its two
limits, image types, sizes, batching and errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import SanaSprintImg2ImgPipeline as DiffusersImg2ImgPipeline
from PIL import Image

from diffusers_sprint import (
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    SanaSprintTransformer2DModel,
    TrigFlowScheduler,
)


PARITY_ATOL = 1e-5
PROMPTS = ["a red cat", "a small blue car on the big tree"]
FAST = dict(complex_human_instruction=None, output_type="np", use_resolution_binning=False)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _picture(seed=0, height=32, width=32) -> Image.Image:
    """A smooth colourful test picture (gradients plus a disc), so that the tiny VAE sees structure."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * x + 4 * y + p) for p in phase], axis=-1)
    rgb[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] = rng.uniform(0, 1, 3)
    return Image.fromarray((255 * rgb).astype(np.uint8))


@pytest.fixture(scope="module")
def diffusers_dir(save_diffusers_pipeline):
    """A folder written by diffusers' own SanaSprintImg2ImgPipeline."""
    return save_diffusers_pipeline(DiffusersImg2ImgPipeline)


@pytest.fixture(scope="module")
def reference(diffusers_dir):
    pipe = DiffusersImg2ImgPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(diffusers_dir):
    pipe = SanaSprintImg2ImgPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(reference, image, strength, steps, **kwargs):
    return reference(
        **FAST,
        prompt=PROMPTS,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        intermediate_timesteps=1.3 if steps == 2 else None,
        height=32,
        width=32,
        generator=_seeded(),
        **kwargs,
    ).images


def test_loads_diffusers_img2img_and_our_text_to_image_folders(diffusers_dir, pipe, tmp_path):
    assert json.loads((diffusers_dir / "model_index.json").read_text())["_class_name"] == "SanaSprintImg2ImgPipeline"
    assert type(pipe.transformer) is SanaSprintTransformer2DModel and type(pipe.scheduler) is TrigFlowScheduler
    SanaSprintPipeline(**pipe.components).save_pretrained(tmp_path)
    again = SanaSprintImg2ImgPipeline.from_pretrained(tmp_path)
    assert type(again.transformer) is SanaSprintTransformer2DModel
    shared = SanaSprintImg2ImgPipeline.from_pipe(SanaSprintPipeline(**pipe.components))
    assert shared.transformer is pipe.transformer


@pytest.mark.parametrize(
    "steps, strength, kept_grid",
    [
        (2, 0.8, None),  # int(2 - 1.6) = 0: diffusers runs its whole grid [1.5708, 1.3, 0]
        (2, 0.4, [1.3]),  # int(2 - 0.8) = 1: diffusers starts at 1.3, one step
        (4, 0.5, [0.785400, 0.392700]),  # int(4 - 2) = 2: the last two times of linspace(1.5708, 0, 5)
    ],
)
def test_images_match_diffusers_on_the_grid_it_keeps(reference, pipe, steps, strength, kept_grid):
    image = _picture()
    expected = _diffusers(reference, image, strength, steps)
    if kept_grid is None:
        kwargs = dict(num_inference_steps=steps)
    else:  # diffusers' linspace grid in float32, as its scheduler holds it
        kwargs = dict(timesteps=torch.linspace(1.57080, 0, steps + 1)[steps - len(kept_grid) : -1])
        if steps == 2:
            kwargs = dict(timesteps=[1.3])
        np.testing.assert_allclose(kwargs["timesteps"], kept_grid, atol=1e-6)
    got = pipe(**FAST, prompt=PROMPTS, image=image, strength=1.0, generator=_seeded(), **kwargs).images
    assert expected.shape == got.shape == (2, 32, 32, 3) and expected.std() > 0.01
    assert np.abs(got - expected).max() <= PARITY_ATOL


def test_diffusers_one_step_ignores_the_image_ours_does_not(reference, pipe):
    """diffusers' 1-step image-to-image starts at t = 1.5708 for any strength < 1: pure noise, the image is unused."""
    first, second = _picture(0), _picture(1)
    diffusers_first = _diffusers(reference, first, 0.3, 1)
    diffusers_second = _diffusers(reference, second, 0.3, 1)
    assert np.abs(diffusers_first - diffusers_second).max() < 1e-4  # only cos(1.5708) = 3.7e-6 of the image
    ours = [
        pipe(**FAST, prompt=PROMPTS, image=im, strength=0.3, num_inference_steps=1).images for im in (first, second)
    ]
    assert np.abs(ours[0] - ours[1]).max() > 0.05


@pytest.mark.parametrize("steps", [1, 2])
def test_strength_changes_the_image_continuously_and_monotonically(pipe, steps):
    image = _picture()
    noise = torch.randn(1, 4, 16, 16, generator=_seeded(3))
    x0 = pipe.encode_image(pipe.prepare_image(image, 32, 32, "cpu", torch.float32), 1)
    x0 = x0 / pipe.scheduler.config.sigma_data

    def change(strength):
        out = pipe(
            **dict(FAST, output_type="latent"),
            prompt="a red cat",
            image=image,
            strength=strength,
            num_inference_steps=steps,
            latents=noise,
        ).images
        return float((out - x0).pow(2).mean().sqrt())

    strengths = [0.05, 0.3, 0.35, 0.6, 1.0]
    changes = [change(s) for s in strengths]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes
    assert changes[2] - changes[1] > 1e-3  # 0.3 and 0.35 differ


def test_strength_one_is_text_to_image_from_the_same_noise(pipe):
    noise = torch.randn(2, 4, 16, 16, generator=_seeded(5))
    text_to_image = SanaSprintPipeline(**pipe.components)
    for steps in (1, 2):
        expected = text_to_image(
            **FAST, prompt=PROMPTS, num_inference_steps=steps, latents=noise, height=32, width=32, generator=_seeded()
        )
        got = pipe(
            **FAST,
            prompt=PROMPTS,
            image=_picture(),
            strength=1.0,
            num_inference_steps=steps,
            latents=noise,
            generator=_seeded(),
        )
        # x_{t_0} differs by cos(1.57080) x0 = -3.7e-6 x0 only.
        assert np.abs(got.images - expected.images).max() <= 1e-5


def test_strength_to_zero_returns_the_input(pipe):
    image = _picture()
    pixels = pipe.prepare_image(image, 32, 32, "cpu", torch.float32)
    x0 = pipe.encode_image(pixels, 1) / pipe.scheduler.config.sigma_data
    with torch.no_grad():
        round_trip = pipe._decode(x0 * pipe.scheduler.config.sigma_data, "np", None)
    errors = {}
    for strength in (1e-2, 1e-4, 1e-6):
        latent = pipe(**dict(FAST, output_type="latent"), prompt="a cat", image=image, strength=strength).images
        decoded = pipe(**FAST, prompt="a cat", image=image, strength=strength).images
        errors[strength] = (float((latent - x0).abs().max()), float(np.abs(decoded - round_trip).max()))
    # The latent error is O(strength): 1e-2 -> ~7e-2, 1e-4 -> ~7e-4, 1e-6 -> ~7e-6 (unit-scale VAE latents).
    assert errors[1e-2][0] > 10 * errors[1e-4][0] > 100 * errors[1e-6][0], errors
    assert errors[1e-6][0] < 2e-5, errors
    # The pixels are the VAE round trip of the input (this random tiny decoder amplifies small latent errors, by up to
    # ~30x around 1e-3, so its pixels settle later than the latents).
    assert errors[1e-6][1] < 2e-5, errors


def test_image_types_agree(pipe):
    image = _picture()
    array = np.asarray(image, dtype=np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    kwargs = dict(FAST, prompt="a cat", strength=0.5, num_inference_steps=1)
    results = [
        pipe(**kwargs, image=im, generator=_seeded()).images
        for im in (image, [image], array, array[None], tensor, tensor[None], [tensor])
    ]
    for result in results[1:]:
        assert np.abs(result - results[0]).max() <= 1e-5


def test_sizes_default_to_the_image_and_must_fit_the_latent_scale(pipe):
    wide = _picture(height=32, width=48)
    assert pipe(**FAST, prompt="a cat", image=wide, num_inference_steps=1).images.shape == (1, 32, 48, 3)
    resized = pipe(**FAST, prompt="a cat", image=wide, height=16, width=16, num_inference_steps=1).images
    assert resized.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match=r"`image` is 33x32 pixels.*multiples of the latent scale 2"):
        pipe(**FAST, prompt="a cat", image=_picture(height=33, width=32))
    with pytest.raises(ValueError, match="height"):
        pipe(**FAST, prompt="a cat", image=wide, height=33, width=32)
    binned = pipe(prompt="a cat", image=wide, complex_human_instruction=None, output_type="np", num_inference_steps=1)
    assert binned.images.shape == (1, 32, 48, 3)  # generated at the nearest bin, resized back


def test_batches_tile_images_over_prompts_as_diffusers(pipe):
    images = [_picture(0), _picture(1)]
    kwargs = dict(FAST, strength=0.5, num_inference_steps=1)
    out = pipe(**kwargs, prompt=PROMPTS, image=images, num_images_per_prompt=2, generator=_seeded()).images
    assert out.shape == (4, 32, 32, 3)
    one_image = pipe(**kwargs, prompt=PROMPTS, image=images[0], num_images_per_prompt=2).images
    assert one_image.shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match=r"`image` holds 3 image\(s\)"):
        pipe(**kwargs, prompt=PROMPTS, image=images + [images[0]])


def test_batch_pairs_follow_diffusers_tiling(pipe):
    images = [_picture(0), _picture(1)]
    noise = torch.randn(4, 4, 16, 16, generator=_seeded(7))
    kwargs = dict(FAST, strength=0.5, num_inference_steps=1)
    batch = pipe(**kwargs, prompt=PROMPTS, image=images, num_images_per_prompt=2, latents=noise).images
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row, (p, i) in enumerate(pairs):
        alone = pipe(**kwargs, prompt=PROMPTS[p], image=images[i], latents=noise[row : row + 1]).images
        assert np.abs(alone[0] - batch[row]).max() <= 1e-5, (row, p, i)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strength=0.0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(strength=float("nan")), "strength"),
        (dict(image=None), "image"),
        (dict(image="picture.png"), "image"),
        (dict(height=32), "height"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(pipe, kwargs, match):
    call = dict(FAST, prompt="a cat", image=_picture())
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**call)


@pytest.mark.parametrize("form", ["float array", "unit tensor", "signed tensor", "list of arrays"])
def test_array_and_tensor_images_match_diffusers(reference, pipe, form):
    """The forms diffusers takes pass through the input checks unchanged: the same images as diffusers' pipeline."""
    array = np.asarray(_picture(), dtype=np.float32) / 255
    image = {
        "float array": array,
        "unit tensor": torch.from_numpy(array).permute(2, 0, 1),
        "signed tensor": torch.from_numpy(2 * array - 1).permute(2, 0, 1)[None],
        "list of arrays": [array, array[::-1].copy()],
    }[form]
    expected = _diffusers(reference, image, 0.8, 2)  # diffusers runs its whole 2-step grid at strength 0.8
    got = pipe(**FAST, prompt=PROMPTS, image=image, strength=1.0, num_inference_steps=2, generator=_seeded()).images
    assert expected.shape == got.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() <= PARITY_ATOL
