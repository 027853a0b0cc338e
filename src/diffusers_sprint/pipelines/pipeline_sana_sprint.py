"""SanaSprintPipeline: one- and few-step text-to-image with a SANA-Sprint TrigFlow student."""

import inspect
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks import apply_group_offloading
from diffusers.hooks.group_offloading import GroupOffloadingType
from diffusers.models import AutoencoderDC
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.pipelines.sana.pipeline_sana_sprint import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers
from transformers import Gemma2PreTrainedModel, GemmaTokenizer, GemmaTokenizerFast

from ..lora_checks import check_lora_state_dict, lora_source
from ..models.modeling_utils import unwrap_model
from ..models.transformer_sana_sprint import SanaSprintTransformer2DModel
from ..schedulers.scheduling_trigflow import TrigFlowScheduler
from .resolution_bins import aspect_ratio_bins
from .stock_layout import stock_layout_blockers, stock_scheduler, stock_transformer, to_our_entries


logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Sana's prompt-enhancing instruction, the default of diffusers' pipeline: taken from its signature, not re-typed.
DEFAULT_COMPLEX_HUMAN_INSTRUCTION = (
    inspect.signature(DiffusersSanaSprintPipeline.__call__).parameters["complex_human_instruction"].default
)


def _group_offload_device(module: torch.nn.Module) -> torch.device | None:
    """The onload device of a diffusers group-offloading hook on `module` or a submodule, else None."""
    # The same search as diffusers' `_get_group_onload_device`, over `_modules` dicts instead of `module.modules()`.
    stack = [module]
    while stack:
        current = stack.pop()
        attributes = current.__dict__
        registry = attributes.get("_diffusers_hook")
        if registry is not None:
            hook = registry.get_hook("group_offloading")
            if hook is not None:
                return hook.config.onload_device
        stack.extend(attributes["_modules"].values())
    return None


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    """
    `ModelMixin.dtype` (a layerwise-casting hook's compute dtype, else the first floating parameter's dtype outside
    `_keep_in_fp32_modules`), with the hook search over `_modules` dicts instead of `named_modules()`.
    """
    stack = [module]
    while stack:
        current = stack.pop()
        registry = current.__dict__.get("_diffusers_hook")
        if registry is not None:
            hook = registry.get_hook("layerwise_casting")
            if hook is not None:
                return hook.compute_dtype
        stack.extend(current.__dict__["_modules"].values())
    keep_in_fp32 = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, parameter in module.named_parameters():
        if parameter.is_floating_point() and not any(m in name for m in keep_in_fp32):
            return parameter.dtype
    return module.dtype


def _resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs: list[str]) -> list[str]:
    """The tensors a callback receives: a `PipelineCallback` names its own (diffusers' rule)."""
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return callback_on_step_end.tensor_inputs
    return callback_on_step_end_tensor_inputs


def _checked_callback_outputs(outputs, tensors: dict, allowed: list[str], step: int) -> dict:
    """
    The return value of `callback_on_step_end` at `step`: `None` or a dict of tensors among `allowed`, each of the
    shape of the tensor it replaces (`tensors[name]`); raises a `TypeError`/`ValueError` saying what it returned.
    """
    if outputs is None:
        return {}
    where = f"`callback_on_step_end` returned at step {step}"
    if not isinstance(outputs, dict):
        raise TypeError(f"{where} a {type(outputs).__name__} ({outputs!r:.80}); it must return a dict of tensors.")
    for name, value in outputs.items():
        if name not in allowed:
            raise ValueError(f"{where} the key {name!r}; it may return tensors among {allowed}.")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where} {name!r} as a {type(value).__name__}; it must be a torch.Tensor.")
        expected = tensors[name].shape
        if value.shape != expected:
            raise ValueError(
                f"{where} {name!r} of shape {tuple(value.shape)}; it must keep the shape {tuple(expected)}."
            )
    return outputs


