"""Every `__call__` argument of the three pipelines is checked before it is used: bad values raise naming the
argument (and, for callbacks, what was returned), where they used to fail deep inside or pass silently."""

import numpy as np
import pytest
import torch
from PIL import Image


PIPELINES = ["text2img", "img2img", "controlnet"]


@pytest.fixture(scope="module")
def pipes(make_sprint_pipelines):
    return make_sprint_pipelines()


def _call(pipes, name, **kwargs):
    call = dict(
        prompt="a cat",
        num_inference_steps=1,
        complex_human_instruction=None,
        output_type="np",
        height=32,
        width=32,
        use_resolution_binning=False,
    )
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    call.update({"img2img": dict(image=picture), "controlnet": dict(control_image=picture)}.get(name, {}))
    call.update(kwargs)
    return pipes[name](**call).images


TIME_ARGUMENTS = [
    (dict(timesteps="1.3"), TypeError, r"`timesteps` must be a sequence of times in radians, got '1.3'\."),
    (dict(timesteps=1.3), TypeError, r"`timesteps` must be a sequence of times in radians, got 1.3\."),
    (dict(timesteps=torch.tensor([[1.5, 1.0]])), ValueError, r"`timesteps` must be 1-d, got shape \(1, 2\)\."),
    (dict(timesteps=[True]), TypeError, r"`timesteps\[0\]` must be a real number \(radians\), got True\."),
    (dict(timesteps=[1.5, "1.0"]), TypeError, r"`timesteps\[1\]` must be a real number \(radians\), got '1.0'\."),
    (dict(max_timesteps="x"), TypeError, r"`max_timesteps` must be a real number \(radians\), got 'x'\."),
    (
        dict(num_inference_steps=2, intermediate_timesteps="1.3"),
        TypeError,
        r"`intermediate_timesteps` must be a real number \(radians\), got '1.3'\.",
    ),
    (
        dict(num_inference_steps=2, intermediate_timesteps=1.7),
        ValueError,
        r"`intermediate_timesteps` must lie strictly between `max_timesteps` \(1.5708\) and 0 and descend, "
        r"got \[1.7\]",
    ),
    (
        dict(num_inference_steps=2, intermediate_timesteps=float("nan")),
        ValueError,
        r"`intermediate_timesteps` must lie strictly between .* got \[nan\]",
    ),
    (
        dict(num_inference_steps=3, intermediate_timesteps=[0.5, 1.0]),
        ValueError,
        r"`intermediate_timesteps` must lie strictly between .* got \[0.5, 1.0\]",
    ),
]


@pytest.mark.parametrize("kwargs, error, match", TIME_ARGUMENTS)
@pytest.mark.parametrize("name", PIPELINES)
def test_time_grid_arguments(pipes, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(pipes, name, **kwargs)


OTHER_ARGUMENTS = [
    (dict(prompt=["a cat", 3]), TypeError, r"`prompt` must be a str or a list of str, got list holding int, str\."),
    (dict(generator=0), TypeError, r"`generator` must be a torch.Generator, a list of them .* got int\."),
    (dict(generator=[7]), TypeError, r"`generator` must be a torch.Generator, .* got list of \['int'\]\."),
    (dict(latents=[[0.0]]), TypeError, r"`latents` must be a floating-point torch.Tensor, got list\."),
    (
        dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.long)),
        TypeError,
        r"`latents` must be a floating-point torch.Tensor, got dtype torch.int64\.",
    ),
    (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), ValueError, r"`latents` hold non-finite values"),
    (dict(attention_kwargs=[("scale", 1.0)]), TypeError, r"`attention_kwargs` must be a dict or None, got list\."),
    (dict(max_sequence_length=True), ValueError, r"`max_sequence_length` must be a positive int, got True\."),
    (
        dict(complex_human_instruction="Rewrite the prompt"),
        TypeError,
        r"`complex_human_instruction` must be a list of str \(the instruction's lines\) or None, got str\.",
    ),
    (
        dict(prompt=None, prompt_embeds=[[0.0]], prompt_attention_mask=[[1]]),
        TypeError,
        r"`prompt_embeds` must be a torch.Tensor, got list\.",
    ),
]


@pytest.mark.parametrize("kwargs, error, match", OTHER_ARGUMENTS)
@pytest.mark.parametrize("name", PIPELINES)
def test_generator_latents_and_encoding_arguments(pipes, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(pipes, name, **kwargs)


def _returning(value):
    return lambda pipe, step, timestep, callback_kwargs: value(callback_kwargs) if callable(value) else value


CALLBACKS = [
    (dict(callback_on_step_end=3), TypeError, r"`callback_on_step_end` must be a callable .* got int\."),
    (
        dict(callback_on_step_end=_returning(None), callback_on_step_end_tensor_inputs="latents"),
        TypeError,
        r"`callback_on_step_end_tensor_inputs` must be a list of names among \[.*\], got 'latents'\.",
    ),
    (
        dict(callback_on_step_end=_returning(None), callback_on_step_end_tensor_inputs=None),
        TypeError,
        r"`callback_on_step_end_tensor_inputs` must be a list of names among \[.*\], got None\.",
    ),
    (
        dict(callback_on_step_end=_returning([1])),
        TypeError,
        r"`callback_on_step_end` returned at step 0 a list \(\[1\]\); it must return a dict of tensors\.",
    ),
    (
        dict(callback_on_step_end=_returning({"noise": torch.zeros(1)})),
        ValueError,
        r"`callback_on_step_end` returned at step 0 the key 'noise'; it may return tensors among \['latents', ",
    ),
    (
        dict(callback_on_step_end=_returning({"latents": 1.0})),
        TypeError,
        r"`callback_on_step_end` returned at step 0 'latents' as a float; it must be a torch.Tensor\.",
    ),
    (
        dict(callback_on_step_end=_returning({"latents": torch.zeros(1, 4, 8, 8)})),
        ValueError,
        r"returned at step 0 'latents' of shape \(1, 4, 8, 8\); it must keep the shape \(1, 4, 16, 16\)\.",
    ),
    (
        dict(
            callback_on_step_end=_returning(lambda tensors: {"prompt_embeds": tensors["prompt_embeds"][:, :1, :2]}),
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        ),
        ValueError,
        r"returned at step 0 'prompt_embeds' of shape \(1, 1, 2\); it must keep the shape \(1, 3, 16\)\.",
    ),
]


@pytest.mark.parametrize("kwargs, error, match", CALLBACKS)
@pytest.mark.parametrize("name", PIPELINES)
def test_callbacks_and_their_return_values(pipes, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(pipes, name, **kwargs)


def test_callbacks_may_return_none_the_tensors_given_or_the_control_latents(pipes):
    expected = _call(pipes, "controlnet", generator=torch.Generator().manual_seed(0))
    for returned in (None, {}, lambda tensors: tensors):
        got = _call(
            pipes,
            "controlnet",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=_returning(returned),
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "control_image"],
        )
        assert np.abs(got - expected).max() == 0
    with pytest.raises(ValueError, match=r"'control_image' of shape \(1, 4, 8, 8\); it must keep the shape"):
        _call(pipes, "controlnet", callback_on_step_end=_returning({"control_image": torch.zeros(1, 4, 8, 8)}))
    with pytest.raises(ValueError, match=r"the key 'control_image'; it may return tensors among"):
        _call(pipes, "text2img", callback_on_step_end=_returning({"control_image": torch.zeros(1, 4, 16, 16)}))
