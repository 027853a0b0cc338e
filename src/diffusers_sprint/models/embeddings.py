"""Time and guidance embeddings that stay in the parameters' precision under autocast.

Under bf16/fp16 autocast, diffusers' Sana time path runs its sinusoid and MLP in half precision (the sinusoid is even
cast to the hidden dtype before the MLP). TrigFlow distillation differentiates through this path (the JVP's `dF/dt`)
and half-precision time embeddings are a known cause of divergence (rCM issue 10). These subclasses compute the
embedding with autocast off in the dtype of their own weights (fp32 master weights stay fp32) and cast only the
result to the hidden dtype. Parameters and state-dict keys are diffusers' own.
"""

import torch
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.models.transformers.sana_transformer import SanaCombinedTimestepGuidanceEmbeddings


def _cast(outputs: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    return outputs if dtype is None else tuple(output.to(dtype) for output in outputs)


class Float32TimestepGuidanceEmbeddings(SanaCombinedTimestepGuidanceEmbeddings):
    """[`SanaCombinedTimestepGuidanceEmbeddings`] evaluated in the weights' dtype, autocast off."""

    def forward(self, timestep, guidance=None, hidden_dtype=None):
        weight_dtype = self.linear.weight.dtype
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            outputs = super().forward(timestep, guidance=guidance, hidden_dtype=weight_dtype)
        return _cast(outputs, hidden_dtype)


class Float32AdaLayerNormSingle(AdaLayerNormSingle):
    """[`AdaLayerNormSingle`] (the teacher's time embedding) evaluated in the weights' dtype, autocast off."""

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        weight_dtype = self.linear.weight.dtype
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            outputs = super().forward(timestep, added_cond_kwargs, batch_size=batch_size, hidden_dtype=weight_dtype)
        return _cast(outputs, hidden_dtype)
