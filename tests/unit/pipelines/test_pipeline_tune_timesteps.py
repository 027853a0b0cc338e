"""tune_timesteps: the sequential coarse-to-fine schedule search finds known optima and runs on a real pipeline."""

import math

import numpy as np
import pytest
import torch
from diffusers import SCMScheduler

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, tune_timesteps


class GridEcho:
    """A stand-in pipeline whose 'images' are the time grid it was called with, and which records the noise seeds."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, timesteps, generator, **kwargs):
        self.calls.append(dict(timesteps=list(timesteps), seeds=[g.initial_seed() for g in generator], **kwargs))
        return type("Output", (), {"images": [list(timesteps)] * len(prompts)})()


TARGET = (1.57080, 0.9, 0.45, 0.2)


def quadratic_score(images, prompts):
    grid = images[0]
    return sum((t - target) ** 2 for t, target in zip(grid, TARGET)) + 0.01 * len(grid)


def test_sequential_search_finds_each_time_to_the_refined_resolution():
    pipe = GridEcho()
    result = tune_timesteps(pipe, ["a", "b", "c"], quadratic_score, 4, grid_size=7, refinements=2, batch_size=2)
    # Coarse spacing 1.5708 / 8 = 0.196 rad; each refinement shrinks the bracket by 8 / 2 = 4x: 0.012 rad after two.
    assert result.timesteps[0] == 1.57080
    for found, target in zip(result.timesteps[1:], TARGET[1:]):
        assert abs(found - target) < 0.013, result.timesteps
    assert result.schedules[2] == result.timesteps[:2] and result.schedules[3] == result.timesteps[:3]
    assert result.score == pytest.approx(quadratic_score([result.timesteps], None))
    # Later stages keep the earlier times: every stage-k grid starts with the tuned stage-(k-1) grid.
    for row in result.table[1:]:
        k = row["num_inference_steps"]
        assert row["timesteps"][: k - 1] == result.schedules[k - 1]
        assert 0 < row["timesteps"][-1] < result.schedules[k - 1][-1]
    assert len(result.table) <= 1 + 3 * 7 * 3 and len(result.table) == len(pipe.calls) / 2  # 2 batches per grid
    # Common random numbers: every grid sees the same seeds, batch-independent.
    assert all(call["seeds"] in ([0, 1], [2]) for call in pipe.calls)
    best_at_stage_2 = min(row["score"] for row in result.table if row["num_inference_steps"] == 2)
    assert result.scores[2] == best_at_stage_2


def test_tunes_a_real_pipeline_and_passes_call_kwargs(
    make_diffusers_transformer, make_text_encoder, make_tokenizer, make_vae
):
    reference = make_diffusers_transformer(student=True)
    transformer = SanaSprintTransformer2DModel.from_config(reference.config)
    transformer.load_state_dict(reference.state_dict())
    pipe = SanaSprintPipeline(make_tokenizer(), make_text_encoder(), make_vae(), transformer, SCMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def brightness(images, prompts):  # any callable: here, prefer dark images
        return float(np.mean(images))

    kwargs = dict(height=32, width=32, output_type="np", complex_human_instruction=None, use_resolution_binning=False)
    result = tune_timesteps(pipe, ["a red cat", "a dog"], brightness, 2, grid_size=3, refinements=1, **kwargs)
    assert len(result.timesteps) == 2 and 0 < result.timesteps[1] < 1.5708
    again = pipe(
        ["a red cat", "a dog"],
        timesteps=result.timesteps,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        **kwargs,
    )
    assert brightness(again.images, None) == pytest.approx(result.score, abs=1e-7)
    assert result.score == min(row["score"] for row in result.table if row["num_inference_steps"] == 2)
    assert math.isfinite(result.scores[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=1), "num_inference_steps"),
        (dict(grid_size=1), "grid_size"),
        (dict(refinements=-1), "refinements"),
        (dict(max_timestep=2.0), "max_timestep"),
        (dict(prompts=[]), "prompts"),
        (dict(timesteps=[1.0]), "timesteps"),
    ],
)
def test_bad_arguments(kwargs, match):
    call = dict(pipe=GridEcho(), prompts=["a"], score_fn=quadratic_score, num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tune_timesteps(**call)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompts="a cat"), TypeError, r"`prompts` must be a list of str, got str: 'a cat'\."),
        (dict(prompts=3), TypeError, r"`prompts` must be a list of str, got int: 3\."),
        (dict(prompts=["a", None]), TypeError, r"`prompts\[1\]` must be a str, got NoneType: None\."),
        (dict(batch_size=0), ValueError, r"`batch_size` must be an int >= 1, got 0\."),
        (dict(seed=-1), ValueError, r"`seed` must be an int >= 0, got -1\."),
        (dict(max_timestep="1.5"), ValueError, r"`max_timestep` must be in \(0, 1.5708\] radians, got '1.5'\."),
        (dict(score_fn="fid"), TypeError, r"`score_fn` must be a callable `score_fn\(images, prompts\) -> float`"),
        (dict(pipe=None), TypeError, r"`pipe` must be a pipeline \(a callable taking `timesteps=`\), got NoneType\."),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, error, match):
    call = dict(pipe=GridEcho(), prompts=["a"], score_fn=quadratic_score, num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        tune_timesteps(**call)


@pytest.mark.parametrize(
    "returned, error, match",
    [
        (float("nan"), ValueError, r"`score_fn` returned nan for the grid \[1.5708\]; it must return a finite number"),
        (-math.inf, ValueError, r"`score_fn` returned -inf for the grid \[1.5708\]"),
        (torch.tensor(float("inf")), ValueError, r"`score_fn` returned inf for the grid"),
        (
            [0.1, 0.2],
            TypeError,
            r"`score_fn` returned list of length 2 \(\[0.1, 0.2\]\) for the grid \[1.5708\]; it must",
        ),
        (np.array([0.5]), TypeError, r"`score_fn` returned ndarray of shape \(1,\) \(array\(\[0.5\]\)\) for the grid"),
        (
            torch.ones(2),
            TypeError,
            r"`score_fn` returned Tensor of shape \(2,\) \(tensor\(\[1., 1.\]\)\) for the grid",
        ),
        (
            "0.3",
            TypeError,
            r"`score_fn` returned str \('0.3'\) for the grid \[1.5708\]; it must return one real number "
            r"\(a float, or a 0-d array / tensor\), lower is better\.",
        ),
        (None, TypeError, r"`score_fn` returned NoneType \(None\) for the grid"),
        (True, TypeError, r"`score_fn` returned bool \(True\) for the grid"),
    ],
)
def test_score_fn_must_return_one_finite_number(returned, error, match):
    with pytest.raises(error, match=match):
        tune_timesteps(GridEcho(), ["a", "b"], lambda images, prompts: returned, 2, grid_size=2, refinements=0)


def test_scores_of_numpy_and_torch_scalars_are_read_as_floats():
    for wrap in (np.float32, np.array, torch.tensor):

        def score(images, prompts, wrap=wrap):
            return wrap(quadratic_score(images, prompts))

        result = tune_timesteps(GridEcho(), ["a"], score, 2, grid_size=3)
        assert type(result.score) is float
        assert result.score == pytest.approx(quadratic_score([result.timesteps], None), rel=1e-6)


def test_pipe_returning_the_wrong_number_of_images_is_named():
    class Short(GridEcho):
        def __call__(self, prompts, timesteps, generator, **kwargs):
            return type("Output", (), {"images": [list(timesteps)]})()

    with pytest.raises(ValueError, match=r"`pipe` returned Output .* for 2 prompts; it must return an output whose"):
        tune_timesteps(Short(), ["a", "b"], quadratic_score, 2)
