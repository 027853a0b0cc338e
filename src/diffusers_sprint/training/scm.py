"""The sCM loss of SANA-Sprint: continuous-time consistency distillation in TrigFlow (paper section 4.1, sCM eq. 8).

Units and scalings (see `docs/training/scm.md`):

- `t` is TrigFlow time in radians, `0` = data, `pi/2` = noise, shape `(batch,)`.
- `x0` is the data latent in sigma_data units (`vae_latent * scaling_factor * sigma_data`), `z ~ N(0, sigma_data^2 I)`,
  `x_t = cos(t) x0 + sin(t) z`. Networks see `x_t / sigma_data` and return the unit-scale velocity `F`.
- `dxt_dt = sigma_data F_teacher` is the PF-ODE velocity of `x_t` (sigma_data units), here with classifier-free
  guidance.

One generator step (official `train_scm_ladd.py`, generator phase; [`scm_loss`] follows it line by line):

    x_t      = cos t x0 + sin t z
    dxt_dt   = sigma_d (F_T(x_t / sigma_d, t | null) + w (F_T(. | c) - F_T(. | null)))        no grad
    _, dF    = jvp(F_theta, (x_t / sigma_d, t), (cos t sin t dxt_dt / sigma_d, cos t sin t))     no grad
    F, logvar = F_theta(x_t / sigma_d, t, w);  F_minus = F.detach()                            with grad
    g        = -cos^2 t (sigma_d F_minus - dxt_dt) - r (cos t sin t x_t + sigma_d dF)
    g        = g / (||g|| + c)
    loss     = mean( exp(-logvar) / (sigma_d tan t) (F - F_minus - g)^2 + logvar )

`F - F_minus - g` is `F - stopgrad(F + g)`: the value of the residual is `-g`, its gradient is that of `F`. The
tangent `dF` (exact JVP, compiled JVP or finite difference) is computed in `training/tangent.py`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.trigflow_model import TrigFlowInputs, as_trigflow_model
from ..trigflow import SIGMA_DATA, add_trigflow_noise
from .batch import DistillationBatch
from .settings import Range, When, at_least, check_settings, greater_than, setting
from .tangent import DEFAULT_FINITE_DIFFERENCE_STEP, expand_like, velocity_tangent


TANGENT_NORMS = ("l2", "rms")
NULL_BRANCH_MASKS = ("conditional", "null")
JVP_METHODS = ("exact", "finite_difference")


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
    """

    loss: torch.Tensor
    velocity: torch.Tensor
    logs: dict


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
    if cond_mask is not None or null_mask is not None:  # both, as (batch, seq_len); a missing one attends all
        reference = cond_mask if cond_mask is not None else null_mask
        cond_mask = (torch.ones_like(reference[:1]) if cond_mask is None else cond_mask).expand(batch_size, -1)
        null_mask = (torch.ones_like(reference[:1]) if null_mask is None else null_mask).expand(batch_size, -1)

    t = _per_sample(t, batch_size, x_t_scaled)
    cond = TrigFlowInputs(x_t_scaled, t, cond_embeds, cond_mask, control=controlnet_cond)
    null = cond.replace(prompt_embeds=null_embeds, prompt_attention_mask=null_mask)
    (velocity,) = null.cat(cond).call(teacher)  # one batch of 2B rows: null, then cond
    velocity_null, velocity_cond = velocity.chunk(2)
    w = expand_like(_per_sample(guidance_scale, batch_size, velocity), velocity)
    return sigma_data * (velocity_null + w * (velocity_cond - velocity_null))


