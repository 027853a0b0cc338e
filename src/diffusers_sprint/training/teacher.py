"""The teacher stage (paper sections 3.1, 4.1): from a flow-matching Sana teacher to a SANA-Sprint teacher and student.

- `prepare_sprint_teacher`: the flow teacher with QK-norm and dense time, weights copied; new norm gains start where
  they keep the function (what stays exact and what does not, derived and measured: docs/training/teacher.md).
- `teacher_finetune_loss`, `teacher_finetune_step`: the short TrigFlow fine-tune that repairs the rest, with
  `drop_captions`, `teacher_calibration_inputs` and `use_sana_pipeline_time_convention`.
- `build_student`: a copy with a guidance embedder grafted on (`init_guidance_embedder`): the output is exactly the
  teacher's, yet every guidance parameter gets gradient from the first step.
"""

import math
import warnings

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel

from ..models.transformer_sana_sprint import SanaSprintTransformer2DModel
from ..models.trigflow_model import as_trigflow_model
from ..trigflow import (
    add_trigflow_noise,
    append_dims,
    flow_input_scale,
    flow_sample_from_trigflow,
    flow_time_from_trigflow,
    sample_noise,
    sample_trigflow_time,
    trigflow_velocity_target,
)
from .distill import DistillationBatch


# AdaLayerNormSingle (no guidance) nests the time MLP under `emb.`; SanaCombinedTimestepGuidanceEmbeddings does not.
_TEACHER_TIME_PREFIX = "time_embed.emb.timestep_embedder."
_STUDENT_TIME_PREFIX = "time_embed.timestep_embedder."
_GUIDANCE_PREFIX = "time_embed.guidance_embedder."
_LOGVAR_PREFIX = "logvar_linear."


def flow_time_scale_of(model: SanaTransformer2DModel) -> float:
    """The factor a Sana transformer's time embedding multiplies the flow time `s in [0, 1]` by (1000 or 1)."""
    if isinstance(model, SanaSprintTransformer2DModel):
        return model.effective_flow_time_scale
    # Same rule as SanaSprintTransformer2DModel.effective_flow_time_scale for a plain diffusers model.
    return 1.0 if model.config.guidance_embeds else 1000.0 * float(model.config.timestep_scale)


