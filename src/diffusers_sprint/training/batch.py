"""One training batch of SANA-Sprint distillation: data latents, captions, the empty prompt, control latents."""

from dataclasses import dataclass

import torch

from ..models.trigflow_model import TrigFlowInputs


@dataclass
class DistillationBatch:
    """
    One training batch.

    Args:
        latents (`torch.Tensor` of shape `(batch, C, H, W)`): data `x0` in sigma_data units
            (`vae_latent * scaling_factor * sigma_data`).
        prompt_embeds (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`), prompt_attention_mask
            (`torch.Tensor` of shape `(batch, seq_len)`): the captions.
        null_prompt_embeds, null_prompt_attention_mask: the empty prompt, `(1 or batch, seq_len, ...)`, for the
            teacher's classifier-free guidance.
        control_latents (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): ControlNet distillation: the VAE
            latents of the control images times `scaling_factor` (unit scale, diffusers' `controlnet_cond`
            convention; not multiplied by sigma_data). They go to every model call of the step: the teacher's CFG
            velocity (both branches), the student's forward and JVP, the LADD fake and the discriminator's teacher
            features (real and fake). Teacher and student must then be [`~models.TrigFlowModel`]s with a ControlNet.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    null_prompt_embeds: torch.Tensor
    null_prompt_attention_mask: torch.Tensor
    control_latents: torch.Tensor | None = None

    def __post_init__(self):
        if self.control_latents is not None and self.control_latents.shape[0] != self.latents.shape[0]:
            raise ValueError(
                f"`control_latents` has {self.control_latents.shape[0]} rows for {self.latents.shape[0]} latents."
            )

    def model_inputs(
        self,
        x_t_scaled: torch.Tensor,
        t: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        rows: torch.Tensor | None = None,
    ) -> TrigFlowInputs:
        """A model call at `(x_t_scaled, t)` with the captions and control latents of this batch (of its `rows`)."""

        def pick(value):
            return value if rows is None or value is None else value[rows]

        embeds, mask, control = (
            pick(v) for v in (self.prompt_embeds, self.prompt_attention_mask, self.control_latents)
        )
        return TrigFlowInputs(x_t_scaled, t, embeds, mask, guidance, control)


__all__ = ["DistillationBatch"]