def pf_ode_tangents(x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, sigma_data: float = 0.5):
    """
    Tangents `(v_x, v_t) = (cos t sin t dxt_dt / sigma_d, cos t sin t)` of the student's inputs `(x_t / sigma_d, t)`.

    Along them, `jvp(F, (x_t / sigma_d, t), (v_x, v_t)) = cos t sin t dF/dt`, the total time derivative of `F` on the
    teacher's PF-ODE, pre-multiplied by `cos t sin t` (which keeps it finite near `t = pi/2`).
    Shapes: `x_t`, `dxt_dt` `(batch, C, H, W)`; `t` `(batch,)` radians. Returns `v_x` like `x_t`, `v_t` like `t`.
    """
    cos_sin = torch.cos(t) * torch.sin(t)
    return expand_like(cos_sin, dxt_dt) * dxt_dt / sigma_data, cos_sin


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

    `F_minus` is the student's `F` (no grad), `dF = cos t sin t dF/dt` from [`~tangent.velocity_tangent`], `dxt_dt` the
    teacher velocity (sigma_data units), `x_t` sigma_data-scaled, `t` `(batch,)` radians.

    With `r = 1`, `g = cos t * d/dt [x0_hat]` along the teacher's PF-ODE, `x0_hat = cos t x_t - sin t sigma_d F`: the
    consistency condition is `g = 0`, and moving `F` by `+g` moves `x0_hat` by `-sin t sigma_d g`, back towards its
    value at `t - dt`. `r < 1` scales the terms `cos t sin t (x_t + sigma_d dF/dt)` (tangent warm-up).
    """
    cos_t, sin_t = expand_like(torch.cos(t), x_t), expand_like(torch.sin(t), x_t)
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


def teacher_velocity(
    teacher, inputs: TrigFlowInputs, null_embeds: torch.Tensor, null_mask: torch.Tensor | None, config: SCMLossConfig
) -> torch.Tensor:
    """
    The teacher's PF-ODE velocity `dxt_dt` at `inputs` (no grad, in the dtype of `inputs.x_t_scaled`): the CFG
    velocity at `w = inputs.guidance` ([`teacher_cfg_velocity`]; the null branch under the mask that
    `config.null_branch_mask` picks), or with `config.guide_teacher=False` the conditional
    `sigma_d F_T(x_t / sigma_d, t | c)` (official for students without guidance embedder).
    """
    dtype = inputs.x_t_scaled.dtype
    if not config.guide_teacher:
        with torch.no_grad():
            return config.sigma_data * inputs.replace(guidance=None).call(as_trigflow_model(teacher))[0].to(dtype)
    if config.null_branch_mask == "conditional":
        null_mask = inputs.prompt_attention_mask
    cond = (inputs.prompt_embeds, inputs.prompt_attention_mask)
    dxt_dt = teacher_cfg_velocity(
        teacher, inputs.x_t_scaled, inputs.t, *cond, null_embeds, null_mask, inputs.guidance, config.sigma_data,
        controlnet_cond=inputs.control,
    )  # fmt: skip
    return dxt_dt.to(dtype)


def scm_loss(
    student,
    teacher,
    batch: DistillationBatch,
    z: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: torch.Tensor | float,
    step: int,
    config: SCMLossConfig | None = None,
    student_forward: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> SCMLossOutput:
    r"""
    The sCM consistency-distillation loss of one generator step (the module docstring's algorithm, line by line).

    Args:
        student ([`~models.TrigFlowModel`], possibly DDP / FSDP2-wrapped, or a [`SanaSprintTransformer2DModel`]):
            Trained model; with a guidance embedder it receives `w`, and with `config.adaptive_weight` it needs
            `logvar_head=True`.
        teacher ([`~models.TrigFlowModel`] or [`SanaSprintTransformer2DModel`]): Frozen TrigFlow teacher without
            guidance embedder.
        batch ([`DistillationBatch`]): `x0` (the latents, sigma_data units), the captions `c`, the empty prompt (read
            with `config.guide_teacher` only; its mask with `config.null_branch_mask="null"` only) and, for ControlNet
            distillation, the control latents: every model call gets them as a constant input.
        z (`torch.Tensor` of shape `(batch, C, H, W)`): Noise `~ N(0, sigma_d^2 I)` (sigma_data-scaled).
        t (`torch.Tensor` of shape `(batch,)`): TrigFlow time in radians, strictly inside `(0, pi/2)` (the weight
            `1 / (sigma_d tan t)` is infinite at 0 and the tangent degenerate at `pi/2`).
        guidance_scale (`torch.Tensor` of shape `(batch,)` or a float): `w` per sample, for the teacher's CFG and
            the student's guidance embedding.
        step (`int`): Generator-step counter for the tangent warm-up (count generator steps only, not D steps).
        config ([`SCMLossConfig`], *optional*): Defaults to `SCMLossConfig()`.
        student_forward (`Callable`, *optional*): `student_forward(inputs, **options) -> (F, logvar)`, the student's
            grad-enabled forward on the [`~models.TrigFlowInputs`] `inputs` (default: `inputs.call(student,
            **options)`). The generator step passes one that runs more rows in the same call (the LADD fake's).

    Returns:
        [`SCMLossOutput`]. `loss` is the batch mean of the per-sample mean over elements of
        `exp(-logvar) / (sigma_d tan t) (F - F_minus - g)^2 + logvar` (the official all-element mean: every sample
        has the same number of elements); without adaptive weight the `logvar` terms are dropped.
    """
    config = SCMLossConfig() if config is None else config
    student = as_trigflow_model(student)
    sigma_d = config.sigma_data
    dtype = torch.promote_types(batch.latents.dtype, torch.float32)
    x0, z, t = batch.latents.to(dtype), z.to(dtype), t.to(dtype)

    # 1. The noisy point and the teacher's (CFG) PF-ODE velocity there, no grad.
    x_t = add_trigflow_noise(x0, z, t)
    inputs = batch.model_inputs(x_t / sigma_d, t, _per_sample(guidance_scale, x0.shape[0], t))
    dxt_dt = teacher_velocity(teacher, inputs, batch.null_prompt_embeds, batch.null_prompt_attention_mask, config)

    # 2. The tangent dF = cos t sin t dF/dt along the PF-ODE, no grad, before the grad forward (training/tangent.py).
    v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, sigma_d)
    tangent_at = velocity_tangent(student, inputs, v_x, v_t, config)

    # 3. F and logvar with grad. F_minus is this forward's own value, so F - F_minus is exactly 0 (the JVP's
    #    math-SDPA primal may differ from the fused-kernel forward by float error, which must not enter the target).
    forward = student_forward or (lambda inputs, **options: inputs.call(student, **options))
    out = forward(inputs, return_logvar=config.adaptive_weight, detach_logvar_input=config.detach_logvar_embedding)
    F = out[0].to(dtype)
    F_minus = F.detach()
    dF = tangent_at(F_minus).to(dtype)

    # 4. The tangent g (warmed up, normalised) and the adaptively weighted loss.
    r = tangent_warmup(step, config.tangent_warmup_steps)
    g = scm_tangent(F_minus, dF, x_t, t, dxt_dt, r, sigma_d)
    g_norm_mean = _per_sample_l2(g).mean()
    g = normalize_tangent(g, config.tangent_norm, config.tangent_norm_eps)
    weight = 1 / (sigma_d * expand_like(torch.tan(t), F))
    logvar = expand_like(out[1].to(dtype).reshape(-1), F) if config.adaptive_weight else torch.zeros_like(weight)
    loss = (torch.exp(-logvar) * weight * (F - F_minus - g).square() + logvar).mean()

    dF_dt = dF / expand_like(torch.cos(t) * torch.sin(t), dF)
    logs = {"g_norm_mean": g_norm_mean, "dF_dt_abs_mean": dF_dt.abs().mean(), "tangent_warmup_r": r}
    if config.adaptive_weight:
        logs["logvar_mean"] = logvar.detach().mean()
    return SCMLossOutput(loss=loss, velocity=F, logs=logs)


__all__ = [
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
    "teacher_velocity",
]
