"""Model helpers shared by the models, the pipelines and the training library."""

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """
    The module inside every wrapper, at any nesting: `torch.compile` (`_orig_mod`), DDP, DeepSpeed and FSDP1
    (`module`). FSDP2 (`fully_shard`) shards a module in place and leaves nothing to unwrap. Like accelerate's
    `extract_model_from_parallel`, but also through `compile(DDP(model))` and duck-typed wrappers.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


__all__ = ["unwrap_model"]
