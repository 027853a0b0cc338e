"""FSDP2 (torch `fully_shard`) for the student, the frozen teacher and the discriminator heads.

One code path on CPU (gloo) and GPU (NCCL): the training script shards with these functions whenever `--fsdp` is
given or accelerate was launched with its FSDP2 plugin (which does not engage on CPU). Every transformer block is
one FSDP unit, the time(+guidance) embedder another (kept in fp32 under a bf16 parameter policy: a bf16 time path
diverges, rcm#10), and the [`~models.TrigFlowModel`] is the root, whose `forward` the training library calls.

States: [`full_model_state_dict`] gathers a diffusers-format state dict on rank 0 (final save, validation);
[`save_sharded_state`] / [`load_sharded_state`] write and read each rank's shards of models and optimizers with
`torch.distributed.checkpoint` (resumable checkpoints, no gather). DCP reshards on load, so a checkpoint written by
N processes resumes on any number: on one process FSDP2 needs the one-rank group of [`ensure_process_group`].
"""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..models.trigflow_model import TrigFlowModel


def ensure_process_group(device: torch.device | str) -> None:
    """
    Start a one-process group (in-memory store, `device`'s default backend: gloo on CPU, NCCL on CUDA) unless one
    exists: `fully_shard` and DCP then run on a single process, which accelerate starts no group for. A no-op in a
    multi-process launch.
    """
    if dist.is_initialized():
        return
    device = torch.device(device)
    dist.init_process_group(dist.get_default_backend_for_device(device), store=dist.HashStore(), rank=0, world_size=1)


def _policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Parameters gathered in `param_dtype` (None: their own dtype), gradients reduced in fp32."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_trigflow_model(
    model: TrigFlowModel, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> TrigFlowModel:
    """
    `fully_shard` each transformer block and the time embedder, then the `TrigFlowModel` root (in place).

    Args:
        model ([`~models.TrigFlowModel`]): The student or the frozen teacher, on its device, fp32 master weights.
        param_dtype (`torch.dtype`, *optional*): Compute dtype of the gathered parameters (e.g. `torch.bfloat16`);
            the time embedder always computes in fp32. `None` keeps the stored dtype.
        reshard_after_forward (`bool`, defaults to `True`): Free gathered block (and time-embedder) parameters after
            each forward (ZeRO-3); `False` keeps them until the backward (ZeRO-2 style, more memory, fewer
            all-gathers). The root's own parameters always stay gathered between forward and backward.
    """
    if not isinstance(model, TrigFlowModel):
        raise TypeError(f"`model` must be a TrigFlowModel, got {type(model).__name__}.")
    transformer = model.transformer
    for block in transformer.transformer_blocks:
        fully_shard(block, mp_policy=_policy(param_dtype), reshard_after_forward=reshard_after_forward)
    fully_shard(transformer.time_embed, mp_policy=_policy(None), reshard_after_forward=reshard_after_forward)
    # The root keeps its (small: embedders, final norm and projection) parameters gathered after the forward, as
    # torch's own default for roots does: the discriminator reads the teacher's block features and drops its output,
    # so the root's pre-backward hook never fires while the patch embedding still needs its weight in the backward.
    fully_shard(model, mp_policy=_policy(param_dtype), reshard_after_forward=False)
    return model


def shard_discriminator_heads(discriminator: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """`fully_shard` each head of a [`SanaDiscriminator`] (in place; its frozen teacher is sharded separately)."""
    for head in discriminator.heads:
        fully_shard(head, mp_policy=_policy(param_dtype))
    return discriminator


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule) or any(isinstance(m, FSDPModule) for m in module.modules())


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """
    The unsharded state dict of an FSDP2 module, on the CPU of rank 0 (an empty dict on the other ranks).
    Collective: every rank must call it.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _sharded_state(models, optimizers, tensors):
    state = {name: get_model_state_dict(module) for name, module in models.items()}
    for name, (module, optimizer) in optimizers.items():
        state[name] = get_optimizer_state_dict(module, optimizer)
    for name, values in (tensors or {}).items():
        state[name] = dict(values)
    return state


def save_sharded_state(
    folder: str,
    models: dict[str, nn.Module],
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """
    Write every rank's shards of `models`, `optimizers` (`{name: (model, optimizer)}`) and plain `tensors`
    (`{name: {key: tensor}}`, e.g. an EMA's sharded shadow parameters) to `folder` (DCP).
    """
    dcp.save(_sharded_state(models, optimizers, tensors), checkpoint_id=folder)


def load_sharded_state(
    folder: str,
    models: dict[str, nn.Module],
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """
    Read what [`save_sharded_state`] wrote, with the same names, into the same kind of objects (`tensors` in place).

    DCP reshards on load: the objects may be sharded over another number of processes than the writer's, or not be
    sharded at all (one process, no process group needed). A parameter that had no optimizer state when saved (no
    gradient yet) has none after loading either.
    """
    state = _sharded_state(models, optimizers, tensors)
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    for name in optimizers:
        # A fresh optimizer's target holds a state for every parameter (DCP initialises them with a zero step);
        # DCP's load is strict, so drop those the writer had none for (the load then leaves them without state).
        states = state[name]["state"]
        for fqn in [
            fqn for fqn, values in states.items() if not any(f"{name}.state.{fqn}.{k}" in saved for k in values)
        ]:
            del states[fqn]
    dcp.load(state, checkpoint_id=folder)
    for name, module in models.items():
        set_model_state_dict(module, state[name])
    for name, (module, optimizer) in optimizers.items():
        set_optimizer_state_dict(module, optimizer, state[name], options=StateDictOptions(strict=False))
    for name, values in (tensors or {}).items():
        for key, tensor in values.items():
            if state[name][key] is not tensor:  # DCP loads in place; copy if it handed back a new tensor
                tensor.copy_(state[name][key])


__all__ = [
    "ensure_process_group",
    "full_model_state_dict",
    "is_sharded",
    "load_sharded_state",
    "save_sharded_state",
    "shard_discriminator_heads",
    "shard_trigflow_model",
]
