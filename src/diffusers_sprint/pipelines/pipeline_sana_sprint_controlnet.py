"""SanaSprintControlNetPipeline: one- and few-step controlled text-to-image with a SANA-Sprint student + ControlNet."""

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderDC
from diffusers.models.controlnets.controlnet_sana import SanaControlNetModel
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from transformers import Gemma2PreTrainedModel, GemmaTokenizer, GemmaTokenizerFast

from ..models.transformer_sana_sprint import SanaSprintTransformer2DModel, unwrap_controlnet
from ..schedulers.scheduling_trigflow import TrigFlowScheduler
from .image_input import image_batch_size, normalize_image_input
from .pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION, SanaSprintPipeline


class SanaSprintControlNetPipeline(SanaSprintPipeline):
    r"""
    Controlled text-to-image with a SANA-Sprint student ([arXiv 2503.09641](https://huggingface.co/papers/2503.09641))
    and a diffusers [`~diffusers.SanaControlNetModel`] in 1 to 4 steps.

    Everything of [`SanaSprintPipeline`] (any step count, custom `timesteps` in radians, resolution binning at the
    model's base size, argument checks, LoRA) plus `control_image` and `controlnet_conditioning_scale`, as in
    diffusers' `SanaControlNetPipeline`: the control image is resized to the generated size, encoded by the VAE
    (times `scaling_factor`), and the ControlNet's block residuals are added to the transformer's blocks. Both networks
    see the same flow-space input; the flow<->TrigFlow transform is applied once, around the pair
    ([`SanaSprintTransformer2DModel.trigflow_forward`] with `controlnet=`). With `controlnet_conditioning_scale=0` the
    images are those of [`SanaSprintPipeline`]; with a flow-matching teacher (`guidance_embeds=False`,
    `guidance_scale=None`) and `TrigFlowScheduler(sampler="ode")` on the flow grid they are those of diffusers'
    `SanaControlNetPipeline` without CFG.

    Args:
        tokenizer, text_encoder: a Gemma(-like) tokenizer and text encoder.
        vae ([`~diffusers.AutoencoderDC`]): the deep-compression autoencoder (also encodes the control image).
        transformer ([`SanaSprintTransformer2DModel`]): the TrigFlow student.
        controlnet ([`~diffusers.SanaControlNetModel`]): the ControlNet; its time embedding receives the transformer's
            own timestep input (dense flow time `s` for Sprint students, `1000 s` for Sana teachers).
        scheduler ([`TrigFlowScheduler`]): a diffusers `SCMScheduler` is converted from its config.
    """

    model_cpu_offload_seq = "text_encoder->controlnet->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "control_image"]

    def __init__(
        self,
        tokenizer: GemmaTokenizer | GemmaTokenizerFast,
        text_encoder: Gemma2PreTrainedModel,
        vae: AutoencoderDC,
        transformer: SanaSprintTransformer2DModel,
        controlnet: SanaControlNetModel,
        scheduler: TrigFlowScheduler,
    ):
        try:
            if controlnet is not None:  # None: refused at call time, like the other components
                unwrap_controlnet(controlnet)
        except TypeError as error:
            raise TypeError(f"{error} Load it with `SanaControlNetModel.from_pretrained(path)`.") from None
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.register_modules(controlnet=controlnet)

    def check_control_inputs(self, control_image, controlnet_conditioning_scale, batch_size: int) -> None:
        """Raises a `ValueError`/`TypeError` naming the bad ControlNet argument."""
        scale = controlnet_conditioning_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"`controlnet_conditioning_scale` must be a float, got {scale!r}.")
        if not math.isfinite(scale):
            raise ValueError(f"`controlnet_conditioning_scale` must be finite, got {scale}.")
        num_images = image_batch_size(normalize_image_input(control_image, "control_image"))
        if num_images not in (1, batch_size):
            raise ValueError(
                f"`control_image` holds {num_images} images; pass 1 (shared by all prompts) or one per prompt "
                f"({batch_size})."
            )

    def prepare_control_latents(
        self,
        control_image: PipelineImageInput,
        height: int,
        width: int,
        num_images_per_prompt: int,
        total: int,
        device: torch.device,
    ) -> torch.Tensor:
        r"""
        The ControlNet's condition: `vae.encode(image).latent * scaling_factor`, one per generated image.

        `control_image` is any form of [`normalize_image_input`] (PIL of any mode, numpy arrays, tensors, lists), one
        image for all prompts or one per prompt; it is resized to `height x width`. Returns
        `(total, latent_channels, height / f, width / f)` in float32.
        """
        control_image = normalize_image_input(control_image, "control_image")
        image = self.image_processor.preprocess(control_image, height=height, width=width)
        repeat = total if image.shape[0] == 1 else num_images_per_prompt
        image = image.repeat_interleave(repeat, dim=0).to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(image).latent * self.vae.config.scaling_factor
        return latents.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        num_inference_steps: int = 2,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        max_timesteps: float = 1.57080,
        intermediate_timesteps: float | Sequence[float] | None = 1.3,
        guidance_scale: float | None = 4.5,
        control_image: PipelineImageInput = None,
        controlnet_conditioning_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        use_resolution_binning: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers signature)
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
    ) -> SanaPipelineOutput | tuple:
        r"""
        Generates images that follow `control_image`.

        Args:
            control_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them): the condition (e.g. an
                edge map), one for all prompts or one per prompt; resized to the generated size. A PIL image of any
                mode (made RGB as the training data is), a numpy array `(H, W[, C])` / `(B, H, W, C)` of uint8 or
                float in `[0, 1]`, a float tensor `(C, H, W)` / `(B, C, H, W)` in `[-1, 1]` (or `[0, 1]`), with 1, 2,
                3 or 4 channels (grey repeated, alpha composited onto white); see
                [`~pipelines.image_input.normalize_image_input`].
            controlnet_conditioning_scale (`float`, defaults to 1.0): multiplies the ControlNet residuals; `0` gives
                the images of [`SanaSprintPipeline`].
            callback_on_step_end_tensor_inputs (`list[str]`): among `latents`, `prompt_embeds` and `control_image`
                (the control latents).

        All other arguments are those of [`SanaSprintPipeline.__call__`].

        Returns:
            `SanaPipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        self._require("vae", "transformer", "controlnet", "scheduler")
        control_image = normalize_image_input(control_image, "control_image")  # once: the checks and encoding reuse it
        device, total, (height, width), crop_to, prompt_embeds, prompt_attention_mask = self._prepare_call(
            prompt, height, width, num_inference_steps, timesteps, max_timesteps, intermediate_timesteps,
            guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds, prompt_attention_mask,
            output_type, clean_caption, use_resolution_binning, attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length, complex_human_instruction,
            check_batch=partial(self.check_control_inputs, control_image, controlnet_conditioning_scale),
        )  # fmt: skip

        # Control latents (VAE latent x scaling_factor, diffusers' units) and noise x_{t_0} of std sigma_data.
        control_image = self.prepare_control_latents(
            control_image, height, width, num_images_per_prompt, total, device
        )
        latents = self.prepare_latents(
            total, self.transformer.config.in_channels, height, width, torch.float32, device, generator, latents
        )
        latents = latents * self.scheduler.config.sigma_data

        # Sampling: F of transformer + ControlNet at every time of the grid but the final 0; then decoding.
        controlnet_kwargs = dict(
            controlnet=self.controlnet,
            controlnet_cond=control_image,
            controlnet_conditioning_scale=float(controlnet_conditioning_scale),
        )
        latents = self._sample(
            latents, prompt_embeds, prompt_attention_mask, guidance_scale, generator, attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, controlnet_kwargs,
        )  # fmt: skip
        return self._output(latents, output_type, crop_to, return_dict)
