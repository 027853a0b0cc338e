"""The tangent of the sCM loss: `dF = cos t sin t dF/dt`, the student's velocity differentiated along the teacher's
PF-ODE (`jvp(F, (x_t / sigma_d, t), (v_x, v_t))` with the tangents of [`~scm.pf_ode_tangents`]).

[`velocity_tangent`] computes it as [`~scm.SCMLossConfig`] says (`jvp`, `compile_jvp`, `finite_difference_step`):

- `"exact"`: `torch.func.jvp` (forward-mode AD; the attention runs on the math SDPA kernel), eager or under
  `torch.compile` ([`trigflow_velocity_jvp`]);
- `"finite_difference"`: ordinary fp32 no-grad forwards one teacher-ODE step away
  ([`trigflow_velocity_finite_difference`]): one-sided from the grad forward's own `F` when that runs without
  autocast, else central.

Every model call goes through a [`~models.TrigFlowInputs`]: whatever it carries (prompt, `w`, control latents) is a
constant of the function; the tangent is w.r.t. `x_t` and `t` only.
"""

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..models.trigflow_model import TrigFlowInputs, as_trigflow_model
from ..trigflow import append_dims


if TYPE_CHECKING:
    from .scm import SCMLossConfig


DEFAULT_FINITE_DIFFERENCE_STEP = 3e-5  # radians of teacher-ODE time (benchmarks/fd_jvp_accuracy.py)

JVP_COMPILE_BACKEND = "inductor"
"""The `torch.compile` backend of `compile_jvp` (tests set `"aot_eager"`, which traces without code generation)."""


