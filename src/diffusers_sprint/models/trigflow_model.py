"""The TrigFlow velocity of a Sana transformer as a module's `forward`, for training engines.

A training engine (DDP, FSDP2, a DeepSpeed engine, `torch.compile`) hooks a module's `__call__`: DDP arms its
gradient reducer there, FSDP2 gathers the root's parameters there. Calling `transformer.trigflow_forward(...)` on the
bare model goes around every such wrapper, so the training library calls the student and the teacher through a
[`TrigFlowModel`] instead: the parameterisation sits outside the prepared network (k-diffusion's pattern) and the
prepared object is this module.
"""

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .modeling_utils import unwrap_model
from .transformer_sana_sprint import unwrap_controlnet


class TrigFlowModel(nn.Module):
    r"""
    `forward(x_t / sigma_data, t, ...) = transformer.trigflow_forward(...)`, returned as a tuple `(F,)` or
    `(F, logvar)`.

    `guidance_scale` is passed on when the transformer has a guidance embedder (`config.guidance_embeds`, read once
    here) and dropped otherwise, so the training library can hand every model the per-sample CFG scale `w` without
    reading the config of a (possibly wrapped) model.

    With a `controlnet`, the module is "transformer + ControlNet" (diffusers' `SanaControlNetModel`, residuals added
    to the transformer's blocks inside the one flow<->TrigFlow transform, see `trigflow_forward`): it is registered
    as the submodule `controlnet`, so `accelerate.prepare` / DDP / EMA / optimisers see one module, and every call
    must then pass `controlnet_cond` (the control latents) — the condition is an input like the prompt.

    Args:
        transformer ([`SanaSprintTransformer2DModel`]): Registered as the submodule `transformer`, so `state_dict`
            keys are those of the transformer prefixed with `transformer.` (checkpoints are written from the
            transformer itself).
        controlnet ([`~diffusers.SanaControlNetModel`], *optional*): Registered as the submodule `controlnet`.
        controlnet_conditioning_scale (`float`, defaults to 1.0): Multiplies the ControlNet residuals of every call.
    """

    def __init__(
        self, transformer: nn.Module, controlnet: nn.Module | None = None, controlnet_conditioning_scale: float = 1.0
    ):
        super().__init__()
        if isinstance(transformer, TrigFlowModel) or not hasattr(transformer, "trigflow_forward"):
            raise TypeError(
                "`transformer` must be a model with `trigflow_forward` (a SanaSprintTransformer2DModel), got "
                f"{type(transformer).__name__}."
            )
        self.transformer = transformer
        self.uses_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        if controlnet is not None:
            unwrap_controlnet(controlnet)  # a TypeError naming the argument unless it is a SanaControlNetModel
        self.controlnet = controlnet
        self.controlnet_conditioning_scale = float(controlnet_conditioning_scale)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
        return_logvar: bool = False,
        detach_logvar_input: bool = False,
        controlnet_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch, C, H, W)`): `x_t / sigma_data`.
            timestep (`torch.Tensor` of shape `(batch,)`): TrigFlow time in radians.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`): The prompt.
            encoder_attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 = attend.
            guidance_scale (`torch.Tensor` of shape `(batch,)` or a float, *optional*): The CFG scale `w`; used only
                by a transformer with a guidance embedder (which then requires it).
            return_logvar, detach_logvar_input: See `SanaSprintTransformer2DModel.trigflow_forward`.
            controlnet_cond (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): The control latents (VAE latent
                of the control image times `scaling_factor`); required exactly when the module has a `controlnet`.

        Returns:
            `(F,)` or, with `return_logvar`, `(F, logvar)`: `F` of shape `(batch, C, H, W)`, `logvar` `(batch, 1)`.
        """
        if (self.controlnet is None) != (controlnet_cond is None):
            raise ValueError(
                "`controlnet_cond` (the control latents) must be given exactly when the TrigFlowModel has a "
                f"`controlnet` (it has {'one' if self.controlnet is not None else 'none'})."
            )
        controlnet_kwargs = {}
        if self.controlnet is not None:
            controlnet_kwargs = dict(
                controlnet=self.controlnet,
                controlnet_cond=controlnet_cond,
                controlnet_conditioning_scale=self.controlnet_conditioning_scale,
            )
        return self.transformer.trigflow_forward(
            sample,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            guidance_scale=guidance_scale if self.uses_guidance else None,
            return_logvar=return_logvar,
            detach_logvar_input=detach_logvar_input,
            return_dict=False,
            **controlnet_kwargs,
        )


def as_trigflow_model(model: nn.Module) -> nn.Module:
    """
    `model` itself if it is ready to be called with the [`TrigFlowModel`] signature (a `TrigFlowModel`, or any
    wrapper around one: DDP, FSDP2, `torch.compile`), else a new `TrigFlowModel(model)` around a bare transformer.
    """
    if hasattr(model, "trigflow_forward") and not isinstance(model, TrigFlowModel):
        return TrigFlowModel(model)
    return model


def unwrap_transformer(model: nn.Module) -> nn.Module:
    """The transformer inside a [`TrigFlowModel`] (itself possibly wrapped by DDP or `torch.compile`)."""
    model = unwrap_model(model)
    return model.transformer if isinstance(model, TrigFlowModel) else model


def unwrap_trigflow_controlnet(model: nn.Module) -> nn.Module | None:
    """The ControlNet inside a [`TrigFlowModel`] (itself possibly wrapped by DDP or `torch.compile`), or `None`."""
    model = unwrap_model(model)
    return model.controlnet if isinstance(model, TrigFlowModel) else None


@dataclass
class TrigFlowInputs:
    r"""
    The inputs of one [`TrigFlowModel`] call, one row per sample: `inputs.call(model)` makes the call.

    Args:
        x_t_scaled (`torch.Tensor` of shape `(batch, C, H, W)`): `x_t / sigma_data`.
        t (`torch.Tensor` of shape `(batch,)`): TrigFlow time in radians.
        prompt_embeds (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`): The prompt.
        prompt_attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 = attend, 0 = padding.
        guidance (`torch.Tensor` of shape `(batch,)` or a float, *optional*): The CFG scale `w`, read by a model with
            a guidance embedder only.
        control (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): Control latents, for a model with a
            ControlNet (its `controlnet_cond`).
    """

    x_t_scaled: torch.Tensor
    t: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor | None = None
    guidance: torch.Tensor | float | None = None
    control: torch.Tensor | None = None

    def call(self, model: nn.Module, **options) -> tuple[torch.Tensor, ...]:
        """`model(x_t_scaled, t, prompt_embeds, prompt_attention_mask, guidance_scale=guidance, **options)`, plus
        `controlnet_cond=control` with control latents only (so a model without ControlNet keyword works too)."""
        if self.control is not None:
            options["controlnet_cond"] = self.control
        return model(
            self.x_t_scaled, self.t, self.prompt_embeds, self.prompt_attention_mask, guidance_scale=self.guidance,
            **options,
        )  # fmt: skip

    def replace(self, **changes) -> "TrigFlowInputs":
        """A copy with some fields changed (`dataclasses.replace`)."""
        return replace(self, **changes)

    def rows(self, index: torch.Tensor | slice) -> "TrigFlowInputs":
        """The rows `index` of every per-row field (a float `guidance` is kept)."""
        return TrigFlowInputs(*(_select_rows(getattr(self, f.name), index) for f in fields(self)))

    def cat(self, other: "TrigFlowInputs") -> "TrigFlowInputs":
        """This call's rows, then `other`'s (cast to this call's dtypes): one call for both."""
        return TrigFlowInputs(
            *(_cat_rows(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        )


def _select_rows(value, index):
    return value[index] if isinstance(value, torch.Tensor) else value


def _cat_rows(name: str, first, second):
    if first is None and second is None:
        return None
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        raise ValueError(
            f"`TrigFlowInputs.cat`: `{name}` must be a per-row tensor in both inputs or `None` in both, got "
            f"{type(first).__name__} and {type(second).__name__}."
        )
    return torch.cat([first, second.to(device=first.device, dtype=first.dtype)])


__all__ = ["TrigFlowInputs", "TrigFlowModel", "as_trigflow_model", "unwrap_transformer", "unwrap_trigflow_controlnet"]
