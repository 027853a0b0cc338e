"""TrigFlow time sampling and noising (math only; SANA-Sprint section 3, sCM section 4).

Units: `t` in radians, `0` = data, `pi/2` = noise. `x0` is the data latent in sigma_data units
(`vae_latent * scaling_factor * sigma_data`), `z ~ N(0, sigma_data^2 I)`.
"""

import math

import torch


MAX_TIME = math.pi / 2


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
    normal = torch.randn(batch_size, generator=generator, device=generator.device if generator else device)
    return torch.atan(torch.exp(p_mean + p_std * normal) / sigma_data).to(device)


def replace_with_max_time(
    t: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Max-time weighting: each entry of `t` becomes `pi/2` with `probability` (independently)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"`probability` must be in [0, 1], got {probability}.")
    draw = torch.rand(t.shape, generator=generator, device=generator.device if generator else t.device)
    return torch.where(draw.to(t.device) < probability, torch.full_like(t, MAX_TIME), t)


def add_trigflow_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = cos(t) x0 + sin(t) z` with `t` of shape `(batch,)` (radians) and `z` already sigma_data-scaled."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.cos(t) * x0 + torch.sin(t) * z


def denoise_trigflow(x_t: torch.Tensor, trigflow_velocity: torch.Tensor, t: torch.Tensor, sigma_data: float):
    """`x0_hat = cos(t) x_t - sin(t) sigma_data F` for `F` the unit-scale TrigFlow velocity."""
    t = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_data * trigflow_velocity
