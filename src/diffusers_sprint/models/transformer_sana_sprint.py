"""SanaSprintTransformer2DModel: diffusers' Sana transformer that speaks TrigFlow."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.lora_base import _fetch_state_dict
from diffusers.models.controlnets.controlnet_sana import SanaControlNetModel

# diffusers' pipeline loader looks up `ModelMixin` in a component's module to pick its load method.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel
from diffusers.utils import BaseOutput
from torch import nn
from torch.distributed._composable import checkpoint as module_checkpoint
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from ..lora_checks import check_lora_state_dict, lora_source
from ..trigflow import flow_sample_from_trigflow, flow_time_from_trigflow, trigflow_velocity_from_flow
from .attention_processor import jvp_safe_attention
from .embeddings import Float32AdaLayerNormSingle, Float32TimestepGuidanceEmbeddings
from .modeling_utils import unwrap_model


# The file-locating arguments of diffusers' `load_lora_adapter` (those of `_fetch_state_dict`).
_LORA_FETCH_KWARGS = (
    "weight_name",
    "use_safetensors",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
)


def checkpoint_block(block: nn.Module, *args) -> Any:
    """
    `block(*args)` under non-reentrant activation checkpointing: the default `gradient_checkpointing_func` of
    [`SanaSprintTransformer2DModel`] (diffusers calls it per block while grad is enabled).

    A plain block is recomputed through `torch.utils.checkpoint` as in diffusers. A block that is an FSDP2 unit
    (`fully_shard`) is checkpointed inside its FSDP hooks instead, by torch's module-hook `checkpoint` (installed on
    first use): FSDP's pre-forward hook re-views the block's inputs in the forward but is skipped in the backward's
    recomputation (the pre-backward hook unshards). Recomputing `block.__call__` as diffusers does would then feed the
    block its raw inputs, whose size-1 batch dim (one sample per process) can carry other strides; `matmul` picks
    `mm` or `bmm` for a frozen weight by strides, so the recomputation saved other shapes and the backward failed
    ("Recomputed values ... have different metadata", saved `[C, C]`, recomputed `[1, C, C]`).
    """
    if not isinstance(block, FSDPModule):
        return checkpoint(block.__call__, *args, use_reentrant=False)
    if module_checkpoint.state(block) is None:
        module_checkpoint(block)
    state = module_checkpoint.state(block)
    state.enable_hook = True  # only for this call: diffusers does not checkpoint without grad
    try:
        return block(*args)
    finally:
        state.enable_hook = False


@dataclass
class SanaSprintTransformerOutput(BaseOutput):
    """
    Output of [`SanaSprintTransformer2DModel.trigflow_forward`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            The TrigFlow velocity `F` (unit scale: `x0_hat = cos(t) x_t - sin(t) sigma_data F`).
        logvar (`torch.Tensor` of shape `(batch_size, 1)`, *optional*):
            The adaptive-weight log-variance, when requested and the model has a logvar head.
    """

    sample: torch.Tensor
    logvar: torch.Tensor | None = None


class SanaSprintTransformer2DModel(SanaTransformer2DModel):
    r"""
    The Sana transformer of diffusers, with a TrigFlow entry point for SANA-Sprint
    ([arXiv 2503.09641](https://huggingface.co/papers/2503.09641)).

    Parameters, blocks and state-dict keys are those of [`~diffusers.SanaTransformer2DModel`], so every released
    diffusers-format Sana or Sana-Sprint transformer loads unchanged with `from_pretrained`. `forward` is diffusers'
    flow-matching forward; [`trigflow_forward`] wraps it with the training-free flow<->TrigFlow transform (paper
    Prop. 3.1). `torch.func.jvp` works through both: while forward-mode AD is active, attention runs on the math SDPA
    kernel (the fused kernels have no forward-mode rule).

    Args beyond [`~diffusers.SanaTransformer2DModel`]:
        flow_time_scale (`float`, *optional*):
            Factor applied to the flow time `s in [0, 1]` before the time embedding. `None` picks the released
            convention: `1.0` ("dense time") for models with a guidance embedder (Sana-Sprint), `1000 *
            timestep_scale` otherwise (flow-matching Sana teachers).
        logvar_head (`bool`, defaults to `False`):
            Adds `logvar_linear`, a linear map from the time(+guidance) embedding to the adaptive-weight log-variance
            of the sCM loss. It is zero-initialised (weight 1 at start) and, when a checkpoint lacks it, initialised
            rather than reported missing.
    """

    # diffusers' patterns plus the time path: under `enable_layerwise_casting` the time(+guidance) embedding and the
    # logvar head keep their weights' dtype (fp32 time path) instead of being stored in e.g. float8.
    _skip_layerwise_casting_patterns = [
        *SanaTransformer2DModel._skip_layerwise_casting_patterns,
        "time_embed",
        "logvar",
    ]
    # diffusers' regional compilation (`compile_repeated_blocks`), which `SanaTransformer2DModel` leaves unset: each
    # block is compiled on its own (the rest of the model stays eager); hooks on the blocks run outside it.
    _repeated_blocks = ["SanaTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        flow_time_scale: float | None = None,
        logvar_head: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_cross_attention_heads=num_cross_attention_heads,
            cross_attention_head_dim=cross_attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            caption_channels=caption_channels,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            guidance_embeds=guidance_embeds,
            guidance_embeds_scale=guidance_embeds_scale,
            qk_norm=qk_norm,
            timestep_scale=timestep_scale,
        )
        inner_dim = num_attention_heads * attention_head_dim
        # Same parameters and keys as diffusers' time embeddings, but computed in fp32 under autocast.
        self.time_embed = (
            Float32TimestepGuidanceEmbeddings(inner_dim) if guidance_embeds else Float32AdaLayerNormSingle(inner_dim)
        )
        self.logvar_linear = None
        if logvar_head:
            self.logvar_linear = nn.Linear(inner_dim, 1)
            self._init_logvar_head()

    def _init_logvar_head(self) -> None:
        nn.init.zeros_(self.logvar_linear.weight)
        nn.init.zeros_(self.logvar_linear.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`; a logvar head the checkpoint lacks is initialised, not left on `meta`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.logvar_linear is not None and model.logvar_linear.weight.is_meta:
            reference = model.proj_out.weight
            model.logvar_linear.to_empty(device=reference.device).to(reference.dtype)
            model._init_logvar_head()
        return loaded

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        """
        diffusers' `load_lora_adapter`, with the state dict checked first ([`check_lora_state_dict`]): a `lora_A`
        without its `lora_B` (or the reverse) raises a `ValueError` naming the file and the missing keys instead of
        peft's `IndexError`.
        """
        source = lora_source(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"), kwargs.get("subfolder"))
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            fetch = {name: kwargs.pop(name, None) for name in _LORA_FETCH_KWARGS}
            pretrained_model_name_or_path_or_dict, kwargs["metadata"] = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict,
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
                metadata=kwargs.get("metadata"),
                **fetch,
            )
        state_dict = pretrained_model_name_or_path_or_dict
        if prefix is not None:
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        check_lora_state_dict(state_dict, source)
        return super().load_lora_adapter(
            pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap, **kwargs
        )

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """diffusers' method; the default `gradient_checkpointing_func` is [`checkpoint_block`] (FSDP2-safe)."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func or checkpoint_block)

    @property
    def effective_flow_time_scale(self) -> float:
        """The factor the flow time `s in [0, 1]` is multiplied by before the time embedding."""
        if self.config.flow_time_scale is not None:
            return float(self.config.flow_time_scale)
        return 1.0 if self.config.guidance_embeds else 1000.0 * float(self.config.timestep_scale)

    @property
    def compute_dtype(self) -> torch.dtype:
        """
        The dtype the blocks compute in, as `self.dtype` gives it (the layerwise-casting compute dtype when that is
        enabled), read from a few layers instead of walking every module as `ModelMixin.dtype` does.
        """
        probe = self.transformer_blocks[0].attn1.to_q if len(self.transformer_blocks) else self.proj_out
        for layer in (probe, self.caption_projection.linear_1):
            registry = getattr(layer, "_diffusers_hook", None)
            hook = registry.get_hook("layerwise_casting") if registry is not None else None
            if hook is not None:
                return hook.compute_dtype
        dtype = probe.weight.dtype
        return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) else self.dtype

    def forward(self, *args, **kwargs):
        """diffusers' flow-matching forward (see [`~diffusers.SanaTransformer2DModel.forward`]), JVP-safe."""
        with jvp_safe_attention():
            return super().forward(*args, **kwargs)

    def trigflow_forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_logvar: bool = False,
        detach_logvar_input: bool = False,
        return_dict: bool = True,
        controlnet: SanaControlNetModel | None = None,
        controlnet_cond: torch.Tensor | None = None,
        controlnet_conditioning_scale: torch.Tensor | float | None = None,
    ) -> SanaSprintTransformerOutput | tuple:
        r"""
        The TrigFlow velocity `F(x_t / sigma_data, t)`.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                The noisy latent divided by sigma_data, `x_t / sigma_data`, with `x_t = cos(t) x0 + sin(t) z`.
            timestep (`torch.Tensor` of shape `(batch_size,)` or a scalar):
                TrigFlow time `t` in radians, `0` (data) to `pi/2` (noise).
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, caption_channels)`):
                Text-encoder hidden states.
            encoder_attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
                1 for tokens to attend to, 0 for padding.
            guidance_scale (`torch.Tensor` of shape `(batch_size,)` or a float, *optional*):
                The classifier-free guidance scale `w` the student imitates; it is multiplied by
                `config.guidance_embeds_scale` (0.1) before the guidance embedding. Required exactly when the model
                has a guidance embedder.
            attention_kwargs (`dict`, *optional*):
                Passed to the attention processors; `{"scale": s}` scales LoRA adapters.
            return_logvar (`bool`, defaults to `False`):
                Also return the adaptive-weight log-variance (needs `logvar_head=True`).
            detach_logvar_input (`bool`, defaults to `False`):
                Feed the logvar head a detached time(+guidance) embedding, so that gradients of `logvar` train the
                head only. `False` is SANA-Sprint's own model: `logvar` also trains the embedders the whole network
                is modulated by (docs/training/scm.md, "Adaptive weight and the shared embedding").
            controlnet ([`~diffusers.SanaControlNetModel`], *optional*):
                A Sana ControlNet whose block residuals are added to this model's blocks, as in diffusers'
                `SanaControlNetPipeline`. It is called on the same flow-space input and time embedding input as the
                transformer, inside the one flow<->TrigFlow transform: `F` is then the TrigFlow velocity of
                "transformer + ControlNet". `torch.func.jvp` works through both.
            controlnet_cond (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`, *optional*):
                The control latents: the VAE latent of the control image times `vae.config.scaling_factor` (unit
                scale, not divided by sigma_data: diffusers' convention). Required exactly when `controlnet` is given.
            controlnet_conditioning_scale (`torch.Tensor` of shape `(batch_size,)` or a float, *optional*):
                Multiplies the ControlNet residuals; per sample when a tensor. Defaults to 1.0 with a `controlnet`.

        Returns:
            [`SanaSprintTransformerOutput`] or a tuple `(F,)` / `(F, logvar)`.
        """
        batch_size = sample.shape[0]
        if self.config.guidance_embeds and guidance_scale is None:
            raise ValueError(
                "`guidance_scale` is required: this model has a guidance embedder (`guidance_embeds=True`)."
            )
        if not self.config.guidance_embeds and guidance_scale is not None:
            raise ValueError(
                "`guidance_scale` was given but this model has no guidance embedder (`guidance_embeds=False`); "
                "pass `guidance_scale=None` and apply classifier-free guidance outside the model."
            )
        if return_logvar and self.logvar_linear is None:
            raise ValueError("`return_logvar=True` needs a model built with `logvar_head=True`.")
        _check_controlnet_inputs(sample, controlnet, controlnet_cond, controlnet_conditioning_scale)

        # The time path runs in at least fp32, whatever the model's dtype (bf16 time embeddings diverge in training).
        time_dtype = torch.promote_types(sample.dtype, torch.float32)
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=time_dtype).expand(batch_size)
        flow_time = flow_time_from_trigflow(timestep)
        flow_sample = flow_sample_from_trigflow(sample, flow_time)

        guidance = None
        if guidance_scale is not None:
            guidance_scale = torch.as_tensor(guidance_scale, device=sample.device, dtype=time_dtype)
            guidance = guidance_scale.expand(batch_size) * self.config.guidance_embeds_scale

        model_dtype = self.compute_dtype
        time_scale = self.effective_flow_time_scale
        model_timestep = flow_time if time_scale == 1.0 else flow_time * time_scale
        controlnet_block_samples = None
        if controlnet is not None:
            controlnet_block_samples = _controlnet_residuals(
                controlnet,
                flow_sample,
                model_timestep,
                encoder_hidden_states,
                encoder_attention_mask,
                controlnet_cond,
                1.0 if controlnet_conditioning_scale is None else controlnet_conditioning_scale,
                attention_kwargs,
                model_dtype,
            )
        velocity = self(
            flow_sample.to(model_dtype),
            encoder_hidden_states=encoder_hidden_states.to(model_dtype),
            encoder_attention_mask=encoder_attention_mask,
            timestep=model_timestep,
            guidance=guidance,
            attention_kwargs=attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            return_dict=False,
        )[0]
        trigflow_velocity = trigflow_velocity_from_flow(velocity, flow_sample, flow_time)

        logvar = None
        if return_logvar:
            embedding = self._time_embedding(model_timestep, guidance, batch_size, model_dtype)
            logvar = self.logvar_linear(embedding.detach() if detach_logvar_input else embedding)

        if not return_dict:
            return (trigflow_velocity,) if logvar is None else (trigflow_velocity, logvar)
        return SanaSprintTransformerOutput(sample=trigflow_velocity, logvar=logvar)

    def _time_embedding(self, model_timestep, guidance, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The `(batch_size, inner_dim)` time(+guidance) embedding that modulates the output norm."""
        if guidance is not None:
            _, embedded = self.time_embed(model_timestep, guidance=guidance, hidden_dtype=dtype)
        else:
            _, embedded = self.time_embed(model_timestep, batch_size=batch_size, hidden_dtype=dtype)
        return embedded


def unwrap_controlnet(controlnet: nn.Module) -> SanaControlNetModel:
    """The `SanaControlNetModel` inside `torch.compile` / `DistributedDataParallel` wrappers (or `controlnet` itself).

    Raises a `TypeError` when there is none."""
    module = unwrap_model(controlnet)
    if not isinstance(module, SanaControlNetModel):
        raise TypeError(
            f"`controlnet` must be a diffusers SanaControlNetModel (or a torch.compile/DDP wrapper of one), got "
            f"{type(controlnet).__name__}."
        )
    return module


def _check_controlnet_inputs(sample, controlnet, controlnet_cond, controlnet_conditioning_scale) -> None:
    """Raises a `ValueError`/`TypeError` naming the first inconsistent ControlNet argument of `trigflow_forward`."""
    if controlnet is None:
        if controlnet_cond is not None or controlnet_conditioning_scale is not None:
            raise ValueError("`controlnet_cond` and `controlnet_conditioning_scale` need a `controlnet`.")
        return
    config = unwrap_controlnet(controlnet).config
    if controlnet_cond is None:
        raise ValueError("`controlnet_cond` (the control latents) is required with a `controlnet`.")
    batch_size, _, height, width = sample.shape
    expected = (batch_size, config.in_channels, height, width)
    if tuple(controlnet_cond.shape) != expected:
        raise ValueError(f"`controlnet_cond` must have shape {expected}, got {tuple(controlnet_cond.shape)}.")
    scale = controlnet_conditioning_scale
    if isinstance(scale, torch.Tensor):
        if scale.ndim > 1 or scale.numel() not in (1, batch_size):
            raise ValueError(
                f"`controlnet_conditioning_scale` must be a float or a tensor of shape ({batch_size},), "
                f"got shape {tuple(scale.shape)}."
            )
    elif scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"`controlnet_conditioning_scale` must be a float, got {type(scale).__name__}.")


def _controlnet_residuals(
    controlnet: nn.Module,
    flow_sample: torch.Tensor,
    model_timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    controlnet_cond: torch.Tensor,
    conditioning_scale: torch.Tensor | float,
    attention_kwargs: dict[str, Any] | None,
    model_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """The ControlNet's block residuals for the flow-space input `x_s` at the transformer's own timestep input.

    Inputs are cast to the ControlNet's dtype and the residuals to the transformer's, as diffusers'
    `SanaControlNetPipeline` does; a per-sample scale is broadcast over tokens and channels. A wrapped ControlNet
    (`torch.compile`, DDP) is called through its wrapper.
    """
    controlnet_dtype = unwrap_controlnet(controlnet).dtype
    if isinstance(conditioning_scale, torch.Tensor):
        conditioning_scale = conditioning_scale.to(flow_sample.device, controlnet_dtype).reshape(-1, 1, 1)
    with jvp_safe_attention():
        residuals = controlnet(
            flow_sample.to(controlnet_dtype),
            encoder_hidden_states=encoder_hidden_states.to(controlnet_dtype),
            encoder_attention_mask=encoder_attention_mask,
            timestep=model_timestep,
            controlnet_cond=controlnet_cond.to(controlnet_dtype),
            conditioning_scale=conditioning_scale,
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
    return tuple(residual.to(model_dtype) for residual in residuals)