class SanaSprintPipeline(DiffusersSanaSprintPipeline):
    r"""
    Text-to-image with a SANA-Sprint student ([arXiv 2503.09641](https://huggingface.co/papers/2503.09641)) in 1 to
    4 steps.

    A drop-in for diffusers' `SanaSprintPipeline` (same components, same call signature, same images on the same
    weights, seed and timesteps) that also runs any number of steps with default arguments, takes custom
    `timesteps` in radians, bins resolutions at the model's own base size, and validates its arguments. Prompt
    encoding is inherited from diffusers; LoRA loading comes from diffusers' `SanaLoraLoaderMixin`.

    Args:
        tokenizer, text_encoder: a Gemma(-like) tokenizer and text encoder.
        vae ([`~diffusers.AutoencoderDC`]): the deep-compression autoencoder.
        transformer ([`SanaSprintTransformer2DModel`]): the TrigFlow student.
        scheduler ([`TrigFlowScheduler`]): a diffusers `SCMScheduler` is converted from its config.

    Any component may be `None` (e.g. `transformer=None, vae=None` to only run `encode_prompt`).
    """

    # The components in registration order (diffusers' `components` order), for `_execution_device`.
    _module_names = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")

    def __init__(
        self,
        tokenizer: GemmaTokenizer | GemmaTokenizerFast,
        text_encoder: Gemma2PreTrainedModel,
        vae: AutoencoderDC,
        transformer: SanaSprintTransformer2DModel,
        scheduler: TrigFlowScheduler,
    ):
        if transformer is not None and not isinstance(unwrap_model(transformer), SanaSprintTransformer2DModel):
            raise TypeError(
                f"`transformer` must be a SanaSprintTransformer2DModel (or None), got {type(transformer).__name__}; "
                "load it with `SanaSprintTransformer2DModel.from_pretrained(path, subfolder='transformer')`."
            )
        if scheduler is not None and not isinstance(scheduler, TrigFlowScheduler):
            scheduler = TrigFlowScheduler.from_config(scheduler.config)
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """
        diffusers' `extract_init_dict`, with the stock `model_index.json` entries of the transformer
        (`SanaTransformer2DModel`) and scheduler (`SCMScheduler`) mapped to [`SanaSprintTransformer2DModel`] and
        [`TrigFlowScheduler`]: `from_pretrained` then loads every component through diffusers' own loader (dtype dicts,
        variants, `device_map`, `low_cpu_mem_usage`), from folders written by diffusers or by us.
        """
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        return to_our_entries(init_dict), unused_kwargs, hidden_dict

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """
        diffusers' `lora_state_dict` (the state dict `load_lora_weights` loads), checked: a file without LoRA weights,
        or with a `lora_A` whose `lora_B` is missing (or the reverse), raises a `ValueError` naming the file and the
        missing keys instead of peft's `IndexError`.
        """
        loaded = super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        state_dict = loaded[0] if kwargs.get("return_lora_metadata") else loaded
        source = lora_source(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"), kwargs.get("subfolder"))
        check_lora_state_dict(state_dict, source, require_weights=True)
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, stock_diffusers_layout: bool = True, **kwargs):
        r"""
        diffusers' `save_pretrained`, written in the stock-diffusers layout by default: `model_index.json` names
        diffusers' `SanaTransformer2DModel` and `SCMScheduler`, the transformer folder holds diffusers' config and
        weights without the training-only logvar head, so `diffusers.SanaSprintPipeline.from_pretrained` loads it and
        gives the same images. Our pipelines load it unchanged.

        Components stock diffusers cannot sample the same way (no guidance embedder, a flow-time scale other than 1,
        the ODE sampler, unfused PEFT adapters) keep our class names, with a logged warning; so does
        `stock_diffusers_layout=False` (a checkpoint that keeps everything, e.g. the logvar head).
        """
        blockers = stock_layout_blockers(unwrap_model(self.transformer), self.scheduler)
        if not stock_diffusers_layout or blockers:
            if stock_diffusers_layout:
                logger.warning(
                    "Saving with diffusers_sprint class names (stock diffusers could not load this pipeline): "
                    + "; ".join(blockers)
                    + "."
                )
            return super().save_pretrained(save_directory, *args, **kwargs)
        transformer, scheduler = self.transformer, self.scheduler
        released = {}
        if transformer is not None:
            released["transformer"] = stock_transformer(unwrap_model(transformer))
        if scheduler is not None:
            released["scheduler"] = stock_scheduler(scheduler)
        self.register_modules(**released)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.register_modules(transformer=transformer, scheduler=scheduler)

    def _binned_size(self, height: int, width: int, latents, use_resolution_binning: bool) -> tuple[int, int]:
        """`(height, width)` moved to the nearest resolution bin when binning; `latents` must already have it."""
        if not use_resolution_binning:
            return height, width
        binned = self.image_processor.classify_height_width_bin(height, width, self.resolution_bins())
        if latents is not None and binned != (height, width):
            raise ValueError(
                f"`latents` were given for {height}x{width} but resolution binning generates at "
                f"{binned[0]}x{binned[1]}; pass `use_resolution_binning=False` or latents of the binned size."
            )
        return binned

    @property
    def _execution_device(self) -> torch.device:
        r"""
        diffusers' `_execution_device`: the onload device of group offloading, else the execution device of accelerate
        hooks (model / sequential CPU offload), else `self.device`. Same search, a few times cheaper: it runs on
        every call and was the largest cost outside the models at one step.
        """
        modules = [(name, getattr(self, name, None)) for name in self._module_names]
        modules = [(name, module) for name, module in modules if isinstance(module, torch.nn.Module)]
        for _, module in modules:
            device = _group_offload_device(module)
            if device is not None:
                return device
        for name, module in modules:
            if name in self._exclude_from_cpu_offload:
                continue
            if not hasattr(module, "_hf_hook"):
                return self._device_without_group_offloading(modules)
            for submodule in module.modules():
                hook = getattr(submodule, "_hf_hook", None)
                if hook is not None and getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
        return self._device_without_group_offloading(modules)

    # diffusers' `AutoencoderDC` names no `_group_offload_block_modules` (its `AutoencoderKL` does): block-level group
    # offloading then puts the whole VAE in one group hooked on `forward`, which pipelines never call (they call
    # `encode` / `decode`), so its weights are never onloaded: a device mismatch on a GPU, garbage with
    # `offload_to_disk_path` (diffusers #12319). These children are its blocks instead.
    _vae_group_offload_blocks = ["encoder", "decoder"]

    def enable_group_offload(self, onload_device: torch.device, *args, exclude_modules=None, **kwargs) -> None:
        r"""
        diffusers' [`~DiffusionPipeline.enable_group_offload`] (same arguments), with two fixes:

        - a block-level offloaded DC-AE is split into its encoder and decoder (`_vae_group_offload_blocks`), so that
          `encode` / `decode` onload them;
        - with `offload_to_disk_path`, each component writes to its own subfolder (`<path>/<component name>`):
          diffusers names a group's file after its module path only, so the transformer's and a ControlNet's
          `transformer_blocks` would share files and one would run on the other's weights.
        """
        bound = inspect.signature(DiffusersSanaSprintPipeline.enable_group_offload).bind(
            self, onload_device, *args, **kwargs
        )
        bound.apply_defaults()
        options = {key: value for key, value in bound.arguments.items() if key not in ("self", "exclude_modules")}
        excluded = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules or [])
        block_level = GroupOffloadingType(options["offload_type"]) == GroupOffloadingType.BLOCK_LEVEL
        disk = options["offload_to_disk_path"]
        for name, component in self.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            if name in excluded:
                component.to(onload_device)
                continue
            component_options = dict(options, offload_to_disk_path=None if disk is None else os.path.join(disk, name))
            if block_level and isinstance(component, AutoencoderDC):
                if getattr(component, "_group_offload_block_modules", None) is None:
                    component_options["block_modules"] = self._vae_group_offload_blocks
            if hasattr(component, "enable_group_offload"):
                component.enable_group_offload(**component_options)
            else:
                apply_group_offloading(module=component, **component_options)

    @staticmethod
    def _device_without_group_offloading(modules) -> torch.device:
        """diffusers' `DiffusionPipeline.device` once no group offloading is known to be on: the first non-CPU,
        non-meta component device in diffusers' (sorted) order, else the first one, from each first parameter."""
        devices = []
        for _, module in sorted(modules, key=lambda item: item[0]):
            tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
            if tensor is not None:
                devices.append(tensor.device)
        for device in devices:
            if device.type not in ("cpu", "meta"):
                return device
        return devices[0] if devices else torch.device("cpu")

    def _get_gemma_prompt_embeds(
        self,
        prompt: str | list[str],
        device: torch.device,
        dtype: torch.dtype,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
    ):
        r"""
        diffusers' prompt encoding (same tokens, same selection), with the text encoder run only up to the longest
        prompt of the batch instead of the full padded length (`max_sequence_length`, plus the instruction).

        With right padding, a text encoder that respects its attention mask (Gemma's causal attention does) gives
        the same hidden states at real tokens whether or not trailing padding follows; padded positions are masked
        in the transformer's cross-attention, so they are returned as zeros. Same images, a fraction of the cost.
        """
        prompt = [prompt] if isinstance(prompt, str) else prompt
        self.tokenizer.padding_side = "right"
        prompt = self._text_preprocessing(prompt, clean_caption=clean_caption)
        max_length = max_sequence_length
        if complex_human_instruction:
            instruction = "\n".join(complex_human_instruction)
            prompt = [instruction + p for p in prompt]
            max_length = len(self.tokenizer.encode(instruction)) + max_sequence_length - 2
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        attention_mask = tokens.attention_mask.to(device)
        length = int(attention_mask.sum(dim=1).max())
        hidden = self.text_encoder(tokens.input_ids[:, :length].to(device), attention_mask=attention_mask[:, :length])[
            0
        ]
        prompt_embeds = hidden.new_zeros(*tokens.input_ids.shape, hidden.shape[-1])
        prompt_embeds[:, :length] = hidden
        return prompt_embeds.to(dtype=dtype, device=device), attention_mask

    def _require(self, *names: str) -> None:
        missing = [name for name in names if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"This pipeline was built without {', '.join(f'`{name}`' for name in missing)}, which generating "
                "images needs; pass them to the constructor or `from_pretrained`."
            )

    def encode_prompt(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
        lora_scale: float | None = None,
    ):
        r"""
        diffusers' `encode_prompt` (same arguments, same `(prompt_embeds, prompt_attention_mask)`: the first token and
        the last `max_sequence_length - 1` positions), with two differences:

        - the attention mask is repeated like the embeddings: diffusers repeats the embeddings per prompt (`p0 p0 p1
          p1`) but tiles the mask (`m0 m1 m0 m1`), so with `num_images_per_prompt > 1` and prompts of different
          lengths some images attend with another prompt's padding mask;
        - the position selection is skipped when it is the identity (no instruction), instead of a 300-index gather.
        """
        if device is None:
            device = self._execution_device
        dtype = self.text_encoder.dtype if self.text_encoder is not None else None
        if lora_scale is not None:
            self._lora_scale = lora_scale
            if self.text_encoder is not None and USE_PEFT_BACKEND:
                scale_lora_layers(self.text_encoder, lora_scale)
        if getattr(self, "tokenizer", None) is not None:
            self.tokenizer.padding_side = "right"

        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._get_gemma_prompt_embeds(
                prompt=prompt,
                device=device,
                dtype=dtype,
                clean_caption=clean_caption,
                max_sequence_length=max_sequence_length,
                complex_human_instruction=complex_human_instruction,
            )
            # Sana (section 3.1): keep the first token and the last `max_sequence_length - 1` positions.
            if prompt_embeds.shape[1] != max_sequence_length:
                select_index = [0] + list(range(-max_sequence_length + 1, 0))
                prompt_embeds = prompt_embeds[:, select_index]
                prompt_attention_mask = prompt_attention_mask[:, select_index]

        if num_images_per_prompt != 1:
            prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        if self.text_encoder is not None and USE_PEFT_BACKEND:
            unscale_lora_layers(self.text_encoder, lora_scale)  # back to the adapters' own scale
        return prompt_embeds, prompt_attention_mask

    @property
    def latent_scale(self) -> int:
        """Pixels per latent token along each side: the VAE's downsampling times the transformer's patch size."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale=None,
        num_images_per_prompt=1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        prompt_attention_mask=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=300,
        callback_on_step_end=None,
        attention_kwargs=None,
        complex_human_instruction=None,
    ):
        """Raises a `ValueError`/`TypeError` naming the first bad argument."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
            if value % self.latent_scale != 0:
                raise ValueError(
                    f"`{name}` must be divisible by {self.latent_scale} (VAE scale {self.vae_scale_factor} x patch "
                    f"size {self.transformer.config.patch_size}), got {value}."
                )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        has_guidance_embedder = self.transformer.config.guidance_embeds
        if has_guidance_embedder and guidance_scale is None:
            raise ValueError("`guidance_scale` is required: the transformer has a guidance embedder.")
        if not has_guidance_embedder and guidance_scale is not None:
            raise ValueError(
                "`guidance_scale` must be None: the transformer has no guidance embedder (`guidance_embeds=False`)."
            )
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
                raise TypeError(f"`guidance_scale` must be a float >= 0, got {guidance_scale!r}.")
            if not math.isfinite(guidance_scale) or guidance_scale < 0:
                raise ValueError(f"`guidance_scale` must be a finite float >= 0, got {guidance_scale}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise TypeError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(f"`max_sequence_length` must be a positive int, got {max_sequence_length!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                "`callback_on_step_end` must be a callable `(pipe, step, timestep, callback_kwargs) -> dict`, a "
                f"`PipelineCallback` or `MultiPipelineCallbacks`, got {type(callback_on_step_end).__name__}."
            )
        if callback_on_step_end_tensor_inputs is not None or callback_on_step_end is not None:
            names = callback_on_step_end_tensor_inputs
            if not isinstance(names, (list, tuple)) or not all(isinstance(k, str) for k in names):
                raise TypeError(
                    f"`callback_on_step_end_tensor_inputs` must be a list of names among "
                    f"{self._callback_tensor_inputs}, got {names!r}."
                )
            unknown = [k for k in names if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, "
                    f"got {unknown}."
                )
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise TypeError(f"`attention_kwargs` must be a dict or None, got {type(attention_kwargs).__name__}.")
        if complex_human_instruction is not None and not (
            isinstance(complex_human_instruction, (list, tuple))
            and all(isinstance(line, str) for line in complex_human_instruction)
        ):
            raise TypeError(
                "`complex_human_instruction` must be a list of str (the instruction's lines) or None, got "
                f"{type(complex_human_instruction).__name__}."
            )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass one of `prompt` or `prompt_embeds`.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            kinds = sorted({type(p).__name__ for p in prompt}) if isinstance(prompt, list) else []
            raise TypeError(
                f"`prompt` must be a str or a list of str, got {type(prompt).__name__}"
                + (f" holding {', '.join(kinds)}" if kinds else "")
                + "."
            )
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("`prompt` must not be an empty list.")
        if prompt_embeds is not None:
            if prompt_attention_mask is None:
                raise ValueError("`prompt_attention_mask` is required with `prompt_embeds`.")
            for name, value in (("prompt_embeds", prompt_embeds), ("prompt_attention_mask", prompt_attention_mask)):
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
            if prompt_embeds.ndim != 3:
                raise ValueError(
                    f"`prompt_embeds` must be (batch, seq_len, dim), got shape {tuple(prompt_embeds.shape)}."
                )
            if tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:2]):
                raise ValueError(
                    f"`prompt_attention_mask` must have shape {tuple(prompt_embeds.shape[:2])} to match "
                    f"`prompt_embeds`, got {tuple(prompt_attention_mask.shape)}."
                )

        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        total = batch_size * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                "`generator` must be a torch.Generator, a list of them (one per image) or None, got "
                f"{type(generator).__name__}"
                + (f" of {sorted({type(g).__name__ for g in generator})}" if isinstance(generator, list) else "")
                + "."
            )
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but batch size x num_images_per_prompt = "
                f"{total}; pass one generator per image or a single one."
            )
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
                raise TypeError(
                    "`latents` must be a floating-point torch.Tensor, got "
                    + (f"dtype {latents.dtype}" if isinstance(latents, torch.Tensor) else type(latents).__name__)
                    + "."
                )
            expected = (
                total,
                self.transformer.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}.")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("`latents` hold non-finite values (NaN or inf).")

    def resolution_bins(self) -> dict[str, list[float]]:
        """The aspect-ratio bins at this model's base resolution (`sample_size x VAE scale` pixels)."""
        base_size = self.transformer.config.sample_size * self.vae_scale_factor
        return aspect_ratio_bins(base_size, self.latent_scale)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        num_inference_steps: int = 2,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        max_timesteps: float = 1.57080,
        intermediate_timesteps: float | Sequence[float] | None = 1.3,
        guidance_scale: float | None = 4.5,
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
        Generates images.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds` + `prompt_attention_mask`.
            num_inference_steps (`int`, defaults to 2): any number >= 1. Ignored when `timesteps` is given.
            timesteps (sequence of `float`, *optional*): custom descending times in radians within `[0, pi/2]`,
                with or without the final 0 (e.g. the paper's 4-step `[1.5683, 1.3, 1.1, 0.6]`).
            max_timesteps (`float`, defaults to 1.57080): the first time (radians).
            intermediate_timesteps (`float` or sequence, defaults to 1.3): a float is the middle time of 2-step
                sampling (ignored for other step counts); a sequence gives all `num_inference_steps - 1` inner times.
                Without one, 3+ steps are spaced evenly in `t`.
            guidance_scale (`float`, defaults to 4.5): the embedded CFG scale the student was distilled with; `None`
                for models without a guidance embedder.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            height, width (`int`, *optional*): output size in pixels, multiples of the latent scale; default
                `sample_size x vae_scale_factor`.
            eta (`float`): accepted for signature compatibility; the TrigFlow samplers do not use it.
            generator (`torch.Generator` or list): one, or one per image.
            latents (`torch.Tensor`, *optional*): initial unit-variance noise of shape `(batch, C, H/f, W/f)`.
            prompt_embeds, prompt_attention_mask (`torch.Tensor`, *optional*): precomputed text conditioning.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a `SanaPipelineOutput` instead of a tuple.
            clean_caption (`bool`, defaults to `False`): diffusers' caption cleaning (needs bs4 and ftfy).
            use_resolution_binning (`bool`, defaults to `True`): generate at the nearest aspect-ratio bin of the
                model's base resolution, then resize and crop to `height x width`.
            attention_kwargs (`dict`, *optional*): passed to attention processors; `{"scale": s}` scales LoRA.
            callback_on_step_end: called as `callback(pipe, step, timestep, callback_kwargs)` after each step.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed to the callback (`latents`,
                `prompt_embeds`).
            max_sequence_length (`int`, defaults to 300): text tokens kept.
            complex_human_instruction (`list[str]`, *optional*): Sana's prompt-enhancing instruction prepended to each
                prompt (diffusers' default); `None` encodes the prompt alone.

        Returns:
            `SanaPipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        self._require("vae", "transformer", "scheduler")
        device, total, (height, width), crop_to, prompt_embeds, prompt_attention_mask = self._prepare_call(
            prompt, height, width, num_inference_steps, timesteps, max_timesteps, intermediate_timesteps,
            guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds, prompt_attention_mask,
            output_type, clean_caption, use_resolution_binning, attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length, complex_human_instruction,
        )  # fmt: skip

        # Noise x_{t_0} with standard deviation sigma_data.
        latents = self.prepare_latents(
            total, self.transformer.config.in_channels, height, width, torch.float32, device, generator, latents
        )
        latents = latents * self.scheduler.config.sigma_data
        latents = self._sample(
            latents, prompt_embeds, prompt_attention_mask, guidance_scale, generator, attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return self._output(latents, output_type, crop_to, return_dict)

    def _prepare_call(
        self,
        prompt,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        timesteps,
        max_timesteps: float,
        intermediate_timesteps,
        guidance_scale: float | None,
        num_images_per_prompt: int,
        generator,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        output_type: str,
        clean_caption: bool,
        use_resolution_binning: bool,
        attention_kwargs: dict | None,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        max_sequence_length: int,
        complex_human_instruction: list[str] | None,
        check_batch: Callable[[int], None] | None = None,
        **scheduler_kwargs,
    ):
        r"""
        The part of `__call__` every SANA-Sprint pipeline shares: the default size, `check_inputs` (then
        `check_batch(batch_size)` for a subclass's own arguments), resolution binning, the scheduler's grid
        (`scheduler_kwargs` go to `set_timesteps`) and the text conditioning.

        Returns `(device, total, (height, width), crop_to, prompt_embeds, prompt_attention_mask)`: `total` images
        (prompts x `num_images_per_prompt`) are generated at the binned `height x width`; `crop_to` is the size asked
        for when binning (for [`_output`]), else `None`.
        """
        default_size = self.transformer.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=_resolve_callback_inputs(
                callback_on_step_end, callback_on_step_end_tensor_inputs
            ),
            max_sequence_length=max_sequence_length,
            callback_on_step_end=callback_on_step_end,
            attention_kwargs=attention_kwargs,
            complex_human_instruction=complex_human_instruction,
        )
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if check_batch is not None:
            check_batch(batch_size)
        crop_to = (height, width) if use_resolution_binning else None
        height, width = self._binned_size(height, width, latents, use_resolution_binning)

        device = self._execution_device
        self.scheduler.set_timesteps(
            num_inference_steps,
            timesteps=timesteps,
            device=device,
            max_timesteps=max_timesteps,
            intermediate_timesteps=intermediate_timesteps,
            **scheduler_kwargs,
        )
        self.scheduler.set_begin_index(0)
        self._guidance_scale = guidance_scale  # the per-call state the properties and callbacks read
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        prompt_embeds, prompt_attention_mask = self._encode_text(
            prompt, num_images_per_prompt, device, prompt_embeds, prompt_attention_mask, attention_kwargs,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction,
        )  # fmt: skip
        total = batch_size * num_images_per_prompt
        return device, total, (height, width), crop_to, prompt_embeds, prompt_attention_mask

    def _output(self, latents: torch.Tensor, output_type: str, crop_to: tuple[int, int] | None, return_dict: bool):
        """The end of every `__call__`: [`_decode`] the final `x0_hat` (data units), offload, wrap the images."""
        image = self._decode(latents, output_type, crop_to)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return SanaPipelineOutput(images=image)

    def _encode_text(
        self,
        prompt,
        num_images_per_prompt: int,
        device,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        attention_kwargs: dict | None,
        **encode_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_prompt` (LoRA scale from `attention_kwargs`), then the padding columns masked in every row cut off:
        they change nothing (their attention weight underflows to exactly 0)."""
        lora_scale = attention_kwargs.get("scale") if attention_kwargs is not None else None
        prompt_embeds, prompt_attention_mask = self.encode_prompt(
            prompt,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            lora_scale=lora_scale,
            **encode_kwargs,
        )
        used_columns = int(prompt_attention_mask.any(dim=0).nonzero().max()) + 1
        return prompt_embeds[:, :used_columns], prompt_attention_mask[:, :used_columns]

    def _sample(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        guidance_scale: float | None,
        generator,
        attention_kwargs: dict | None,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        controlnet_kwargs: dict | None = None,
    ) -> torch.Tensor:
        r"""
        Runs the scheduler's grid from `latents` = `x_{t_0}` (data units); returns the final `x0_hat` (data units).

        The transformer is called as `SanaSprintTransformer2DModel.trigflow_forward(self.transformer, ...)`, so that a
        `torch.compile`d transformer (`OptimizedModule`) runs its compiled `forward` inside the TrigFlow transform.
        `controlnet_kwargs` (`controlnet`, `controlnet_cond`, `controlnet_conditioning_scale`) go to every call; a
        callback sees and may replace `controlnet_cond` as `"control_image"`.
        """
        callback_on_step_end_tensor_inputs = _resolve_callback_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        controlnet_kwargs = dict(controlnet_kwargs or {})
        sigma_data = self.scheduler.config.sigma_data
        batch_size = latents.shape[0]
        device = latents.device
        guidance = None
        if guidance_scale is not None:
            guidance = torch.full((batch_size,), float(guidance_scale), device=device, dtype=torch.float32)
        timesteps = self.scheduler.timesteps[:-1]
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                velocity = SanaSprintTransformer2DModel.trigflow_forward(
                    self.transformer,
                    latents / sigma_data,
                    t.expand(batch_size),
                    encoder_hidden_states=prompt_embeds,
                    encoder_attention_mask=prompt_attention_mask,
                    guidance_scale=guidance,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **controlnet_kwargs,
                )[0]
                latents = self.scheduler.step(
                    velocity.float() * sigma_data, t, latents, generator=generator, return_dict=False
                )[0]
                if callback_on_step_end is not None:
                    control_image = controlnet_kwargs.get("controlnet_cond")
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "control_image": control_image}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = _checked_callback_outputs(
                        callback_on_step_end(self, i, t, callback_kwargs), tensors, self._callback_tensor_inputs, i
                    )
                    latents = callback_outputs.get("latents", latents)
                    prompt_embeds = callback_outputs.get("prompt_embeds", prompt_embeds)
                    if "control_image" in callback_outputs:
                        controlnet_kwargs["controlnet_cond"] = callback_outputs["control_image"]
                progress_bar.update()
        # After the last step (t_next = 0) `latents` is x0_hat itself, as replaced by a callback.
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str, crop_to: tuple[int, int] | None):
        """`x0_hat` (data units) -> images of `output_type`; `crop_to = (height, width)` undoes resolution binning."""
        latents = latents / self.scheduler.config.sigma_data
        if output_type == "latent":
            return latents
        latents = latents.to(_model_dtype(self.vae))
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if crop_to is not None:
            image = self.image_processor.resize_and_crop_tensor(image, crop_to[1], crop_to[0])
        return self.image_processor.postprocess(image, output_type=output_type)
