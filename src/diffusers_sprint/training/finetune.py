"""Helpers of the teacher fine-tune stage (`prepare_sprint_teacher` + `teacher_finetune_loss`, paper section 3.1).

- [`drop_captions`]: replace captions by the empty prompt at a rate (keeps classifier-free guidance alive).
- [`teacher_calibration_inputs`]: one forward's inputs of the flow teacher, in its own units, for the QK-norm gain
  calibration of `prepare_sprint_teacher(calibration_inputs=...)`.
- [`use_sana_pipeline_time_convention`]: store the dense time scale where diffusers' `SanaPipeline` reads it.
- [`teacher_finetune_step`]: the loss of one fine-tune micro-batch (caption dropout, time, noise, TrigFlow loss).
"""

import torch

from ..trigflow import add_trigflow_noise, flow_sample_from_trigflow, flow_time_from_trigflow, sample_noise
from .distill import DistillationBatch
from .teacher import flow_time_scale_of, sample_finetune_time, teacher_finetune_loss


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


__all__ = ["drop_captions", "teacher_calibration_inputs", "teacher_finetune_step", "use_sana_pipeline_time_convention"]
