"""The sCM loss of SANA-Sprint: continuous-time consistency distillation in TrigFlow (paper section 4.1, sCM eq. 8).

Units and scalings (see `docs/training/scm.md`):

- `t` is TrigFlow time in radians, `0` = data, `pi/2` = noise, shape `(batch,)`.
- `x0` is the data latent in sigma_data units (`vae_latent * scaling_factor * sigma_data`), `z ~ N(0, sigma_data^2 I)`,
  `x_t = cos(t) x0 + sin(t) z`. Networks see `x_t / sigma_data` and return the unit-scale velocity `F`.
- `dxt_dt = sigma_data F_teacher` is the PF-ODE velocity of `x_t` (sigma_data units), here with classifier-free
  guidance.

One generator step (official `train_scm_ladd.py`, generator phase):

    dxt_dt   = sigma_d (F_T(x_t / sigma_d, t | null) + w (F_T(. | c) - F_T(. | null)))        no grad
    _, dF    = jvp(F_theta, (x_t / sigma_d, t), (cos t sin t dxt_dt / sigma_d, cos t sin t))     no grad
    F, logvar = F_theta(x_t / sigma_d, t, w);  F_minus = F.detach()                            with grad
    g        = -cos^2 t (sigma_d F_minus - dxt_dt) - r (cos t sin t x_t + sigma_d dF)
    g        = g / (||g|| + c)
    loss     = mean( exp(-logvar) / (sigma_d tan t) (F - F_minus - g)^2 + logvar )

`F - F_minus - g` is `F - stopgrad(F + g)`: the value of the residual is `-g`, its gradient is that of `F`.
"""

import math
from dataclasses import dataclass

import torch

from ..models.trigflow_model import as_trigflow_model
from .trigflow import add_trigflow_noise


TANGENT_NORMS = ("l2", "rms")
JVP_METHODS = ("exact", "finite_difference")
DEFAULT_FINITE_DIFFERENCE_STEP = 3e-5  # radians of teacher-ODE time (benchmarks/fd_jvp_accuracy.py)