def expand_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(batch,)` -> `(batch, 1, 1, 1)` in the dtype of `like`."""
    return append_dims(t, like.ndim).to(like.dtype)


def one_sided_finite_difference(config: "SCMLossConfig", device_type: str) -> bool:
    """Whether [`velocity_tangent`] takes the grad forward's `F` as its base point: the finite difference without
    autocast (under autocast that `F` has low precision, and the difference is central instead)."""
    return config.jvp == "finite_difference" and not torch.is_autocast_enabled(device_type)


def velocity_tangent(
    student, inputs: TrigFlowInputs, tangent_x: torch.Tensor, tangent_t: torch.Tensor, config: "SCMLossConfig"
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""
    The tangent `dF` of `student` at `inputs` along `(tangent_x, tangent_t)`, by `config.jvp` (no grad).

    Call it before the student's grad forward; it returns `dF_at(F)`, which gives `dF` from that forward's detached
    `F` (the one-sided difference's base point; the other methods ignore it). The base point must come from a call
    laid out like the shifted one (the same rows): batching changes `F`'s rounding, which `/ h` amplifies.

    Args:
        student ([`~models.TrigFlowModel`], possibly wrapped, or a [`SanaSprintTransformer2DModel`]): The model.
        inputs ([`~models.TrigFlowInputs`]): The point `(x_t / sigma_d, t)` and its condition.
        tangent_x (`torch.Tensor` like `inputs.x_t_scaled`), tangent_t (`torch.Tensor` of shape `(batch,)`): The
            direction.
        config ([`~scm.SCMLossConfig`]): `jvp`, `compile_jvp`, `finite_difference_step`.

    Returns:
        `Callable[[torch.Tensor], torch.Tensor]`: `F -> dF`, `dF` of shape `(batch, C, H, W)`.
    """
    if config.jvp == "exact":
        with torch.no_grad():
            _, dF = trigflow_velocity_jvp(student, inputs, tangent_x, tangent_t, compile=config.compile_jvp)
        return lambda F: dF
    _check_fp32_parameters(student)
    with torch.no_grad():
        if not one_sided_finite_difference(config, inputs.x_t_scaled.device.type):
            dF = trigflow_velocity_finite_difference(
                student, inputs, tangent_x, tangent_t, config.finite_difference_step
            )
            return lambda F: dF
        shifted, signed_h = _shifted_velocity(student, inputs, tangent_x, tangent_t, config.finite_difference_step)
    return lambda F: (shifted - F.to(shifted.dtype)) / expand_like(signed_h, shifted)


@torch.no_grad()
def trigflow_velocity_jvp(
    student, inputs: TrigFlowInputs, tangent_x: torch.Tensor, tangent_t: torch.Tensor, compile: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `torch.func.jvp` of the student's `F(x_t / sigma_d, t)` at `inputs` along `(tangent_x, tangent_t)`, without grad.

    `student` is called as a [`~models.TrigFlowModel`] (a bare transformer is wrapped), so DDP / FSDP2 wrappers see
    the call. Returns `(F, dF)`, both of shape `(batch, C, H, W)`. The rest of `inputs` (prompt, `w`, control
    latents) is a constant of the function. `compile=True` runs the JVP under `torch.compile` with
    `JVP_COMPILE_BACKEND` ([`~scm.SCMLossConfig`] `compile_jvp`).
    """
    jvp = _compiled_velocity_jvp(JVP_COMPILE_BACKEND) if compile else _velocity_jvp
    x, t = inputs.x_t_scaled, inputs.t
    tangents = (tangent_x.to(x.dtype), tangent_t.to(t.dtype))
    condition = (inputs.prompt_embeds, inputs.prompt_attention_mask, inputs.guidance, inputs.control)
    return jvp(as_trigflow_model(student), (x, t), tangents, *condition)


def _velocity_jvp(student, primals, tangents, prompt_embeds, prompt_attention_mask, guidance, control):
    def velocity(x, time):
        return TrigFlowInputs(x, time, prompt_embeds, prompt_attention_mask, guidance, control).call(student)[0]

    return torch.func.jvp(velocity, primals, tangents)


@functools.cache
def _compiled_velocity_jvp(backend: str):
    return torch.compile(_velocity_jvp, backend=backend)


def trigflow_velocity_finite_difference(
    student,
    inputs: TrigFlowInputs,
    tangent_x: torch.Tensor,
    tangent_t: torch.Tensor,
    step: float = DEFAULT_FINITE_DIFFERENCE_STEP,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    A finite-difference estimate of `jvp(F, (x_t / sigma_d, t), (tangent_x, tangent_t))`, from ordinary forwards.

    The inputs move along the tangent by `h = step / |tangent_t|` per sample, i.e. by a time step of `step`
    radians (with the PF-ODE tangents of [`~scm.pf_ode_tangents`]: one teacher ODE step, `x + step dxt_dt / sigma_d`):

        one-sided (`base` given):   dF ~ (F(x + s h v_x, t + s h v_t) - base) / (s h),  s = +1, or -1 near pi/2
        central (`base` is None):   dF ~ (F(x + h v_x, t + h v_t) - F(x - h v_x, t - h v_t)) / (2 h)

    Every forward runs without grad, in fp32 with autocast off: in bf16 the difference of two nearby outputs is
    rounding noise (docs/performance.md). `base` must be `F(x, t)` computed the same way (fp32, no autocast), e.g.
    the grad forward's detached output in an fp32 run. Fused SDPA kernels and a compiled student work here.

    Args:
        student ([`~models.TrigFlowModel`], possibly wrapped, or a [`SanaSprintTransformer2DModel`]): The model.
        inputs ([`~models.TrigFlowInputs`]): The point (`t` in radians) and its condition (held fixed).
        tangent_x (`torch.Tensor` like `inputs.x_t_scaled`), tangent_t (`torch.Tensor` of shape `(batch,)`, non-zero):
            The direction.
        step (`float`, defaults to `3e-5`): The time step in radians.
        base (`torch.Tensor` like `inputs.x_t_scaled`, *optional*): `F(x_t_scaled, t)` for the one-sided difference.

    Returns:
        `torch.Tensor` of shape `(batch, C, H, W)` in float32 (float64 for float64 inputs): the tangent `dF`.
    """
    if base is not None:
        shifted, signed_h = _shifted_velocity(student, inputs, tangent_x, tangent_t, step)
        return (shifted - base.detach().to(shifted.dtype)) / expand_like(signed_h, shifted)
    inputs, tangent_x, tangent_t = _in_fp32(inputs, tangent_x, tangent_t)
    x, t = inputs.x_t_scaled, inputs.t
    h, _ = _finite_difference_direction(t, tangent_t, step)
    h4 = expand_like(h, x)
    plus = _fp32_velocity(student, inputs.replace(x_t_scaled=x + h4 * tangent_x, t=t + h * tangent_t))
    minus = _fp32_velocity(student, inputs.replace(x_t_scaled=x - h4 * tangent_x, t=t - h * tangent_t))
    return (plus - minus) / (2 * h4)


def _in_fp32(inputs: TrigFlowInputs, tangent_x: torch.Tensor, tangent_t: torch.Tensor):
    """The point and the direction in (at least) float32."""
    dtype = torch.promote_types(inputs.x_t_scaled.dtype, torch.float32)
    inputs = inputs.replace(x_t_scaled=inputs.x_t_scaled.to(dtype), t=inputs.t.to(dtype))
    return inputs, tangent_x.to(dtype), tangent_t.to(dtype)


def _fp32_velocity(student, inputs: TrigFlowInputs) -> torch.Tensor:
    """One no-grad student forward in (at least) fp32 with autocast off: `F(x, t)` in float32."""
    dtype = torch.promote_types(inputs.x_t_scaled.dtype, torch.float32)
    inputs = inputs.replace(x_t_scaled=inputs.x_t_scaled.to(dtype), t=inputs.t.to(dtype))
    with torch.no_grad(), torch.autocast(device_type=inputs.x_t_scaled.device.type, enabled=False):
        (velocity,) = inputs.call(as_trigflow_model(student))
    return velocity.to(dtype)


def _finite_difference_direction(t: torch.Tensor, tangent_t: torch.Tensor, step: float):
    """Per-sample `(h, sign)`: `h = step / |v_t|` (a time step of `step` radians), `sign = -1` where `t + step`
    would pass `pi/2` (the one-sided difference then looks back)."""
    h = step / tangent_t.abs().clamp_min(torch.finfo(tangent_t.dtype).tiny)
    sign = torch.where(t + step < math.pi / 2, 1.0, -1.0).to(t.dtype)
    return h, sign


def _shifted_velocity(student, inputs: TrigFlowInputs, tangent_x: torch.Tensor, tangent_t: torch.Tensor, step: float):
    """The one-sided difference's forward: `(F(x + s h v_x, t + s h v_t), s h)`, fp32, no grad."""
    inputs, tangent_x, tangent_t = _in_fp32(inputs, tangent_x, tangent_t)
    x, t = inputs.x_t_scaled, inputs.t
    h, sign = _finite_difference_direction(t, tangent_t, step)
    signed_h = sign * h
    shifted = _fp32_velocity(
        student, inputs.replace(x_t_scaled=x + expand_like(signed_h, x) * tangent_x, t=t + signed_h * tangent_t)
    )
    return shifted, signed_h


def _check_fp32_parameters(student) -> None:
    """The finite difference needs fp32 forwards: refuse a student whose weights are stored in lower precision."""
    parameter = next((p for p in student.parameters() if p.is_floating_point()), None)
    if parameter is not None and parameter.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"`jvp='finite_difference'` needs a student with fp32 (master) weights, got {parameter.dtype}: in low "
            "precision the difference of two nearby forwards is rounding noise. Use `jvp='exact'` or fp32 weights."
        )


__all__ = [
    "DEFAULT_FINITE_DIFFERENCE_STEP",
    "JVP_COMPILE_BACKEND",
    "expand_like",
    "one_sided_finite_difference",
    "trigflow_velocity_finite_difference",
    "trigflow_velocity_jvp",
    "velocity_tangent",
]
