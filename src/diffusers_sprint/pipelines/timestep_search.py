"""tune_timesteps: the SANA-Sprint paper's sequential search for multi-step time grids, as a tool.

The paper (section 4.4, Table 7) tunes a few-step schedule one time at a time: first the middle time of 2-step
sampling, then, keeping it, the next time of 3-step sampling, and so on. `tune_timesteps` does that for any
pipeline that takes `timesteps=` in radians, with any score (lower is better) of the generated images.

    from diffusers_sprint.pipelines.timestep_search import tune_timesteps
    result = tune_timesteps(pipe, prompts, score_fn, num_inference_steps=4)
    pipe(prompt, timesteps=result.timesteps)          # the tuned 4-step grid
    result.schedules[2], result.schedules[3]          # the tuned 2- and 3-step grids found on the way
"""

import math
import numbers
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TimestepSearchResult:
    """
    Args:
        timesteps (`list[float]`): the tuned grid for `num_inference_steps` (radians, descending, without the final
            0): pass it as `pipe(..., timesteps=result.timesteps)`.
        score (`float`): its score.
        schedules (`dict[int, list[float]]`): the tuned grid for every step count searched (`1` is `[max_timestep]`).
        scores (`dict[int, float]`): their scores.
        table (`list[dict]`): every evaluated grid: `num_inference_steps`, `round` (0 = coarse), `timesteps`,
            `score`, in evaluation order.
    """

    timesteps: list[float]
    score: float
    schedules: dict[int, list[float]] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)


def _candidates(low: float, high: float, count: int) -> list[float]:
    """`count` times evenly spaced strictly inside `(low, high)`."""
    step = (high - low) / (count + 1)
    return [high - step * (i + 1) for i in range(count)]


def _described(value) -> str:
    """A short description of `value` for error messages: type, shape or length, and the start of its repr."""
    kind = type(value).__name__
    if hasattr(value, "shape"):
        kind += f" of shape {tuple(value.shape)}"
    elif isinstance(value, Sized) and not isinstance(value, str):
        kind += f" of length {len(value)}"
    return f"{kind} ({value!r:.80})"


def _checked_score(value, grid: list[float]) -> float:
    """`score_fn`'s return value as a float: a finite real number, or a 0-d numpy array / tensor holding one."""
    number = value
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        number = value.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise TypeError(
            f"`score_fn` returned {_described(value)} for the grid {grid}; it must return one real number (a float, "
            "or a 0-d array / tensor), lower is better."
        )
    if not math.isfinite(number):
        raise ValueError(
            f"`score_fn` returned {number} for the grid {grid}; it must return a finite number (lower is better)."
        )
    return float(number)


def tune_timesteps(
    pipe,
    prompts: Sequence[str],
    score_fn: Callable[[list, list[str]], float],
    num_inference_steps: int,
    max_timestep: float = 1.57080,
    grid_size: int = 7,
    refinements: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    **call_kwargs,
) -> TimestepSearchResult:
    r"""
    Sequential coarse-to-fine search of a `num_inference_steps` time grid (radians).

    For `k = 2 .. num_inference_steps`, the first `k - 1` times are kept from the previous stage and the new last
    time `t_{k-1}` is searched in `(0, t_{k-2})`: `grid_size` evenly spaced candidates, then `refinements` rounds of
    `grid_size` candidates between the best one's neighbours. Every grid is scored on the same prompts and the same
    noise (image `i` uses `torch.Generator().manual_seed(seed * 100_000 + i)`), so differences between grids are not
    noise draws. Cost: `1 + (num_inference_steps - 1) * grid_size * (1 + refinements)` pipeline runs over `prompts`.

    Args:
        pipe: a pipeline taking `timesteps` in radians (e.g. [`SanaSprintPipeline`]).
        prompts (`list[str]`): the tuning prompts; keep the prompts you report on out of them.
        score_fn (`callable`): `score_fn(images, prompts) -> float`, lower is better (an FID, a classifier distance,
            ...); `images` are what the pipeline returns for `output_type` (PIL by default).
        num_inference_steps (`int`): the step count to tune, >= 2.
        max_timestep (`float`, defaults to 1.57080): the first time, kept fixed (radians).
        grid_size (`int`, defaults to 7): candidates per round, >= 2.
        refinements (`int`, defaults to 2): rounds after the coarse one.
        seed (`int`, defaults to 0), batch_size (`int`, defaults to 64): noise and batching of the generation.
        call_kwargs: passed to every pipeline call (`guidance_scale`, `height`, `width`, ...).

    Returns:
        [`TimestepSearchResult`].
    """
    if not callable(pipe):
        raise TypeError(f"`pipe` must be a pipeline (a callable taking `timesteps=`), got {type(pipe).__name__}.")
    if not callable(score_fn):
        raise TypeError(f"`score_fn` must be a callable `score_fn(images, prompts) -> float`, got {score_fn!r}.")
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise TypeError(f"`prompts` must be a list of str, got {type(prompts).__name__}: {prompts!r:.80}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` must be a non-empty list of str.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"`prompts[{index}]` must be a str, got {type(prompt).__name__}: {prompt!r:.80}.")
    integers = (
        ("num_inference_steps", num_inference_steps, 2),
        ("grid_size", grid_size, 2),
        ("refinements", refinements, 0),
        ("seed", seed, 0),
        ("batch_size", batch_size, 1),
    )
    for name, value, low in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    if isinstance(max_timestep, bool) or not isinstance(max_timestep, numbers.Real) or not 0 < max_timestep <= 1.57080:
        raise ValueError(f"`max_timestep` must be in (0, 1.5708] radians, got {max_timestep!r}.")
    for reserved in ("timesteps", "num_inference_steps", "generator", "prompt"):
        if reserved in call_kwargs:
            raise ValueError(f"`{reserved}` is set by `tune_timesteps`; do not pass it in `call_kwargs`.")

    table = []

    def evaluate(grid: list[float], stage: int, round_index: int) -> float:
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
            output = pipe(chunk, timesteps=grid, generator=generators, **call_kwargs)
            chunk_images = getattr(output, "images", None)
            if chunk_images is None or len(chunk_images) != len(chunk):
                raise ValueError(
                    f"`pipe` returned {_described(output)} for {len(chunk)} prompts; it must return an output whose "
                    "`.images` hold one image per prompt."
                )
            images.extend(chunk_images)
        score = _checked_score(score_fn(images, prompts), grid)
        table.append(dict(num_inference_steps=stage, round=round_index, timesteps=list(grid), score=score))
        return score

    schedule = [float(max_timestep)]
    schedules = {1: list(schedule)}
    scores = {1: evaluate(schedule, 1, 0)}
    for stage in range(2, num_inference_steps + 1):
        low, high = 0.0, schedule[-1]
        tried = {}
        for round_index in range(refinements + 1):
            for t in _candidates(low, high, grid_size):
                if t not in tried:
                    tried[t] = evaluate([*schedule, t], stage, round_index)
            ordered = sorted(tried)
            best = min(tried, key=tried.get)
            position = ordered.index(best)
            low = ordered[position - 1] if position > 0 else 0.0
            high = ordered[position + 1] if position + 1 < len(ordered) else schedule[-1]
        schedule.append(best)
        schedules[stage] = list(schedule)
        scores[stage] = tried[best]
    return TimestepSearchResult(
        timesteps=list(schedule), score=scores[num_inference_steps], schedules=schedules, scores=scores, table=table
    )