@dataclass
class SCMLossConfig:
    """
    Options of [`scm_loss`].

    Args:
        sigma_data (`float`, defaults to 0.5): Data standard deviation of the TrigFlow parametrisation.
        p_mean (`float`, defaults to 0.2), p_std (`float`, defaults to 1.6):
            Log-normal proposal of `tan(t) sigma_data` used to draw `t` (see `sample_trigflow_time`); stored here so
            one config describes the generator's sCM term. [`scm_loss`] takes `t` as given.
        tangent_warmup_steps (`int`, defaults to 4000):
            Generator steps over which the tangent's second term is ramped in, `r = min(1, step / warmup)`; `0`
            means no warm-up (`r = 1`).
        tangent_norm (`str`, defaults to `"l2"`):
            `"l2"`: `g / (||g||_2 + c)` with the L2 norm over all elements of a sample (official). `"rms"`:
            `g / (rms(g) + c)`, `rms(g) = sqrt(mean(g^2))` per sample, independent of the latent size (sCM-mnist,
            FastGen).
        tangent_norm_eps (`float`, defaults to 0.1): The constant `c` of the tangent normalisation.
        guidance_scales (`tuple[float, ...]`, defaults to `(4.0, 4.5, 5.0)`):
            The CFG scales `w` the training loop draws per sample (see [`sample_guidance_scales`]).
        adaptive_weight (`bool`, defaults to `True`):
            Weight each sample by `exp(-logvar)` and add `logvar` (the student needs `logvar_head=True`).
        detach_logvar_embedding (`bool`, defaults to `False`):
            The `logvar` terms train the logvar head only, not the shared time(+guidance) embedders (the student's
            `trigflow_forward(detach_logvar_input=True)`). `False` is the official recipe, where their gradient,
            of order 1 per element whatever the error, also moves the embedders: at the learning rates of short
            runs this stalls distillation (tests/test_distill.py; docs/training/scm.md, "Adaptive weight and the shared
            embedding").
        reuse_jvp_primal (`bool`, defaults to `False`):
            Take `F` from the primal of a grad-enabled JVP instead of a second student forward. Same loss and
            gradients; the trade-offs are in `docs/training/scm.md`. Exact JVP only.
        jvp (`str`, defaults to `"exact"`):
            How the tangent `dF = cos t sin t dF/dt` is computed. `"exact"`: `torch.func.jvp` (forward-mode AD; the
            attention runs on the math SDPA kernel). `"finite_difference"`: a difference of ordinary no-grad
            forwards along the teacher's PF-ODE (fused attention kernels and `torch.compile` work), in fp32 with
            autocast off: one-sided with the grad forward's `F` as base point (one extra forward) when that forward
            ran without autocast, else central (two extra fp32 forwards); see
            [`trigflow_velocity_finite_difference`]. An approximation: relative error 2-7e-3 on the toy teacher
            (docs/performance.md), below the exact JVP's own error under bf16 autocast.
        finite_difference_step (`float`, defaults to `3e-5`):
            The step `delta` of the finite difference, in radians of TrigFlow time: the inputs move by one teacher
            PF-ODE step of `delta` (`x_t / sigma_d + delta dxt_dt / sigma_d`, `t + delta`). Used with
            `jvp="finite_difference"` only. `3e-5` was the most accurate of 1e-5 ... 1e-2 over t in [0.05, 1.55]
            on the toy teacher in fp32 (round-off dominates below it, curvature above; docs/performance.md).
    """

    sigma_data: float = 0.5
    p_mean: float = 0.2
    p_std: float = 1.6
    tangent_warmup_steps: int = 4000
    tangent_norm: str = "l2"
    tangent_norm_eps: float = 0.1
    guidance_scales: tuple[float, ...] = (4.0, 4.5, 5.0)
    adaptive_weight: bool = True
    detach_logvar_embedding: bool = False
    reuse_jvp_primal: bool = False
    jvp: str = "exact"
    finite_difference_step: float = DEFAULT_FINITE_DIFFERENCE_STEP

    def __post_init__(self):
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data > 0):
            raise ValueError(f"`sigma_data` must be a number > 0, got {self.sigma_data!r}.")
        if not (isinstance(self.p_std, (int, float)) and self.p_std >= 0):
            raise ValueError(f"`p_std` must be a number >= 0, got {self.p_std!r}.")
        if not isinstance(self.p_mean, (int, float)) or not math.isfinite(self.p_mean):
            raise ValueError(f"`p_mean` must be a finite number, got {self.p_mean!r}.")
        warmup = self.tangent_warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"`tangent_warmup_steps` must be an integer >= 0, got {warmup!r}.")
        if self.tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"`tangent_norm` must be one of {TANGENT_NORMS}, got {self.tangent_norm!r}.")
        if not (isinstance(self.tangent_norm_eps, (int, float)) and self.tangent_norm_eps > 0):
            raise ValueError(f"`tangent_norm_eps` must be a number > 0, got {self.tangent_norm_eps!r}.")
        self.guidance_scales = tuple(self.guidance_scales)
        if not self.guidance_scales or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.guidance_scales
        ):
            raise ValueError(
                f"`guidance_scales` must be a non-empty sequence of finite numbers, got {self.guidance_scales!r}."
            )
        for name in ("adaptive_weight", "detach_logvar_embedding", "reuse_jvp_primal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"`jvp` must be one of {JVP_METHODS}, got {self.jvp!r}.")
        step = self.finite_difference_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.1:
            raise ValueError(f"`finite_difference_step` must be a number in (0, 0.1] radians, got {step!r}.")
        if self.jvp == "finite_difference" and self.reuse_jvp_primal:
            raise ValueError(
                "`reuse_jvp_primal=True` reuses the primal of the exact JVP; it does not apply with "
                "`jvp='finite_difference'` (whose one-sided form already reuses the grad forward's F)."
            )


@dataclass
class SCMLossOutput:
    """
    Output of [`scm_loss`]. Everything but `loss` and `velocity` is detached; 0-dim tensors are not synced to the
    host (call `.item()` when logging).

    Args:
        loss (`torch.Tensor`, 0-dim): The sCM loss, with grad.
        velocity (`torch.Tensor` of shape `(batch, channels, height, width)`): The student's `F(x_t / sigma_d, t)`,
            with grad (e.g. for `x0_hat = cos(t) x_t - sin(t) sigma_d F`).
        loss_no_logvar (`torch.Tensor`, 0-dim): `mean( (F - F_minus - g)^2 / (sigma_d tan t) )`, no adaptive weight.
        loss_unweighted (`torch.Tensor`, 0-dim): `mean( (F - F_minus - g)^2 )` = mean squared normalised tangent.
        g_norm_mean (`torch.Tensor`, 0-dim): Batch mean of the per-sample L2 norm `||g||_2` before normalisation.
        g_rms_mean (`torch.Tensor`, 0-dim): Batch mean of the per-sample `rms(g)` before normalisation.
        dF_dt_abs_mean (`torch.Tensor`, 0-dim): `mean |dF/dt|`, the student's total time derivative along the
            teacher's PF-ODE (unit scale, per radian); `dF / (cos t sin t)`.
        teacher_velocity_abs_mean (`torch.Tensor`, 0-dim): `mean |dxt_dt| / sigma_d`, the CFG teacher velocity.
        logvar_mean (`torch.Tensor`, 0-dim, or `None`): Batch mean of the adaptive log-variance (`None` without
            adaptive weight).
        jvp_primal_max_abs_diff (`torch.Tensor`, 0-dim): `max |F_jvp - F|`, the JVP's primal against the grad
            forward (math-SDPA vs fused kernels; exactly 0 with `reuse_jvp_primal` and with the finite difference,
            which has no separate primal).
        tangent_warmup_r (`float`): The warm-up factor `r` used.
    """

    loss: torch.Tensor
    velocity: torch.Tensor
    loss_no_logvar: torch.Tensor
    loss_unweighted: torch.Tensor
    g_norm_mean: torch.Tensor
    g_rms_mean: torch.Tensor
    dF_dt_abs_mean: torch.Tensor
    teacher_velocity_abs_mean: torch.Tensor
    logvar_mean: torch.Tensor | None
    jvp_primal_max_abs_diff: torch.Tensor
    tangent_warmup_r: float


def _expand_4d(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(batch,)` -> `(batch, 1, 1, 1)` in the dtype of `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _control(controlnet_cond: torch.Tensor | None) -> dict:
    """The model-call keyword of the control latents: `{}` without a ControlNet (so any model signature works)."""
    return {} if controlnet_cond is None else {"controlnet_cond": controlnet_cond}


def _per_sample(value: torch.Tensor | float, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """A float or tensor broadcast to shape `(batch_size,)` on `like`'s device, in at least float32."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.as_tensor(value, dtype=dtype, device=like.device).reshape(-1).expand(batch_size)


def sample_guidance_scales(
    batch_size: int,
    guidance_scales: tuple[float, ...] = (4.0, 4.5, 5.0),
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The CFG scale `w` per sample, uniform over `guidance_scales`; shape `(batch_size,)`, float32."""
    draw_device = generator.device if generator is not None else device
    index = torch.randint(len(guidance_scales), (batch_size,), generator=generator, device=draw_device)
    return torch.tensor(guidance_scales, dtype=torch.float32, device=draw_device)[index].to(device)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """`r = min(1, step / warmup_steps)` (`1` when `warmup_steps == 0`); `step` counts generator steps."""
    if warmup_steps == 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


@torch.no_grad()
def teacher_cfg_velocity(
    teacher,
    x_t_scaled: torch.Tensor,
    t: torch.Tensor | float,
    cond_embeds: torch.Tensor,
    cond_mask: torch.Tensor | None,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor | None,
    guidance_scale: torch.Tensor | float,
    sigma_data: float = 0.5,
    controlnet_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    The teacher's classifier-free-guided PF-ODE velocity `dxt_dt = sigma_d (F_T(null) + w (F_T(c) - F_T(null)))`.

    Conditional and unconditional branches run as one batch of `2 * batch`. No grad.

    Args:
        teacher ([`~models.TrigFlowModel`] or [`SanaSprintTransformer2DModel`]): A TrigFlow teacher without guidance
            embedder (a bare transformer is wrapped in a `TrigFlowModel`).
        x_t_scaled (`torch.Tensor` of shape `(batch, C, H, W)`): `x_t / sigma_data`.
        t (`torch.Tensor` of shape `(batch,)` or a float): TrigFlow time in radians.
        cond_embeds (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`): Prompt hidden states.
        cond_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 = attend, 0 = padding.
        null_embeds (`torch.Tensor` of shape `(batch or 1, seq_len, caption_channels)`): Empty-prompt hidden states,
            same `seq_len` as `cond_embeds`; a batch of 1 is broadcast.
        null_mask (`torch.Tensor` of shape `(batch or 1, seq_len)`, *optional*): Mask of the empty prompt.
        guidance_scale (`torch.Tensor` of shape `(batch,)` or a float): The CFG scale `w` (1 = no guidance).
        sigma_data (`float`, defaults to 0.5): Scales the unit velocity `F` to `dxt_dt` (sigma_data units).
        controlnet_cond (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): Control latents of a teacher with
            a ControlNet; both CFG branches get them (as diffusers' `SanaControlNetPipeline` does).

    Returns:
        `torch.Tensor` of shape `(batch, C, H, W)`: `dxt_dt` in at least float32.
    """
    teacher = as_trigflow_model(teacher)
    batch_size = x_t_scaled.shape[0]
    if null_embeds.shape[0] == 1:
        null_embeds = null_embeds.expand(batch_size, -1, -1)
    if null_embeds.shape != cond_embeds.shape:
        raise ValueError(
            f"`null_embeds` of shape {tuple(null_embeds.shape)} does not match `cond_embeds` of shape "
            f"{tuple(cond_embeds.shape)} (encode the empty prompt with the same `max_length` padding)."
        )
    mask = None
    if cond_mask is not None or null_mask is not None:
        reference = cond_mask if cond_mask is not None else null_mask
        cond_mask = torch.ones_like(reference[:1]) if cond_mask is None else cond_mask
        null_mask = torch.ones_like(reference[:1]) if null_mask is None else null_mask
        mask = torch.cat([null_mask.expand(batch_size, -1), cond_mask.expand(batch_size, -1).to(null_mask.dtype)])

    t = _per_sample(t, batch_size, x_t_scaled)
    (velocity,) = teacher(
        torch.cat([x_t_scaled, x_t_scaled]),
        torch.cat([t, t]),
        torch.cat([null_embeds, cond_embeds.to(null_embeds.dtype)]),
        mask,
        **_control(None if controlnet_cond is None else torch.cat([controlnet_cond, controlnet_cond])),
    )
    velocity_null, velocity_cond = velocity.chunk(2)
    w = _expand_4d(_per_sample(guidance_scale, batch_size, velocity), velocity)
    return sigma_data * (velocity_null + w * (velocity_cond - velocity_null))


def pf_ode_tangents(x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, sigma_data: float = 0.5):
    """
    Tangents `(v_x, v_t) = (cos t sin t dxt_dt / sigma_d, cos t sin t)` of the student's inputs `(x_t / sigma_d, t)`.

    Along them, `jvp(F, (x_t / sigma_d, t), (v_x, v_t)) = cos t sin t dF/dt`, the total time derivative of `F` on the
    teacher's PF-ODE, pre-multiplied by `cos t sin t` (which keeps it finite near `t = pi/2`).
    Shapes: `x_t`, `dxt_dt` `(batch, C, H, W)`; `t` `(batch,)` radians. Returns `v_x` like `x_t`, `v_t` like `t`.
    """
    cos_sin = torch.cos(t) * torch.sin(t)
    return _expand_4d(cos_sin, dxt_dt) * dxt_dt / sigma_data, cos_sin


def trigflow_velocity_jvp(
    student,
    x_t_scaled: torch.Tensor,
    t: torch.Tensor,
    tangent_x: torch.Tensor,
    tangent_t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    guidance_scale: torch.Tensor | float | None,
    return_logvar: bool = False,
    detach_logvar_input: bool = False,
    controlnet_cond: torch.Tensor | None = None,
):
    """
    `torch.func.jvp` of the student's `F(x_t / sigma_d, t)` along `(tangent_x, tangent_t)`.

    `student` is called as a [`~models.TrigFlowModel`] (a bare transformer is wrapped), so DDP / FSDP2 wrappers see
    the call. Runs under the caller's grad mode: under `torch.no_grad()` nothing is recorded; with grad enabled the
    primal outputs carry autograd history (used by `reuse_jvp_primal`). `guidance_scale` is used by students with
    a guidance embedder only; `detach_logvar_input` goes to the student's `trigflow_forward`. `controlnet_cond`
    (control latents of a student with a ControlNet) is a constant of the function: no tangent is taken w.r.t. it.

    Returns:
        `(F, dF)`, or `(F, logvar, dF)` with `return_logvar`; `F`, `dF` of shape `(batch, C, H, W)`, `logvar`
        `(batch, 1)`.
    """
    student = as_trigflow_model(student)

    def velocity(x, time):
        out = student(
            x,
            time,
            encoder_hidden_states,
            encoder_attention_mask,
            guidance_scale=guidance_scale,
            return_logvar=return_logvar,
            detach_logvar_input=detach_logvar_input,
            **_control(controlnet_cond),
        )
        return out if return_logvar else out[0]

    primal, tangent = torch.func.jvp(
        velocity, (x_t_scaled, t), (tangent_x.to(x_t_scaled.dtype), tangent_t.to(t.dtype))
    )
    if return_logvar:
        return primal[0], primal[1], tangent[0]
    return primal, tangent


def _fp32_velocity(
    student, x, t, encoder_hidden_states, encoder_attention_mask, guidance_scale, controlnet_cond=None
) -> torch.Tensor:
    """One no-grad student forward in (at least) fp32 with autocast off: `F(x, t)` in float32."""
    student = as_trigflow_model(student)
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        (velocity,) = student(
            x.to(dtype),
            t.to(dtype),
            encoder_hidden_states,
            encoder_attention_mask,
            guidance_scale=guidance_scale,
            **_control(controlnet_cond),
        )
    return velocity.to(dtype)


def _finite_difference_direction(t: torch.Tensor, tangent_t: torch.Tensor, step: float):
    """Per-sample `(h, sign)`: `h = step / |v_t|` (a time step of `step` radians), `sign = -1` where `t + step`
    would pass `pi/2` (the one-sided difference then looks back)."""
    h = step / tangent_t.abs().clamp_min(torch.finfo(tangent_t.dtype).tiny)
    sign = torch.where(t + step < math.pi / 2, 1.0, -1.0).to(t.dtype)
    return h, sign


def _shifted_velocity(
    student,
    x,
    t,
    tangent_x,
    tangent_t,
    encoder_hidden_states,
    encoder_attention_mask,
    guidance_scale,
    step,
    controlnet_cond=None,
):
    """The one-sided difference's forward: `(F(x + s h v_x, t + s h v_t), s h)`, fp32, no grad."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, t, tangent_x, tangent_t = (a.to(dtype) for a in (x, t, tangent_x, tangent_t))
    h, sign = _finite_difference_direction(t, tangent_t, step)
    signed_h = sign * h
    shifted = _fp32_velocity(
        student,
        x + _expand_4d(signed_h, x) * tangent_x,
        t + signed_h * tangent_t,
        encoder_hidden_states,
        encoder_attention_mask,
        guidance_scale,
        controlnet_cond,
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


def trigflow_velocity_finite_difference(
    student,
    x_t_scaled: torch.Tensor,
    t: torch.Tensor,
    tangent_x: torch.Tensor,
    tangent_t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    guidance_scale: torch.Tensor | float | None,
    step: float = DEFAULT_FINITE_DIFFERENCE_STEP,
    base: torch.Tensor | None = None,
    controlnet_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    A finite-difference estimate of `jvp(F, (x_t / sigma_d, t), (tangent_x, tangent_t))`, from ordinary forwards.

    The inputs move along the tangent by `h = step / |tangent_t|` per sample, i.e. by a time step of `step`
    radians (with the PF-ODE tangents of [`pf_ode_tangents`]: one teacher ODE step, `x + step dxt_dt / sigma_d`):

        one-sided (`base` given):   dF ~ (F(x + s h v_x, t + s h v_t) - base) / (s h),  s = +1, or -1 near pi/2
        central (`base` is None):   dF ~ (F(x + h v_x, t + h v_t) - F(x - h v_x, t - h v_t)) / (2 h)

    Every forward runs without grad, in fp32 with autocast off: in bf16 the difference of two nearby outputs is
    rounding noise (relative error 0.1-100 on the toy teacher, docs/performance.md). `base` must be `F(x, t)`
    computed the same way (fp32, no autocast), e.g. the grad forward's detached output in an fp32 run. Costs one
    forward (one-sided) or two (central). Fused SDPA kernels and a compiled student work here, unlike in the JVP.

    Args:
        student ([`~models.TrigFlowModel`], possibly wrapped, or a [`SanaSprintTransformer2DModel`]): The model.
        x_t_scaled (`torch.Tensor` of shape `(batch, C, H, W)`), t (`torch.Tensor` of shape `(batch,)`, radians):
            The point.
        tangent_x (`torch.Tensor` like `x_t_scaled`), tangent_t (`torch.Tensor` of shape `(batch,)`, non-zero):
            The direction.
        encoder_hidden_states, encoder_attention_mask, guidance_scale: As for [`trigflow_velocity_jvp`].
        step (`float`, defaults to `3e-5`): The time step in radians.
        base (`torch.Tensor` like `x_t_scaled`, *optional*): `F(x_t_scaled, t)` for the one-sided difference.
        controlnet_cond (`torch.Tensor`, *optional*): Control latents of a student with a ControlNet (held fixed).

    Returns:
        `torch.Tensor` of shape `(batch, C, H, W)` in float32 (float64 for float64 inputs): the tangent `dF`.
    """
    student = as_trigflow_model(student)
    conditioning = (encoder_hidden_states, encoder_attention_mask, guidance_scale)
    dtype = torch.promote_types(x_t_scaled.dtype, torch.float32)
    x, t, tangent_x, tangent_t = (a.to(dtype) for a in (x_t_scaled, t, tangent_x, tangent_t))
    if base is None:
        h, _ = _finite_difference_direction(t, tangent_t, step)
        h4 = _expand_4d(h, x)
        plus = _fp32_velocity(student, x + h4 * tangent_x, t + h * tangent_t, *conditioning, controlnet_cond)
        minus = _fp32_velocity(student, x - h4 * tangent_x, t - h * tangent_t, *conditioning, controlnet_cond)
        return (plus - minus) / (2 * h4)
    shifted, signed_h = _shifted_velocity(student, x, t, tangent_x, tangent_t, *conditioning, step, controlnet_cond)
    return (shifted - base.detach().to(dtype)) / _expand_4d(signed_h, x)


def scm_tangent(
    F_minus: torch.Tensor,
    dF: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxt_dt: torch.Tensor,
    r: float,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """
    The (unnormalised) sCM tangent `g = -cos^2 t (sigma_d F_minus - dxt_dt) - r (cos t sin t x_t + sigma_d dF)`.

    `F_minus` is the student's `F` (no grad), `dF = cos t sin t dF/dt` from [`trigflow_velocity_jvp`], `dxt_dt` the
    teacher velocity (sigma_data units), `x_t` sigma_data-scaled, `t` `(batch,)` radians.

    With `r = 1`, `g = cos t * d/dt [x0_hat]` along the teacher's PF-ODE, `x0_hat = cos t x_t - sin t sigma_d F`: the
    consistency condition is `g = 0`, and moving `F` by `+g` moves `x0_hat` by `-sin t sigma_d g`, back towards its
    value at `t - dt`. `r < 1` scales the terms `cos t sin t (x_t + sigma_d dF/dt)` (tangent warm-up).
    """
    cos_t, sin_t = _expand_4d(torch.cos(t), x_t), _expand_4d(torch.sin(t), x_t)
    return -(cos_t**2) * (sigma_data * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sigma_data * dF)


def _per_sample_l2(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)


def _per_sample_rms(g: torch.Tensor) -> torch.Tensor:
    return g.square().mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt()


def normalize_tangent(g: torch.Tensor, norm: str = "l2", eps: float = 0.1) -> torch.Tensor:
    """Per-sample tangent normalisation: `g / (||g||_2 + eps)` (`"l2"`) or `g / (rms(g) + eps)` (`"rms"`)."""
    if norm == "l2":
        return g / (_per_sample_l2(g) + eps)
    if norm == "rms":
        return g / (_per_sample_rms(g) + eps)
    raise ValueError(f"`norm` must be one of {TANGENT_NORMS}, got {norm!r}.")


def scm_loss(
    student,
    teacher,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor | None,
    guidance_scale: torch.Tensor | float,
    step: int,
    config: SCMLossConfig | None = None,
    controlnet_cond: torch.Tensor | None = None,
) -> SCMLossOutput:
    r"""
    The sCM consistency-distillation loss of one generator step.

    Args:
        student ([`~models.TrigFlowModel`], possibly DDP / FSDP2-wrapped, or a [`SanaSprintTransformer2DModel`]):
            Trained model; with a guidance embedder it receives `w`, and with `config.adaptive_weight` it needs
            `logvar_head=True`.
        teacher ([`~models.TrigFlowModel`] or [`SanaSprintTransformer2DModel`]): Frozen TrigFlow teacher without
            guidance embedder.
        x0 (`torch.Tensor` of shape `(batch, C, H, W)`): Data latents in sigma_data units.
        z (`torch.Tensor` of shape `(batch, C, H, W)`): Noise `~ N(0, sigma_d^2 I)` (sigma_data-scaled).
        t (`torch.Tensor` of shape `(batch,)`): TrigFlow time in radians, strictly inside `(0, pi/2)` (the weight
            `1 / (sigma_d tan t)` is infinite at 0 and the tangent degenerate at `pi/2`).
        encoder_hidden_states (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`), encoder_attention_mask
            (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): The prompt.
        null_embeds, null_mask: The empty prompt (see [`teacher_cfg_velocity`]).
        guidance_scale (`torch.Tensor` of shape `(batch,)` or a float): `w` per sample, for the teacher's CFG and
            the student's guidance embedding.
        step (`int`): Generator-step counter for the tangent warm-up (count generator steps only, not D steps).
        config ([`SCMLossConfig`], *optional*): Defaults to `SCMLossConfig()`.
        controlnet_cond (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): Control latents, for a teacher and
            a student that both carry a ControlNet: they condition the teacher's CFG velocity (both branches), the
            student's JVP (as a constant: the tangent is w.r.t. `x_t` and `t` only) and its grad forward.

    Returns:
        [`SCMLossOutput`]. `loss` is the batch mean of the per-sample mean over elements of
        `exp(-logvar) / (sigma_d tan t) (F - F_minus - g)^2 + logvar` (the official all-element mean: every sample
        has the same number of elements); without adaptive weight the `logvar` terms are dropped.
    """
    config = SCMLossConfig() if config is None else config
    student, teacher = as_trigflow_model(student), as_trigflow_model(teacher)
    sigma_data = config.sigma_data
    compute_dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, z, t = x0.to(compute_dtype), z.to(compute_dtype), t.to(compute_dtype)
    batch_size = x0.shape[0]
    guidance_scale = _per_sample(guidance_scale, batch_size, t)

    x_t = add_trigflow_noise(x0, z, t)
    x_t_scaled = x_t / sigma_data
    cfg_args = (encoder_hidden_states, encoder_attention_mask, null_embeds, null_mask, guidance_scale, sigma_data)
    dxt_dt = teacher_cfg_velocity(teacher, x_t_scaled, t, *cfg_args, controlnet_cond=controlnet_cond)
    dxt_dt = dxt_dt.to(compute_dtype)
    v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, sigma_data)

    jvp_args = (student, x_t_scaled, t, v_x, v_t, encoder_hidden_states, encoder_attention_mask, guidance_scale)
    logvar = None
    if config.reuse_jvp_primal:
        # One grad-enabled JVP: its primal is F with autograd history; the tangent's history is dropped unused.
        outputs = trigflow_velocity_jvp(
            *jvp_args,
            return_logvar=config.adaptive_weight,
            detach_logvar_input=config.detach_logvar_embedding,
            controlnet_cond=controlnet_cond,
        )
        F, dF = outputs[0], outputs[-1].detach()
        logvar = outputs[1] if config.adaptive_weight else None
        del outputs
        jvp_primal_max_abs_diff = torch.zeros((), device=x0.device)
    else:
        finite_difference = config.jvp == "finite_difference"
        if finite_difference:
            _check_fp32_parameters(student)
        # One-sided FD needs F(x, t) in fp32: the grad forward's own output, unless autocast lowers its precision.
        one_sided = finite_difference and not torch.is_autocast_enabled(x0.device.type)
        conditioning = (encoder_hidden_states, encoder_attention_mask, guidance_scale)
        delta = config.finite_difference_step
        with torch.no_grad():
            if not finite_difference:
                F_jvp, dF = trigflow_velocity_jvp(*jvp_args, controlnet_cond=controlnet_cond)
            elif one_sided:
                shifted, signed_h = _shifted_velocity(
                    student, x_t_scaled, t, v_x, v_t, *conditioning, delta, controlnet_cond
                )
            else:
                dF = trigflow_velocity_finite_difference(
                    student, x_t_scaled, t, v_x, v_t, *conditioning, delta, controlnet_cond=controlnet_cond
                )
        out = student(
            x_t_scaled,
            t,
            encoder_hidden_states,
            encoder_attention_mask,
            guidance_scale=guidance_scale,
            return_logvar=config.adaptive_weight,
            detach_logvar_input=config.detach_logvar_embedding,
            **_control(controlnet_cond),
        )
        F, logvar = out[0], (out[1] if config.adaptive_weight else None)
        if one_sided:
            dF = (shifted - F.detach().to(shifted.dtype)) / _expand_4d(signed_h, shifted)
            del shifted
        if finite_difference:  # no separate primal: the base point is the grad forward itself
            jvp_primal_max_abs_diff = torch.zeros((), device=x0.device)
        else:
            jvp_primal_max_abs_diff = (F_jvp - F.detach()).abs().max()
    F, dF = F.to(compute_dtype), dF.to(compute_dtype)
    # F_minus is the grad forward's own value, so F - F_minus is exactly 0: the JVP's math-SDPA primal may differ
    # from the fused-kernel forward by float error (large in bf16), which must not leak into the regression target.
    F_minus = F.detach()

    r = tangent_warmup(step, config.tangent_warmup_steps)
    g = scm_tangent(F_minus, dF, x_t, t, dxt_dt, r, sigma_data)
    g_norm_mean, g_rms_mean = _per_sample_l2(g).mean(), _per_sample_rms(g).mean()
    g = normalize_tangent(g, config.tangent_norm, config.tangent_norm_eps)

    weight = 1 / (sigma_data * _expand_4d(torch.tan(t), F))
    squared_error = (F - F_minus - g).square()
    if config.adaptive_weight:
        logvar = _expand_4d(logvar.to(compute_dtype).reshape(-1), F)
        loss = (torch.exp(-logvar) * weight * squared_error + logvar).mean()
    else:
        loss = (weight * squared_error).mean()

    cos_sin = _expand_4d(torch.cos(t) * torch.sin(t), dF)
    return SCMLossOutput(
        loss=loss,
        velocity=F,
        loss_no_logvar=(weight * squared_error).mean().detach(),
        loss_unweighted=squared_error.mean().detach(),
        g_norm_mean=g_norm_mean,
        g_rms_mean=g_rms_mean,
        dF_dt_abs_mean=(dF / cos_sin).abs().mean(),
        teacher_velocity_abs_mean=dxt_dt.abs().mean() / sigma_data,
        logvar_mean=None if logvar is None else logvar.detach().mean(),
        jvp_primal_max_abs_diff=jvp_primal_max_abs_diff.detach(),
        tangent_warmup_r=r,
    )


__all__ = [
    "DEFAULT_FINITE_DIFFERENCE_STEP",
    "JVP_METHODS",
    "SCMLossConfig",
    "SCMLossOutput",
    "normalize_tangent",
    "pf_ode_tangents",
    "sample_guidance_scales",
    "scm_loss",
    "scm_tangent",
    "tangent_warmup",
    "teacher_cfg_velocity",
    "trigflow_velocity_finite_difference",
    "trigflow_velocity_jvp",
]