def prepare_sprint_teacher(
    flow_model: SanaTransformer2DModel,
    qk_norm: str | None = "rms_norm_across_heads",
    dense_time: bool = True,
    *,
    dense_time_init: str = "copy",
    calibration_inputs: dict | None = None,
) -> SanaSprintTransformer2DModel:
    r"""
    Build the SANA-Sprint teacher (QK-norm, dense time, no guidance embedder) from a flow-matching Sana transformer.

    The result is a new [`SanaSprintTransformer2DModel`] on the same device and dtype as `flow_model`, with every
    weight copied; `flow_model` is not modified. Its state-dict keys are those of diffusers'
    `SanaTransformer2DModel(qk_norm=qk_norm, guidance_embeds=False)`.

    Args:
        flow_model (`SanaTransformer2DModel`):
            A flow-matching Sana transformer (diffusers' class or ours), with or without QK-norm, with `1000 s` or
            dense time. It must not have a guidance embedder. Merge LoRA adapters before.
        qk_norm (`str`, *optional*, defaults to `"rms_norm_across_heads"`):
            The QK-norm of the Sprint teacher (diffusers' `Attention(qk_norm=...)` names). A model that already has a
            QK-norm keeps it and must ask for the same one. New norms start with unit gains.
        dense_time (`bool`, defaults to `True`):
            Embed the flow time `s` itself (`config.flow_time_scale = 1`) instead of the model's current scale.
        dense_time_init (`str`, defaults to `"copy"`):
            How to initialise the time MLP when dense time is switched on. `"copy"`: its weights unchanged (as NVlabs
            Sana does). `"remap"`: move the weights of the teacher frequencies that exist in the dense embedding onto
            them and replace the others by their mean over `s in [0, 1]` (see `remap_time_embedding`).
        calibration_inputs (`dict`, *optional*):
            Keyword arguments of one forward of `flow_model` (`hidden_states`, `encoder_hidden_states`, `timestep` in
            the flow model's own units, `encoder_attention_mask`). When given, new RMS QK-norms of the softmax
            cross-attention get gains equal to the mean RMS of the original queries and (unmasked) keys, which keeps
            their average attention temperature. Self-attention gains stay 1 (a scalar gain cancels there).

    Returns:
        [`SanaSprintTransformer2DModel`] with `guidance_embeds=False`, `qk_norm=qk_norm` and `flow_time_scale` set.
    """
    config = _init_config(flow_model)
    if config.get("guidance_embeds"):
        raise ValueError("`flow_model` has a guidance embedder; it is already a student, not a flow-matching teacher.")
    source_qk_norm = config.get("qk_norm")
    if source_qk_norm is not None and source_qk_norm != qk_norm:
        raise ValueError(
            f"`flow_model` already uses qk_norm={source_qk_norm!r}; it cannot be converted to qk_norm={qk_norm!r}."
        )
    if dense_time_init not in ("copy", "remap"):
        raise ValueError(f"`dense_time_init` must be 'copy' or 'remap', got {dense_time_init!r}.")
    adds_qk_norm = source_qk_norm is None and qk_norm is not None
    if calibration_inputs is not None and adds_qk_norm and qk_norm != "rms_norm_across_heads":
        raise ValueError("`calibration_inputs` is supported for qk_norm='rms_norm_across_heads' only.")

    source_scale = flow_time_scale_of(flow_model)
    config.update(
        qk_norm=qk_norm,
        guidance_embeds=False,
        flow_time_scale=1.0 if dense_time else source_scale,
        logvar_head=False,
    )
    teacher = _new_like(flow_model, config)
    state = {key: value for key, value in flow_model.state_dict().items() if not key.startswith(_LOGVAR_PREFIX)}
    new_keys = set()
    if adds_qk_norm:
        new_keys = {key for key in teacher.state_dict() if ".norm_q." in key or ".norm_k." in key}
    _load_checked(teacher, state, allowed_missing=new_keys)

    if dense_time and source_scale != 1.0 and dense_time_init == "remap":
        remap_time_embedding(teacher.time_embed.emb.time_proj, teacher.time_embed.emb.timestep_embedder, source_scale)
    if calibration_inputs is not None and adds_qk_norm:
        _calibrate_cross_attention_norms(flow_model, teacher, calibration_inputs)
    return teacher.train(flow_model.training)


@torch.no_grad()
def remap_time_embedding(time_proj: Timesteps, embedder: TimestepEmbedding, source_scale: float) -> None:
    r"""
    Re-express a time MLP trained on `phi(source_scale * s)` as one that reads the dense features `phi(s)` (in place).

    With `source_scale = 10000^(m / h)` (1000, `h = 128`: `m = 96`) the teacher's frequency channels `k >= m` are the
    dense channels `k - m` exactly and move there; the others are replaced by their mean over `s ~ U[0, 1]`, folded
    into the bias (derivation: docs/training/teacher.md, section 1, "Dense time").
    """
    if not time_proj.flip_sin_to_cos or time_proj.downscale_freq_shift != 0:
        raise ValueError("Remapping expects Sana's time projection (flip_sin_to_cos=True, downscale_freq_shift=0).")
    half = time_proj.num_channels // 2
    shift_float = half * math.log(source_scale) / math.log(10000.0)
    shift = round(shift_float)
    if abs(shift_float - shift) > 1e-6 or not 0 <= shift <= half:
        raise ValueError(f"`source_scale`={source_scale} is not 10000^(m/{half}); use dense_time_init='copy'.")

    linear = embedder.linear_1
    weight = linear.weight.double()
    kept = torch.arange(shift, half, device=weight.device)
    dropped = torch.arange(0, shift, device=weight.device)
    new_weight = torch.zeros_like(weight)
    for offset in (0, half):  # cos channels, then sin channels
        new_weight[:, offset + kept - shift] = weight[:, offset + kept]

    # Mean over s ~ U[0, 1] of cos(f s) and sin(f s) for the dropped frequencies f = scale * source_scale * w_k.
    exponent = -math.log(10000.0) * dropped.double() / half
    frequency = time_proj.scale * source_scale * torch.exp(exponent)
    mean_cos = torch.sin(frequency) / frequency
    mean_sin = (1 - torch.cos(frequency)) / frequency
    bias_shift = weight[:, dropped] @ mean_cos + weight[:, half + dropped] @ mean_sin
    linear.weight.copy_(new_weight)
    linear.bias.add_(bias_shift.to(linear.bias.dtype))


