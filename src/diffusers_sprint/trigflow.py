"""TrigFlow math (SANA-Sprint section 3, sCM section 4): time sampling, noising, denoising, flow <-> TrigFlow maps.

Units: `t` in radians, `0` = data, `pi/2` = noise. `x0` is the data latent in sigma_data units
(`vae_latent * scaling_factor * sigma_data`), `z ~ N(0, sigma_data^2 I)`, `x_t = cos(t) x0 + sin(t) z`; networks see
`x_t / sigma_data` and return the unit-scale velocity `F`. Flow matching (Sana): `x_s = (1 - s) x0' + s z'` at unit
scale, `s in [0, 1]`. Derivations: docs/training/trigflow.md.
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


MAX_TIME = math.pi / 2
SIGMA_DATA = 0.5  # the data standard deviation of SANA-Sprint's TrigFlow parametrisation


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """`(batch,)` (or a scalar) -> `(batch, 1, ..., 1)` with `target_dims` dimensions, for broadcasting."""
    return x.reshape(-1, *([1] * (target_dims - 1)))


def sample_trigflow_time(
    batch_size: int,
    p_mean: float = 0.2,
    p_std: float = 1.6,
    sigma_data: float = 0.5,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Log-normal-in-tan time: `t = atan(exp(p_mean + p_std n) / sigma_data)`, `n ~ N(0, 1)`; shape `(batch_size,)`.

    Defaults are the generator's (0.2, 1.6); the discriminator's re-noising uses (-0.6, 1.0).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if not p_std >= 0:
        raise ValueError(f"`p_std` must be >= 0, got {p_std}.")
    normal = randn_tensor((batch_size,), generator=generator, device=device)
    return torch.atan(torch.exp(p_mean + p_std * normal) / sigma_data)


def replace_with_max_time(
    t: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Max-time weighting: each entry of `t` becomes `pi/2` with `probability` (independently)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"`probability` must be in [0, 1], got {probability}.")
    draw = torch.rand(t.shape, generator=generator, device=generator.device if generator else t.device)
    return torch.where(draw.to(t.device) < probability, torch.full_like(t, MAX_TIME), t)


def sample_noise(like: torch.Tensor, sigma_data: float = 0.5, generator: torch.Generator | None = None):
    """`z ~ N(0, sigma_data^2 I)` with `like`'s shape, device and dtype (diffusers' `randn_tensor`)."""
    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype) * sigma_data


def add_trigflow_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = cos(t) x0 + sin(t) z` with `t` of shape `(batch,)` (radians) and `z` already sigma_data-scaled."""
    t = append_dims(t, x0.ndim).to(x0.dtype)
    return torch.cos(t) * x0 + torch.sin(t) * z


def denoise_trigflow(x_t: torch.Tensor, trigflow_velocity: torch.Tensor, t: torch.Tensor, sigma_data: float):
    """`x0_hat = cos(t) x_t - sin(t) sigma_data F` for `F` the unit-scale TrigFlow velocity."""
    t = append_dims(t, x_t.ndim).to(x_t.dtype)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_data * trigflow_velocity


def trigflow_velocity_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, sigma_data: float = 0.5):
    """`F* = (cos t z - sin t x0) / sigma_data = (d x_t / dt) / sigma_data`; `denoise_trigflow(x_t, F*, t)` is `x0`."""
    t = append_dims(t, x0.ndim).to(x0.dtype)
    return (torch.cos(t) * z - torch.sin(t) * x0) / sigma_data


def flow_time_from_trigflow(t: torch.Tensor) -> torch.Tensor:
    """Map TrigFlow time `t` (radians, `[0, pi/2]`) to flow-matching time `s = sin t / (sin t + cos t)` in `[0, 1]`."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def trigflow_time_from_flow(s: torch.Tensor) -> torch.Tensor:
    """The inverse map: `t = atan2(s, 1 - s)` radians for flow time `s in [0, 1]`."""
    return torch.atan2(s, 1 - s)


def flow_input_scale(s: torch.Tensor) -> torch.Tensor:
    """`sqrt(s^2 + (1 - s)^2) = 1 / (sin t + cos t)`: `x_s = (x_t / sigma_data) * flow_input_scale(s)`."""
    return torch.sqrt(s**2 + (1 - s) ** 2)


def flow_sample_from_trigflow(x_t_scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The flow model's input `x_s` from `x_t / sigma_data` at flow time `s` of shape `(batch,)` (Prop. 3.1)."""
    return x_t_scaled * append_dims(flow_input_scale(s), x_t_scaled.ndim)


def trigflow_velocity_from_flow(velocity: torch.Tensor, flow_sample: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`F = ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)` from the flow velocity `v` (Prop. 3.1)."""
    s4 = append_dims(s, velocity.ndim)
    return ((1 - 2 * s4) * flow_sample + (1 - 2 * s4 + 2 * s4**2) * velocity) / flow_input_scale(s4)


__all__ = [
    "MAX_TIME",
    "add_trigflow_noise",
    "append_dims",
    "denoise_trigflow",
    "flow_input_scale",
    "flow_sample_from_trigflow",
    "flow_time_from_trigflow",
    "replace_with_max_time",
    "sample_noise",
    "sample_trigflow_time",
    "trigflow_time_from_flow",
    "trigflow_velocity_from_flow",
    "trigflow_velocity_target",
]
