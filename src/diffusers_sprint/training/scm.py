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

import functools
import math
from dataclasses import dataclass

import torch

from ..models.trigflow_model import as_trigflow_model
from ..trigflow import SIGMA_DATA, add_trigflow_noise, append_dims
from .settings import Range, When, at_least, check_settings, greater_than, setting


TANGENT_NORMS = ("l2", "rms")
NULL_BRANCH_MASKS = ("conditional", "null")
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
            `trigflow_forward(detach_logvar_input=True)`). `False` is the official recipe, which stalls short
            high-lr runs (docs/training/scm.md, "Adaptive weight and the shared embedding").
        jvp (`str`, defaults to `"exact"`):
            How the tangent `dF = cos t sin t dF/dt` is computed. `"exact"`: `torch.func.jvp` (forward-mode AD; the
            attention runs on the math SDPA kernel). `"finite_difference"`: fp32 no-grad forwards along the teacher's
            PF-ODE (fused kernels and `torch.compile` work): one-sided from the grad forward's `F` when that ran
            without autocast, else central ([`trigflow_velocity_finite_difference`]; accuracy: docs/performance.md).
        finite_difference_step (`float`, defaults to `3e-5`):
            The step `delta` of the finite difference, in radians of TrigFlow time: the inputs move by one teacher
            PF-ODE step of `delta` (`x_t / sigma_d + delta dxt_dt / sigma_d`, `t + delta`). Used with
            `jvp="finite_difference"` only; the default is the measured optimum (docs/performance.md).
        compile_jvp (`bool`, defaults to `False`):
            Run the exact JVP under `torch.compile` (Inductor), which traces `torch.func.jvp` through the student:
            the same tangent up to float rounding at ~0.4x the eager cost on CPU (docs/performance.md). The first
            call compiles (minutes); each new input shape recompiles. Used with `jvp="exact"` only.
        guide_teacher (`bool`, defaults to `True`):
            The teacher target is the CFG velocity at `w`. `False`: the plain conditional velocity
            `sigma_d F_T(x_t / sigma_d, t | c)` (one forward, no null branch), what the official loop distils into a
            student without guidance embedder (`cfg_embed: false`).
        null_branch_mask (`str`, defaults to `"conditional"`):
            Attention mask of the teacher's unconditional branch. `"conditional"` (official): the empty-prompt
            embedding under the caption's own mask, as Sana's caption dropout trained it (the null embedding replaces
            the caption, the mask stays). `"null"`: the empty prompt's own mask (diffusers' negative-prompt
            convention; right for teachers fine-tuned with [`drop_captions`], which swaps the mask too).
    """

    _argument_group_name = "sCM (generator phase); defaults are the official recipe"

    sigma_data: float = SIGMA_DATA
    p_mean: float = setting(0.2, help="Generator time: mean of log(sigma_d tan t).")
    p_std: float = setting(1.6, help="Generator time: std of log(sigma_d tan t).", range=at_least(0))
    tangent_warmup_steps: int = setting(
        4000,
        help="Generator updates over which the tangent's second term ramps in (0: none). The official loop counts "
        "G and D phases together; pass half its value to reproduce it exactly (see docs/training.md).",
        range=at_least(0),
    )
    tangent_norm: str = setting("l2", help="Per-sample tangent normalisation.", choices=TANGENT_NORMS, advanced=True)
    tangent_norm_eps: float = setting(0.1, help="The c of g / (||g|| + c).", range=greater_than(0), advanced=True)
    guidance_scales: list[float] = setting(
        [4.0, 4.5, 5.0],
        help="CFG scales w of the teacher, drawn per sample (the full student also gets w as input).",
        range=at_least(1, " (each value; 1 is the conditional teacher without guidance)"),
    )
    adaptive_weight: bool = setting(
        True, help="Adaptive loss weight exp(-logvar) + logvar from a logvar head (official).", advanced=True
    )
    detach_logvar_embedding: bool = setting(
        False,
        help="The adaptive weight's logvar terms train the logvar head only, not the shared time/guidance "
        "embedders (official: they train both; that stalls short, high-learning-rate runs, docs/training/scm.md).",
        advanced=True,
    )
    jvp: str = setting(
        "exact",
        help="The sCM tangent: torch.func.jvp (exact; attention on the math SDPA kernel) or a finite difference of "
        "fp32 no-grad forwards along the teacher's ODE (fused kernels and torch.compile work; needs fp32 master "
        "weights, not --fsdp with bf16; docs/performance.md).",
        choices=JVP_METHODS,
    )
    finite_difference_step: float = setting(
        DEFAULT_FINITE_DIFFERENCE_STEP,
        help="Finite-difference step in radians of TrigFlow time (--jvp finite_difference only).",
        range=Range(lambda v: 0 < v <= 0.1, "in (0, 0.1] radians"),
        fingerprint=When("with --jvp finite_difference", lambda args: args.jvp == "finite_difference"),
        aliases=("--jvp_step",),
    )
    compile_jvp: bool = setting(
        False,
        help="Run the exact JVP under torch.compile (Inductor): the same tangent up to float rounding at ~0.4x the "
        "eager cost on CPU; the first step compiles (minutes). --jvp exact only; docs/performance.md.",
        fingerprint=False,  # the same JVP compiled: float rounding only
        advanced=True,
    )
    guide_teacher: bool = True
    null_branch_mask: str = setting(
        "conditional",
        help="Attention mask of the teacher's unconditional (CFG) branch: 'conditional' (official) runs the empty "
        "prompt under the caption's mask, as Sana's caption dropout trained it; 'null' uses the empty prompt's own "
        "mask (diffusers' convention; right for teachers fine-tuned by prepare_sana_sprint_teacher.py).",
        choices=NULL_BRANCH_MASKS,
        aliases=("--cfg_null_mask",),
    )

    def __post_init__(self):
        self.guidance_scales = tuple(self.guidance_scales)
        if not self.guidance_scales:
            raise ValueError("`guidance_scales` must be a non-empty sequence of numbers >= 1, got ().")
        check_settings(self)
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data > 0):
            raise ValueError(f"`sigma_data` must be a number > 0, got {self.sigma_data!r}.")
        if self.compile_jvp and self.jvp != "exact":
            raise ValueError(f"`compile_jvp` must be a bool, and True only with jvp='exact'; got jvp={self.jvp!r}.")


@dataclass
class SCMLossOutput:
    """
    Output of [`scm_loss`].

    Args:
        loss (`torch.Tensor`, 0-dim): The sCM loss, with grad.
        velocity (`torch.Tensor` of shape `(batch, channels, height, width)`): The student's `F(x_t / sigma_d, t)`,
            with grad (e.g. for `x0_hat = cos(t) x_t - sin(t) sigma_d F`).
        logs (`dict`): Detached 0-dim tensors (not synced to the host): `g_norm_mean` (batch mean of `||g||_2` before
            normalisation), `dF_dt_abs_mean` (`mean |dF/dt|` along the teacher's PF-ODE, per radian),
            `logvar_mean` (with the adaptive weight only); and the float `tangent_warmup_r`.
        extra_velocity (`torch.Tensor` of shape `(extra_batch, channels, height, width)`, *optional*): With grad:
            the student's `F` on `extra_inputs`, from the same call as `velocity`.
    """

    loss: torch.Tensor
    velocity: torch.Tensor
    logs: dict
    extra_velocity: torch.Tensor | None = None


def _expand_4d(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(batch,)` -> `(batch, 1, 1, 1)` in the dtype of `like`."""
    return append_dims(t, like.ndim).to(like.dtype)


def _control(controlnet_cond: torch.Tensor | None) -> dict:
    """The model-call keyword of the control latents: `{}` without a ControlNet (so any model signature works)."""
    return {} if controlnet_cond is None else {"controlnet_cond": controlnet_cond}


def _per_sample(value: torch.Tensor | float, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """A float or tensor broadcast to shape `(batch_size,)` on `like`'s device, in at least float32."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.as_tensor(value, dtype=dtype, device=like.device).reshape(-1).expand(batch_size)


def _cat_rows(ours: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """`ours` and `extra` stacked along the batch, in `ours`' dtype (`None` and `None` give `None`)."""
    if ours is None or extra is None:
        if ours is not None or extra is not None:
            raise ValueError("`extra_inputs` must give a mask / control latents exactly when the sCM rows have them.")
        return None
    return torch.cat([ours, extra.to(device=ours.device, dtype=ours.dtype)])


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


@torch.no_grad()
def trigflow_velocity_jvp(
    student,
    x_t_scaled: torch.Tensor,
    t: torch.Tensor,
    tangent_x: torch.Tensor,
    tangent_t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    guidance_scale: torch.Tensor | float | None,
    controlnet_cond: torch.Tensor | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `torch.func.jvp` of the student's `F(x_t / sigma_d, t)` along `(tangent_x, tangent_t)`, without grad.

    `student` is called as a [`~models.TrigFlowModel`] (a bare transformer is wrapped), so DDP / FSDP2 wrappers see
    the call; `guidance_scale` is used by students with a guidance embedder only. Returns `(F, dF)`, both of shape
    `(batch, C, H, W)`. `controlnet_cond` (control latents of a student with a ControlNet) is a constant of the
    function: no tangent is taken w.r.t. it. `compile=True` runs the JVP under `torch.compile` with
    `JVP_COMPILE_BACKEND` ([`SCMLossConfig`] `compile_jvp`).
    """
    jvp = _compiled_velocity_jvp(JVP_COMPILE_BACKEND) if compile else _velocity_jvp
    tangents = (tangent_x.to(x_t_scaled.dtype), tangent_t.to(t.dtype))
    return jvp(
        as_trigflow_model(student),
        (x_t_scaled, t),
        tangents,
        encoder_hidden_states,
        encoder_attention_mask,
        guidance_scale,
        controlnet_cond,
    )


JVP_COMPILE_BACKEND = "inductor"
"""The `torch.compile` backend of `compile_jvp` (tests set `"aot_eager"`, which traces without code generation)."""


def _velocity_jvp(student, primals, tangents, encoder_hidden_states, encoder_attention_mask, w, controlnet_cond):
    def velocity(x, time):
        return student(
            x, time, encoder_hidden_states, encoder_attention_mask, guidance_scale=w, **_control(controlnet_cond)
        )[0]

    return torch.func.jvp(velocity, primals, tangents)


@functools.cache
def _compiled_velocity_jvp(backend: str):
    return torch.compile(_velocity_jvp, backend=backend)


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
    rounding noise (docs/performance.md). `base` must be `F(x, t)` computed the same way (fp32, no autocast), e.g.
    the grad forward's detached output in an fp32 run. Fused SDPA kernels and a compiled student work here.

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
    extra_inputs: tuple | None = None,
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
        null_embeds, null_mask: The empty prompt (see [`teacher_cfg_velocity`]); `null_mask` is read only with
            `config.null_branch_mask="null"`, neither with `config.guide_teacher=False`.
        guidance_scale (`torch.Tensor` of shape `(batch,)` or a float): `w` per sample, for the teacher's CFG and
            the student's guidance embedding.
        step (`int`): Generator-step counter for the tangent warm-up (count generator steps only, not D steps).
        config ([`SCMLossConfig`], *optional*): Defaults to `SCMLossConfig()`.
        extra_inputs (`tuple`, *optional*): `(x_t_scaled, t, encoder_hidden_states, encoder_attention_mask,
            guidance_scale, controlnet_cond)` of more rows for the student's grad-enabled forward (e.g. the LADD
            fake's): they join that call, one forward and one backward for both, and their `F` is returned as
            `extra_velocity`. They do not enter the loss. With the one-sided finite difference they run in a second
            call (docs/performance.md).
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
    sigma_data, delta = config.sigma_data, config.finite_difference_step
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, z, t = x0.to(dtype), z.to(dtype), t.to(dtype)
    w = _per_sample(guidance_scale, x0.shape[0], t)
    prompt = (encoder_hidden_states, encoder_attention_mask)

    # 1. The teacher's CFG velocity at x_t and the PF-ODE tangents of the student's inputs (no grad).
    x_t = add_trigflow_noise(x0, z, t)
    x, control = x_t / sigma_data, _control(controlnet_cond)
    if config.guide_teacher:
        null_mask = encoder_attention_mask if config.null_branch_mask == "conditional" else null_mask
        cfg_args = (*prompt, null_embeds, null_mask, w, sigma_data)
        dxt_dt = teacher_cfg_velocity(teacher, x, t, *cfg_args, controlnet_cond=controlnet_cond).to(dtype)
    else:  # the plain conditional velocity (official for students without guidance embedder)
        with torch.no_grad():
            dxt_dt = sigma_data * teacher(x, t, *prompt, **control)[0].to(dtype)
    v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, sigma_data)

    # 2. dF = cos t sin t dF/dt along them (no grad, before the grad forward). The one-sided finite difference takes
    #    the grad forward's own F as base point, unless autocast lowers its precision (then central).
    finite_difference = config.jvp == "finite_difference"
    one_sided = finite_difference and not torch.is_autocast_enabled(x0.device.type)
    if finite_difference:
        _check_fp32_parameters(student)
    with torch.no_grad():
        if not finite_difference:
            _, dF = trigflow_velocity_jvp(
                student, x, t, v_x, v_t, *prompt, w, controlnet_cond=controlnet_cond, compile=config.compile_jvp
            )
        elif one_sided:
            shifted, signed_h = _shifted_velocity(student, x, t, v_x, v_t, *prompt, w, delta, controlnet_cond)
        else:
            dF = trigflow_velocity_finite_difference(
                student, x, t, v_x, v_t, *prompt, w, delta, controlnet_cond=controlnet_cond
            )

    # 3. F and logvar with grad. F_minus is this forward's own value, so F - F_minus is exactly 0 (the JVP's
    #    math-SDPA primal may differ from the fused-kernel forward by float error, which must not enter the target).
    #    Extra rows (the LADD fake's) join this call, except with the one-sided difference: its base point must come
    #    from a call laid out like the shifted one, else batching changes F's rounding, which / h enters the tangent.
    merge_extra = extra_inputs is not None and not one_sided
    inputs = (x, t, *prompt, w, controlnet_cond)
    if merge_extra:
        inputs = [_cat_rows(ours, extra) for ours, extra in zip(inputs, extra_inputs)]
    out = student(
        *inputs[:4], guidance_scale=inputs[4], **_control(inputs[5]),
        return_logvar=config.adaptive_weight, detach_logvar_input=config.detach_logvar_embedding,
    )  # fmt: skip
    batch_size, extra_velocity = x0.shape[0], None
    if merge_extra:
        extra_velocity, out = out[0][batch_size:], tuple(o[:batch_size] for o in out)
    elif extra_inputs is not None:
        (extra_velocity,) = student(*extra_inputs[:4], guidance_scale=extra_inputs[4], **_control(extra_inputs[5]))
    F = out[0].to(dtype)
    F_minus = F.detach()
    if one_sided:
        dF = (shifted - F_minus.to(shifted.dtype)) / _expand_4d(signed_h, shifted)
    dF = dF.to(dtype)

    # 4. The tangent g (warmed up, normalised) and the adaptively weighted loss.
    r = tangent_warmup(step, config.tangent_warmup_steps)
    g = scm_tangent(F_minus, dF, x_t, t, dxt_dt, r, sigma_data)
    g_norm_mean = _per_sample_l2(g).mean()
    g = normalize_tangent(g, config.tangent_norm, config.tangent_norm_eps)
    weight = 1 / (sigma_data * _expand_4d(torch.tan(t), F))
    logvar = _expand_4d(out[1].to(dtype).reshape(-1), F) if config.adaptive_weight else torch.zeros_like(weight)
    loss = (torch.exp(-logvar) * weight * (F - F_minus - g).square() + logvar).mean()

    logs = {
        "g_norm_mean": g_norm_mean,
        "dF_dt_abs_mean": (dF / _expand_4d(torch.cos(t) * torch.sin(t), dF)).abs().mean(),
        "tangent_warmup_r": r,
    }
    if config.adaptive_weight:
        logs["logvar_mean"] = logvar.detach().mean()
    return SCMLossOutput(loss=loss, velocity=F, logs=logs, extra_velocity=extra_velocity)


__all__ = [
    "DEFAULT_FINITE_DIFFERENCE_STEP",
    "JVP_METHODS",
    "NULL_BRANCH_MASKS",
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