DENSE_TIME_WARNING_SCALE = 10.0  # SANA-Sprint's dense time is 1; Sana's original convention is 1000


def build_student(
    teacher: SanaTransformer2DModel,
    guidance_embeds_scale: float = 0.1,
    logvar_head: bool = True,
    guidance_init_std: float = 0.02,
    *,
    guidance_embeds: bool = True,
    generator: torch.Generator | None = None,
) -> SanaSprintTransformer2DModel:
    r"""
    The SANA-Sprint student: a copy of the Sprint teacher with a guidance embedder (and a logvar head) grafted on.

    The student's config is the teacher's with `guidance_embeds=True` (diffusers'
    `SanaCombinedTimestepGuidanceEmbeddings`), the teacher's flow time scale made explicit, and `logvar_head`. All
    teacher weights are copied (the time MLP moves from `time_embed.emb.timestep_embedder` to
    `time_embed.timestep_embedder`; `time_embed.linear`, the 6x modulation, keeps its name). The teacher is not
    modified and shares no storage with the student. The guidance embedder gets `init_guidance_embedder`: the initial
    student output equals the teacher's for every guidance scale (up to float rounding), and every guidance parameter
    receives gradient on the first backward. The logvar head starts at zero (`logvar = 0`, unit adaptive weight); its
    weight gets gradient through its non-zero input.

    Args:
        teacher (`SanaTransformer2DModel`):
            The Sprint teacher (`prepare_sprint_teacher`), or any Sana transformer without guidance embedder.
        guidance_embeds_scale (`float`, defaults to `0.1`):
            The student embeds `guidance_embeds_scale * w` for a CFG scale `w`.
        logvar_head (`bool`, defaults to `True`):
            Add the adaptive-weight head `logvar_linear`.
        guidance_init_std (`float`, defaults to `0.02`):
            Standard deviation of the guidance MLP's initial weights (Sana's init for its time MLP). It sets how fast
            the guidance embedding departs from zero, not the initial output.
        guidance_embeds (`bool`, defaults to `True`):
            Graft the guidance embedder. `False` gives the paper's "w/o CFG embedding" ablation: an exact copy of the
            teacher (plus the logvar head) that can only learn the teacher at one CFG scale (train with a single
            `guidance_scales` entry; sample with `guidance_scale=None`); `guidance_embeds_scale` and
            `guidance_init_std` are then unused.
        generator (`torch.Generator`, *optional*):
            Random source of the guidance-embedder initialisation.
    """
    config = _init_config(teacher)
    if config.get("guidance_embeds"):
        raise ValueError("`teacher` already has a guidance embedder.")
    if flow_time_scale_of(teacher) > DENSE_TIME_WARNING_SCALE:
        warnings.warn(
            f"The teacher's time embedding sees {flow_time_scale_of(teacher):g} s (flow time s in [0, 1]): sCM "
            "distillation is unstable with such a time scale (its tangent carries dF/dt, which grows with it; the "
            "1-step error of tests/unit/training/test_distill.py rises instead of falling). Distil a dense-time "
            "teacher: `prepare_sprint_teacher` (examples/prepare_sana_sprint_teacher.py) or a teacher trained with "
            "timestep_scale=0.001.",
            UserWarning,
            stacklevel=2,
        )
    config.update(flow_time_scale=flow_time_scale_of(teacher), logvar_head=logvar_head)
    if guidance_embeds:
        config.update(guidance_embeds=True, guidance_embeds_scale=guidance_embeds_scale)
    student = _new_like(teacher, config)
    state = {}
    for key, value in teacher.state_dict().items():
        if guidance_embeds and key.startswith(_TEACHER_TIME_PREFIX):
            key = _STUDENT_TIME_PREFIX + key[len(_TEACHER_TIME_PREFIX) :]
        if key.startswith(_LOGVAR_PREFIX) and not logvar_head:
            continue
        state[key] = value
    grafted = {key for key in student.state_dict() if key.startswith((_GUIDANCE_PREFIX, _LOGVAR_PREFIX))}
    _load_checked(student, state, allowed_missing=grafted)
    if guidance_embeds:
        init_guidance_embedder(student.time_embed.guidance_embedder, std=guidance_init_std, generator=generator)
    return student.train(teacher.training)


