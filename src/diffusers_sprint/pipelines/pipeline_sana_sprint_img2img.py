"""SanaSprintImg2ImgPipeline: one- and few-step image-to-image with a SANA-Sprint student, continuous strength."""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .image_input import image_batch_size, image_size, normalize_image_input
from .pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION, SanaSprintPipeline, _model_dtype


def _check_image_batch(num_images: int, num_prompts: int, num_images_per_prompt: int = 1) -> None:
    """diffusers' tiling rule: `num_images` images serve `num_prompts x num_images_per_prompt` generated images when
    they divide that batch."""
    batch_size = num_prompts * num_images_per_prompt
    if batch_size % num_images != 0:
        raise ValueError(
            f"`image` holds {num_images} image(s), which does not divide the batch of {batch_size} "
            "(prompts x num_images_per_prompt); pass 1 image, one per prompt, or a divisor of the batch."
        )


class SanaSprintImg2ImgPipeline(SanaSprintPipeline):
    r"""
    Image-to-image with a SANA-Sprint student in 1 to 4 steps, with a continuous `strength`.

    The call signature is that of diffusers' `SanaSprintImg2ImgPipeline`, and so are the components (folders written
    by diffusers' image-to-image or text-to-image pipelines, or by ours, load unchanged). Where diffusers keeps a
    whole-step share of the schedule (`int(num_inference_steps * strength)` steps, which makes 1-step image-to-image
    start from pure noise, i.e. ignore the image), this pipeline always runs `num_inference_steps` steps on the time
    grid squeezed by `strength` on the flow axis ([`~TrigFlowScheduler.strength_timesteps`]): the image is noised to
    `x_{t_0'} = cos(t_0') x0 + sin(t_0') sigma_data z` with flow time `s(t_0') = strength * s(t_0)`, so any strength
    in `(0, 1]` changes the image by a continuous, monotone amount at any step count. `strength = 1` is text-to-image
    from the same noise (up to `cos(t_0)`, 3.7e-6 at diffusers' `t_0 = 1.57080`); `strength -> 0` returns the image.
    diffusers' own schedules are reached exactly with `strength=1` and `timesteps` set to the part of the grid it
    keeps (docs/api.md).
    """

    def prepare_image(self, image: PipelineImageInput, height: int, width: int, device, dtype) -> torch.Tensor:
        """
        diffusers' preprocessing of `image` (any form of [`normalize_image_input`]): `(B, 3, height, width)` in
        `[-1, 1]`, resized when the image size differs (tensors bilinearly first, as diffusers).
        """
        image = normalize_image_input(image, "image")
        if isinstance(image, torch.Tensor):
            if image.shape[2] != height or image.shape[3] != width:
                image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
        image = self.image_processor.preprocess(image, height=height, width=width)
        return image.to(device=device, dtype=dtype)

    def encode_image(self, image: torch.Tensor, batch_size: int) -> torch.Tensor:
        """
        `x0 = vae.encode(image) * scaling_factor * sigma_data` (data units), repeated as in diffusers: `B` images are
        tiled `batch_size / B` times (`torch.cat([x0] * k)`), so `batch_size` must be a multiple of `B`.
        """
        _check_image_batch(image.shape[0], batch_size)
        # DC-AE's encoder can return a channels-last layout; a compiled transformer would recompile for its strides.
        latents = self.vae.encode(image).latent.float().contiguous()
        latents = latents * self.vae.config.scaling_factor * self.scheduler.config.sigma_data
        return torch.cat([latents] * (batch_size // image.shape[0]), dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        num_inference_steps: int = 2,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        max_timesteps: float = 1.57080,
        intermediate_timesteps: float | Sequence[float] | None = 1.3,
        guidance_scale: float | None = 4.5,
        image: PipelineImageInput = None,
        strength: float = 0.6,
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
        Edits images.

        Args:
            image (PIL image, `np.ndarray`, `torch.Tensor` or a list of them): the image(s) to start from: a PIL
                image of any mode (made RGB as the training data is), a numpy array `(H, W[, C])` / `(B, H, W, C)` of
                uint8 or float in `[0, 1]`, a float tensor `(C, H, W)` / `(B, C, H, W)` in `[-1, 1]` (or `[0, 1]`),
                with 1, 2, 3 or 4 channels (grey repeated, alpha composited onto white); see
                [`~pipelines.image_input.normalize_image_input`]. `B` images serve a batch of
                `prompts x num_images_per_prompt` when `B` divides it (diffusers' tiling).
            strength (`float` in `(0, 1]`, defaults to 0.6): the flow-time share of noise mixed into the image before
                sampling: `1` starts from pure noise, values near 0 keep the image.
            num_inference_steps (`int`, defaults to 2): model evaluations, whatever the strength.
            timesteps, max_timesteps, intermediate_timesteps: the grid before the strength map, as in
                [`SanaSprintPipeline.__call__`].
            height, width (`int`, *optional*): output size; default the image's own size, whose sides must then be
                multiples of the latent scale. Given, the image is resized to it.
            latents (`torch.Tensor`, *optional*): the unit-variance noise `z` mixed into the image, shape
                `(batch, C, H/f, W/f)` (as in our text-to-image pipeline; diffusers takes an already noised latent).

        The other arguments are those of [`SanaSprintPipeline.__call__`].

        Returns:
            `SanaPipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        self._require("vae", "transformer", "scheduler")
        image = normalize_image_input(image, "image")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"`strength` must be a float in (0, 1], got {strength!r}.")
        if height is None and width is None:
            height, width = image_size(image)
            if height % self.latent_scale or width % self.latent_scale:
                raise ValueError(
                    f"`image` is {height}x{width} pixels; its sides must be multiples of the latent scale "
                    f"{self.latent_scale}, or pass `height` and `width` to resize it."
                )
        elif height is None or width is None:
            raise ValueError("Pass both `height` and `width`, or neither (then the image's own size is used).")
        check_batch = partial(_check_image_batch, image_batch_size(image), num_images_per_prompt=num_images_per_prompt)
        device, total, (height, width), crop_to, prompt_embeds, prompt_attention_mask = self._prepare_call(
            prompt, height, width, num_inference_steps, timesteps, max_timesteps, intermediate_timesteps,
            guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds, prompt_attention_mask,
            output_type, clean_caption, use_resolution_binning, attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length, complex_human_instruction,
            check_batch=check_batch, strength=strength,
        )  # fmt: skip

        # Image latents x0 (data units), tiled over the batch, and x_{t_0'} = cos(t_0') x0 + sin(t_0') sigma_data z.
        pixels = self.prepare_image(image, height, width, device, _model_dtype(self.vae))
        image_latents = self.encode_image(pixels, total)
        if latents is None:
            noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=torch.float32)
        else:
            noise = latents.to(device=device, dtype=torch.float32)
        latents = self.scheduler.add_noise(image_latents, noise, self.scheduler.timesteps[0])
        latents = self._sample(
            latents, prompt_embeds, prompt_attention_mask, guidance_scale, generator, attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return self._output(latents, output_type, crop_to, return_dict)


__all__ = ["SanaSprintImg2ImgPipeline"]
