"""Keeping attention differentiable in forward mode.

PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, CPU flash) have no forward-mode AD
rule, so `torch.func.jvp` through a stock Sana model fails in the cross-attention. The math backend has one. We do
not replace diffusers' processors (that is how the linear self-attention of a student once became softmax); instead
the model runs its forward inside `jvp_safe_attention()`, which picks the math kernel only while forward-mode AD is
active and leaves the fast kernels for plain inference and training.
"""

import contextlib

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


__all__ = ["forward_ad_is_active", "jvp_safe_attention"]