@torch.no_grad()
def init_guidance_embedder(
    embedder: TimestepEmbedding, std: float = 0.02, generator: torch.Generator | None = None
) -> TimestepEmbedding:
    r"""
    Mirrored initialisation: the embedder outputs exactly zero for every input, yet all its parameters get gradient.

    Hidden units of `W2 silu(W1 p + b1) + b2` come in pairs with equal rows `W1[i] = W1[i']` and opposite output
    columns `W2[:, i'] = -W2[:, i]` (both `~ N(0, std^2)`; an odd width ends with a `(1, 1, -2)` triple), biases zero.
    A zero-initialised MLP instead only ever moves `b2` (why: docs/training/teacher.md, section 2).
    """
    linear_1, linear_2 = embedder.linear_1, embedder.linear_2
    hidden = linear_1.out_features
    if hidden < 2:
        raise ValueError("The mirrored initialisation needs at least 2 hidden units.")
    groups = hidden // 2
    group_of = torch.clamp(torch.arange(hidden) // 2, max=groups - 1)
    sign = torch.where(torch.arange(hidden) % 2 == 0, 1.0, -1.0)
    if hidden % 2:
        sign[-3:] = torch.tensor([1.0, 1.0, -2.0])
    rows = torch.randn(groups, linear_1.in_features, generator=generator) * std
    columns = torch.randn(linear_2.out_features, groups, generator=generator) * std
    linear_1.weight.copy_(rows[group_of])
    linear_2.weight.copy_(columns[:, group_of] * sign)
    linear_1.bias.zero_()
    linear_2.bias.zero_()
    return embedder


def sample_finetune_time(
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    Sana's flow-time sampling (logit-normal `s`, defaults `(0, 1)` as in Sana's pre-training) in TrigFlow time.

    `tan t = s / (1 - s)`, so `logit(s) = log tan t` and `t = atan(exp(logit_mean + logit_std n))`, `n ~ N(0, 1)`. It
    is `sample_trigflow_time` with `sigma_data = 1` (equivalently `p_mean = logit_mean + log(sigma_data)`).
    """
    return sample_trigflow_time(batch_size, logit_mean, logit_std, sigma_data=1.0, device=device, generator=generator)


def teacher_finetune_loss(
    model: SanaSprintTransformer2DModel,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    *,
    sigma_data: float = 0.5,
    weighting: str = "trigflow",
) -> torch.Tensor:
    r"""
    The TrigFlow flow-matching loss of the short teacher fine-tune after `prepare_sprint_teacher`.

    `x_t = cos t x0 + sin t z`; loss `= mean(lambda(t) (F(x_t / sigma_d, t) - F*)^2)` with
    `F* = (cos t z - sin t x0) / sigma_d`:

    - `weighting="trigflow"` (`lambda = 1`, default): the TrigFlow diffusion loss of sCM, flow matching weighted by
      `s^2 + (1 - s)^2 in [1/2, 1]`: the error of `sigma_d F`, which is what the sCM step consumes.
    - `weighting="flow"` (`lambda = (sin t + cos t)^2`): exactly the teacher's flow-matching loss `mean((v - v*)^2)`
      (derivation: docs/training/teacher.md, section 3).

    Args:
        model: a [`~models.TrigFlowModel`] (possibly DDP / FSDP2-wrapped) or a [`SanaSprintTransformer2DModel`]
            without guidance embedder: the Sprint teacher being fine-tuned.
        x0: data latents in sigma_data units (`vae_latent * scaling_factor * sigma_data`).
        z: noise `~ N(0, sigma_data^2 I)`, same shape as `x0`.
        t: TrigFlow times `(batch,)` in radians, e.g. from `sample_finetune_time`.
        encoder_hidden_states, encoder_attention_mask: text conditioning (drop captions to the null prompt at the
            pre-training rate upstream, so that classifier-free guidance keeps working).

    Returns:
        The scalar loss (fp32).
    """
    if weighting not in ("trigflow", "flow"):
        raise ValueError(f"`weighting` must be 'trigflow' or 'flow', got {weighting!r}.")
    x_t = add_trigflow_noise(x0, z, t)
    (prediction,) = as_trigflow_model(model)(x_t / sigma_data, t, encoder_hidden_states, encoder_attention_mask)
    target = trigflow_velocity_target(x0, z, t, sigma_data)
    squared_error = (prediction.float() - target.float()) ** 2
    if weighting == "flow":  # (sin t + cos t)^2 = 1 / (s^2 + (1 - s)^2)
        scale = append_dims(flow_input_scale(flow_time_from_trigflow(t.float())), x0.ndim)
        squared_error = squared_error / scale**2
    return squared_error.mean()


def drop_captions(
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    null_prompt_embeds: torch.Tensor,
    null_prompt_attention_mask: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    Replace each caption by the empty prompt with `probability` (independently per sample).

    Args:
        prompt_embeds (`(B, L, D)`), prompt_attention_mask (`(B, L)`): The captions.
        null_prompt_embeds (`(1, L, D)`), null_prompt_attention_mask (`(1, L)`): The empty prompt, same `L`.
        probability (`float`): Drop rate in `[0, 1]` (Sana pre-training: 0.1).
        generator (`torch.Generator`, *optional*): Random source (one uniform draw per sample).

    Returns:
        `(prompt_embeds, prompt_attention_mask, dropped)`, `dropped` a `(B,)` bool tensor.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"`probability` must be in [0, 1], got {probability}.")
    if null_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
        raise ValueError("The empty prompt must be encoded with the same length as the captions.")
    batch_size = prompt_embeds.shape[0]
    draw_device = generator.device if generator is not None else prompt_embeds.device
    dropped = (torch.rand(batch_size, generator=generator, device=draw_device) < probability).to(prompt_embeds.device)
    embeds = torch.where(dropped[:, None, None], null_prompt_embeds.to(prompt_embeds.dtype), prompt_embeds)
    mask = torch.where(
        dropped[:, None], null_prompt_attention_mask.to(prompt_attention_mask.dtype), prompt_attention_mask
    )
    return embeds, mask, dropped


@torch.no_grad()
def teacher_calibration_inputs(
    flow_model,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None = None,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> dict:
    r"""
    Keyword arguments of one `flow_model(...)` forward at the fine-tune's time distribution, in the flow model's own
    units (for `prepare_sprint_teacher(flow_model, calibration_inputs=...)`).

    `t ~ sample_finetune_time`, `x_t = cos t x0 + sin t z` (`z ~ N(0, sigma_data^2)`); the flow model sees
    `x_s = x_t / (sigma_data (sin t + cos t))` at timestep `s * flow_time_scale` with `s = sin t / (sin t + cos t)`
    (the Prop. 3.1 transform `trigflow_forward` applies).

    Args:
        flow_model: The flow-matching Sana transformer about to be converted.
        x0 (`(B, C, H, W)`): Data latents in sigma_data units.
        prompt_embeds (`(B, L, D)`), prompt_attention_mask (`(B, L)`, *optional*): Captions.
        sigma_data (`float`, defaults to 0.5).
        generator (`torch.Generator`, *optional*): Draws `t` then `z`.
    """
    t = sample_finetune_time(x0.shape[0], device=x0.device, generator=generator)
    z = sample_noise(x0, sigma_data, generator)
    s = flow_time_from_trigflow(t)
    x_s = flow_sample_from_trigflow(add_trigflow_noise(x0, z, t) / sigma_data, s)
    reference = next(flow_model.parameters())
    return {
        "hidden_states": x_s.to(reference.dtype),
        "encoder_hidden_states": prompt_embeds.to(reference.dtype),
        "encoder_attention_mask": prompt_attention_mask,
        "timestep": s * flow_time_scale_of(flow_model),
    }


def use_sana_pipeline_time_convention(model):
    r"""
    Store a teacher's flow time scale in diffusers' `timestep_scale` (in place; returns `model`).

    diffusers' `SanaPipeline` calls the transformer with `1000 s * config.timestep_scale`; our `flow_time_scale` is
    read only by `trigflow_forward`. A dense-time Sprint teacher saved with `flow_time_scale=1` would therefore be fed
    `1000 s` by `SanaPipeline` (wrong images, silently). With `flow_time_scale=None` and
    `timestep_scale = scale / 1000`, both `SanaPipeline` and `trigflow_forward` give the network `scale * s`; the
    weights and `trigflow_forward` are unchanged.
    """
    if model.config.guidance_embeds:
        raise ValueError("Only for teachers (no guidance embedder): a student's time scale is fixed to 1.")
    scale = flow_time_scale_of(model)
    model.register_to_config(flow_time_scale=None, timestep_scale=scale / 1000.0)
    if model.effective_flow_time_scale != scale:
        raise RuntimeError(f"Time scale {scale} is not representable as 1000 * timestep_scale.")
    return model


def teacher_finetune_step(
    model,
    batch: DistillationBatch,
    generator: torch.Generator | None = None,
    *,
    sigma_data: float = 0.5,
    caption_dropout_prob: float = 0.1,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    weighting: str = "trigflow",
) -> tuple[torch.Tensor, dict]:
    """
    One micro-batch of the teacher fine-tune: captions dropped to the empty prompt at `caption_dropout_prob`, `t`
    from [`sample_finetune_time`] (logit-normal flow time), `z ~ N(0, sigma_data^2)`, then [`teacher_finetune_loss`].

    `model` is called as a [`~models.TrigFlowModel`] (pass the prepared one). Returns `(loss, logs)`, `logs` holding
    the detached loss and the dropped fraction.
    """
    embeds, mask, dropped = drop_captions(
        batch.prompt_embeds,
        batch.prompt_attention_mask,
        batch.null_prompt_embeds,
        batch.null_prompt_attention_mask,
        caption_dropout_prob,
        generator,
    )
    latents = batch.latents
    t = sample_finetune_time(latents.shape[0], logit_mean, logit_std, device=latents.device, generator=generator)
    z = sample_noise(latents, sigma_data, generator)
    loss = teacher_finetune_loss(model, latents, z, t, embeds, mask, sigma_data=sigma_data, weighting=weighting)
    return loss, {"finetune_loss": loss.detach(), "dropped": dropped.float().mean()}


def _init_config(model: SanaTransformer2DModel) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def _new_like(model: SanaTransformer2DModel, config: dict) -> SanaSprintTransformer2DModel:
    reference = next(model.parameters())
    with torch.device(reference.device):
        new_model = SanaSprintTransformer2DModel.from_config(config)
    return new_model if new_model.dtype == reference.dtype else new_model.to(reference.dtype)


def _load_checked(model: torch.nn.Module, state: dict, allowed_missing: set) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Weights do not map onto the new model: missing {sorted(missing)}, unexpected "
            f"{sorted(result.unexpected_keys)} (merge or remove LoRA adapters first)."
        )


@torch.no_grad()
def _calibrate_cross_attention_norms(flow_model, teacher, calibration_inputs: dict) -> None:
    """Set each new cross-attention RMS-norm gain to the mean per-token RMS of the original queries / keys."""
    mask = calibration_inputs.get("encoder_attention_mask")
    records, hooks = {}, []
    for index, block in enumerate(flow_model.transformer_blocks):
        for name in ("to_q", "to_k"):

            def record(module, inputs, output, key=(index, name)):
                records[key] = output.float()

            hooks.append(getattr(block.attn2, name).register_forward_hook(record))
    try:
        flow_model(**calibration_inputs)
    finally:
        for hook in hooks:
            hook.remove()

    for index, block in enumerate(teacher.transformer_blocks):
        for name, norm in (("to_q", block.attn2.norm_q), ("to_k", block.attn2.norm_k)):
            if not isinstance(norm, RMSNorm) or norm.weight is None:
                continue
            rms = (records[(index, name)].pow(2).mean(-1) + norm.eps).sqrt()
            if name == "to_k" and mask is not None and mask.ndim == 2 and mask.shape == rms.shape:
                rms = rms[mask.bool()]
            norm.weight.fill_(rms.mean().item())


__all__ = [
    "build_student",
    "drop_captions",
    "flow_time_scale_of",
    "init_guidance_embedder",
    "prepare_sprint_teacher",
    "remap_time_embedding",
    "sample_finetune_time",
    "teacher_calibration_inputs",
    "teacher_finetune_loss",
    "teacher_finetune_step",
    "trigflow_velocity_target",
    "use_sana_pipeline_time_convention",
]
