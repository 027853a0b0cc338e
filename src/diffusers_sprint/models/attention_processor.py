"""Attention helpers: forward-mode AD through attention, and the official fp32 linear attention.

PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, CPU flash) have no forward-mode AD
rule, so `torch.func.jvp` through a stock Sana model fails in the cross-attention. The math backend has one. We do
not replace diffusers' processors (that is how the linear self-attention of a student once became softmax); instead
the model runs its forward inside `jvp_safe_attention()`, which picks the math kernel only while forward-mode AD is
active and leaves the fast kernels for plain inference and training.

The official SANA-Sprint training runs the linear self-attention product in fp32 with autocast off
(`fp32_attention: true`, "necessary for NAN loss"): [`Float32SanaLinearAttnProcessor`], set on the self-attention
layers only by [`set_fp32_linear_attention`]. diffusers' `SanaLinearAttnProcessor2_0` casts q, k, v to fp32 too,
but under autocast its matmuls are cast back to bf16.
"""

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel


def forward_ad_is_active() -> bool:
    """True inside `torch.func.jvp` or a `torch.autograd.forward_ad.dual_level()` block."""
    # `torch.func.jvp` enters a forward-AD dual level too, so one check covers both entry points.
    return getattr(forward_ad, "_current_level", -1) >= 0


def jvp_safe_attention() -> contextlib.AbstractContextManager:
    """Context that restricts SDPA to the math backend while forward-mode AD runs, else does nothing."""
    if forward_ad_is_active():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class Float32SanaLinearAttnProcessor:
    r"""
    diffusers' `SanaLinearAttnProcessor2_0` with the attention product computed in fp32 with autocast off.

    The q/k/v and output projections run in the caller's precision (bf16 under autocast); `relu(q)`, `relu(k)`, `v`
    are cast to fp32 and `out = (v_pad k) q`, normalised by its padded row, is computed with autocast disabled
    (official `LiteLA.attn_matmul` with `fp32_attention`). Without autocast and in fp32 it computes exactly what
    diffusers' processor does. Forward-mode AD (`torch.func.jvp`) goes through it.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (batch, tokens, heads * dim) -> q, v: (batch, heads, dim, tokens); k: (batch, heads, tokens, dim)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))

        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()
            value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
            scores = torch.matmul(value, key)
            hidden_states = torch.matmul(scores, query)
            hidden_states = hidden_states[:, :, :-1] / (hidden_states[:, :, -1:] + 1e-15)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2).to(original_dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


def set_fp32_linear_attention(model: torch.nn.Module, enabled: bool = True) -> int:
    r"""
    Switch every linear self-attention of a Sana model (each block's `attn1`) to [`Float32SanaLinearAttnProcessor`]
    (`enabled=True`) or back to diffusers' `SanaLinearAttnProcessor2_0`. The cross-attention (softmax) processors
    are left alone: unlike `set_attn_processor`, which swaps all of them (the diffusers research script's defect 2).
    Works on a PEFT-wrapped model. Returns the number of attention layers switched (0 for a model without linear
    attention).
    """
    linear = (SanaLinearAttnProcessor2_0, Float32SanaLinearAttnProcessor)
    switched = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, linear):
            module.set_processor(Float32SanaLinearAttnProcessor() if enabled else SanaLinearAttnProcessor2_0())
            switched += 1
    return switched


__all__ = [
    "Float32SanaLinearAttnProcessor",
    "forward_ad_is_active",
    "jvp_safe_attention",
    "set_fp32_linear_attention",
]
