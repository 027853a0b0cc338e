"""TrigFlowScheduler: consistency and ODE sampling on the TrigFlow time `t in [0, pi/2]` (radians)."""

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..trigflow import add_trigflow_noise, flow_time_from_trigflow, trigflow_time_from_flow


TRIGFLOW_MAX_TIME = math.pi / 2

# Paper Table 7 (SANA-Sprint). atan(200 / 0.5) ~ 1.5683 is the largest time used for multi-step sampling.
PAPER_TIMESTEP_PRESETS = {
    1: (math.pi / 2, 0.0),
    2: (math.atan(200 / 0.5), 1.3, 0.0),
    4: (math.atan(200 / 0.5), 1.3, 1.1, 0.6, 0.0),
}
SAMPLERS = ("consistency", "ode")


def _is_sequence(value) -> bool:
    return isinstance(value, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(value, (str, bytes))


def _real_number(value, name: str) -> float:
    """`value` as a float; raises naming `name` unless it is a real, non-bool number (or a 0-d tensor / array)."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number (radians), got {value!r}.")
    return float(value)


def _real_numbers(values, name: str) -> list[float]:
    """`values` (a sequence, or a 1-d tensor / array) as floats; raises naming `name` otherwise."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ValueError(f"`{name}` must be 1-d, got shape {tuple(values.shape)}.")
        values = values.tolist() if isinstance(values, np.ndarray) else values.detach().cpu().tolist()
    if not _is_sequence(values):
        raise TypeError(f"`{name}` must be a sequence of times in radians, got {values!r}.")
    return [_real_number(value, f"{name}[{i}]") for i, value in enumerate(values)]


@dataclass
class TrigFlowSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the sample at the next time of the schedule, `x_{t_next}`.
        pred_original_sample (`torch.Tensor`): the denoised estimate `x0_hat` at the current time.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class TrigFlowScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Sampler for TrigFlow models (sCM, [arXiv 2410.11081](https://huggingface.co/papers/2410.11081); SANA-Sprint).

    Data lives at `t = 0`, noise of standard deviation `sigma_data` at `t = pi/2`, `x_t = cos(t) x0 + sin(t) z`. The
    model output `v = sigma_data * F` (the TrigFlow velocity in data units, as diffusers' `SCMScheduler` expects)
    gives `x0_hat = cos(t) x_t - sin(t) v`.

    Two samplers, chosen by `sampler`:
        - `"consistency"` (default, one-/few-step students): `x_next = cos(t_next) x0_hat + sin(t_next) sigma_data
          eps` with fresh noise `eps`; none is drawn when `t_next = 0`.
        - `"ode"` (deterministic, DDIM-style, for teachers): keeps the noise estimate
          `z_hat = sin(t) x_t + cos(t) v`, `x_next = cos(t_next) x0_hat + sin(t_next) z_hat`. On the grid
          `s = sin t / (sin t + cos t)` this is exactly the flow-matching Euler step.

    The config is a superset of diffusers' `SCMScheduler` config, so `scheduler/` folders of released Sana-Sprint
    repos load with `TrigFlowScheduler.from_pretrained(repo, subfolder="scheduler")`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): kept for `SCMScheduler` compatibility.
        prediction_type (`str`, defaults to `"trigflow"`): the only supported parameterisation.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data and of the noise.
        sampler (`str`, defaults to `"consistency"`): `"consistency"` or `"ode"`.
    """

    _compatibles = ["SCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "trigflow",
        sigma_data: float = 0.5,
        sampler: str = "consistency",
    ):
        if prediction_type != "trigflow":
            raise ValueError(f"`prediction_type` must be 'trigflow', got {prediction_type!r}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
        if not sigma_data > 0:
            raise ValueError(f"`sigma_data` must be positive, got {sigma_data}.")
        self.init_noise_sigma = sigma_data
        self.num_inference_steps = None
        self.timesteps = torch.tensor(PAPER_TIMESTEP_PRESETS[1], dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        device: str | torch.device | None = None,
        max_timesteps: float | None = None,
        intermediate_timesteps: float | Sequence[float] | None = None,
        preset: str | None = None,
        strength: float = 1.0,
    ) -> None:
        r"""
        Sets the descending time grid `timesteps` (radians), whose last entry is `0`; the model is evaluated at all
        entries but the last.

        Args:
            num_inference_steps (`int`, *optional*): number of model evaluations, any integer >= 1.
            timesteps (sequence of `float`, *optional*): custom times in radians, strictly descending, in
                `[0, pi/2]`. A final `0` is appended when missing. Overrides `num_inference_steps`.
            max_timesteps (`float`, *optional*): first time, default `pi/2` (rounded as diffusers: 1.57080).
            intermediate_timesteps (`float` or sequence, *optional*): the inner times. A float is used for 2 steps
                (default 1.3, as diffusers) and ignored otherwise; a sequence must hold `num_inference_steps - 1`
                descending times. Without it, 3+ steps are spaced evenly from `max_timesteps` to 0.
            preset (`str`, *optional*): `"paper"` takes the SANA-Sprint Table 7 grid for 1, 2 or 4 steps.
            strength (`float`, defaults to 1.0): image-to-image strength in `(0, 1]`; every time of the grid is moved
                to the one whose flow time is `strength` times its own ([`strength_timesteps`]). `1` keeps the grid.
        """
        if timesteps is not None:
            grid = self._validated_custom_timesteps(timesteps)
        else:
            if num_inference_steps is None:
                raise ValueError("Pass `num_inference_steps` or `timesteps` to `set_timesteps`.")
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
            if preset is not None:
                grid = self._preset_timesteps(preset, num_inference_steps)
            else:
                grid = self._default_timesteps(num_inference_steps, max_timesteps, intermediate_timesteps)
        grid = self.strength_timesteps(grid, strength)
        self.timesteps = torch.tensor(grid, dtype=torch.float32, device=device)
        self.num_inference_steps = len(grid) - 1
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def strength_timesteps(timesteps: Sequence[float], strength: float) -> list[float]:
        r"""
        The image-to-image time grid for `strength` in `(0, 1]`: each time `t` (radians) moves to `t'` with flow time
        `s(t') = strength * s(t)`, where `s(t) = sin t / (sin t + cos t)` and `t(s) = atan2(s, 1 - s)` (exact inverse,
        so `strength = 1` keeps the grid). On the flow axis `x_s = (1 - s) x0 + s z`, so `strength` is the share of
        noise mixed into the image at the start, continuous and monotone at any step count; `strength -> 0` gives a
        grid near 0, which returns the image.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"`strength` must be a float in (0, 1], got {strength!r}.")
        if strength == 1:
            return [float(t) for t in timesteps]
        flow_time = strength * flow_time_from_trigflow(torch.tensor(timesteps, dtype=torch.float64))
        return trigflow_time_from_flow(flow_time).tolist()

    @staticmethod
    def _preset_timesteps(preset: str, num_inference_steps: int) -> tuple[float, ...]:
        if preset != "paper":
            raise ValueError(f"`preset` must be 'paper' or None, got {preset!r}.")
        if num_inference_steps not in PAPER_TIMESTEP_PRESETS:
            raise ValueError(
                f"The 'paper' preset exists for `num_inference_steps` in {sorted(PAPER_TIMESTEP_PRESETS)}, "
                f"got {num_inference_steps}; pass `timesteps` for other step counts."
            )
        return PAPER_TIMESTEP_PRESETS[num_inference_steps]

    def _default_timesteps(self, num_steps: int, max_timesteps, intermediate_timesteps) -> list[float]:
        max_t = 1.57080 if max_timesteps is None else _real_number(max_timesteps, "max_timesteps")
        if not 0 < max_t <= TRIGFLOW_MAX_TIME + 1e-4:
            raise ValueError(f"`max_timesteps` must be in (0, pi/2] radians, got {max_t}.")
        if intermediate_timesteps is None or not _is_sequence(intermediate_timesteps):
            if num_steps == 2:
                middle = 1.3 if intermediate_timesteps is None else intermediate_timesteps
                inner = [_real_number(middle, "intermediate_timesteps")]
            else:
                if intermediate_timesteps is not None:
                    _real_number(intermediate_timesteps, "intermediate_timesteps")
                inner = torch.linspace(max_t, 0, num_steps + 1)[1:-1].tolist()
        else:
            inner = _real_numbers(intermediate_timesteps, "intermediate_timesteps")
            if len(inner) != num_steps - 1:
                raise ValueError(
                    f"`intermediate_timesteps` must hold num_inference_steps - 1 = {num_steps - 1} times, "
                    f"got {len(inner)}."
                )
        grid = [max_t, *inner, 0.0]
        if any(not a > b for a, b in zip(grid[:-1], grid[1:])):
            raise ValueError(
                f"`intermediate_timesteps` must lie strictly between `max_timesteps` ({max_t}) and 0 and descend, "
                f"got {inner}."
            )
        return self._validated_custom_timesteps(grid)

    @staticmethod
    def _validated_custom_timesteps(timesteps) -> list[float]:
        grid = _real_numbers(timesteps, "timesteps")
        if len(grid) == 0:
            raise ValueError("`timesteps` must not be empty.")
        if grid[-1] != 0.0:
            grid.append(0.0)
        if len(grid) < 2:
            raise ValueError("`timesteps` must contain at least one time > 0.")
        if any(not 0.0 <= t <= TRIGFLOW_MAX_TIME + 1e-4 for t in grid):
            raise ValueError(f"`timesteps` must lie in [0, pi/2] radians, got {grid}.")
        if any(a <= b for a, b in zip(grid[:-1], grid[1:])):
            raise ValueError(f"`timesteps` must be strictly descending, got {grid}.")
        return grid

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        matches = (
            self.timesteps[:-1]
            == torch.as_tensor(timestep, dtype=self.timesteps.dtype).cpu().to(self.timesteps.device).flatten()[0]
        ).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {float(torch.as_tensor(timestep).flatten()[0])} is not in the schedule.")
        return int(matches[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TrigFlowSchedulerOutput | tuple:
        r"""
        One step from the current time `t` of the schedule to the next.

        Args:
            model_output (`torch.Tensor`): `sigma_data * F(x_t / sigma_data, t)`, the TrigFlow velocity in data units.
            timestep (`float` or `torch.Tensor`): the current time `t` (radians); must be on the schedule.
            sample (`torch.Tensor`): `x_t`, in data units (noise of std `sigma_data` at `pi/2`).
            generator: for the consistency sampler's fresh noise.

        Returns:
            [`TrigFlowSchedulerOutput`] or `(prev_sample, pred_original_sample)`.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            )
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"The schedule has {self.num_inference_steps} steps; all were taken already.")

        t = self.timesteps[self._step_index]
        t_next = self.timesteps[self._step_index + 1]
        pred_x0 = torch.cos(t) * sample - torch.sin(t) * model_output
        if t_next == 0:
            prev_sample = pred_x0
        elif self.config.sampler == "ode":
            noise_estimate = torch.sin(t) * sample + torch.cos(t) * model_output
            prev_sample = add_trigflow_noise(pred_x0, noise_estimate, t_next)
        else:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device)
            prev_sample = add_trigflow_noise(pred_x0, noise * self.config.sigma_data, t_next)
        self._step_index += 1

        if not return_dict:
            return (prev_sample, pred_x0)
        return TrigFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        r"""
        `x_t = cos(t) x0 + sin(t) sigma_data noise`.

        Args:
            original_samples (`torch.Tensor` of shape `(batch_size, ...)`): `x0` in data units.
            noise (`torch.Tensor`, same shape): standard normal noise (scaled by `sigma_data` here).
            timesteps (`torch.Tensor` of shape `(batch_size,)` or a scalar): `t` in radians.
        """
        t = torch.as_tensor(timesteps, device=original_samples.device)
        return add_trigflow_noise(original_samples, noise * self.config.sigma_data, t)

    @staticmethod
    def timesteps_from_flow_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Flow-matching times `s in [0, 1]` to TrigFlow times `t = atan(s / (1 - s))` (radians)."""
        return trigflow_time_from_flow(torch.as_tensor(sigmas, dtype=torch.float64)).float()

    def __len__(self) -> int:
        return self.config.num_train_timesteps
