"""Data parallelism without a DDP wrapper, and randomness that does not depend on the process layout.

**Why no DDP.** The training steps call `student.trigflow_forward(...)` (and `torch.func.jvp` through it) on the plain
module. A `DistributedDataParallel` wrapper only arms its gradient reducer inside its own `forward`, so with the
wrapper's forward never called, gradients would silently stay per-process. The training script therefore keeps the
models unwrapped and, after each backward, averages the gradients of the parameters it is about to step with
[`all_reduce_gradients`]: one all-reduce per bucket of up to `bucket_size_mb` of flattened gradients (the same
coalescing DDP does), `SUM` then divide (`ReduceOp.AVG` is NCCL-only).

**Layout-invariant randomness.** A step of global batch `B * num_processes * accumulation` is cut into
`num_processes * accumulation` micro-batches of `B` samples. [`global_micro_batch_index`] numbers them the same way
whatever the layout (`index = accumulation_step * num_processes + process_index`), the training data of micro-batch
`j` of step `k` is global batch `k * (num_processes * accumulation) + j` of the epoch (see
`training.data.LayoutInvariantBatchSampler`), and its noise comes from [`make_generator`]`(seed, "generator", k, j)`.
So one process with accumulation 4, two processes with accumulation 2 and four processes without accumulation see
the same samples with the same noise in every micro-batch; they differ only by float summation order. The same
derivation makes a resumed run draw exactly what the uninterrupted run drew, with no generator state to checkpoint.
"""

import zlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist


def _distributed_world_size(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int):
    """Consecutive runs of tensors of one (device, dtype), each run at most `bucket_bytes` (or a single tensor)."""
    bucket, size, key = [], 0, None
    for tensor in tensors:
        tensor_key = (tensor.device, tensor.dtype)
        tensor_bytes = tensor.numel() * tensor.element_size()
        if bucket and (tensor_key != key or size + tensor_bytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor_bytes
        key = tensor_key
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], group=None, bucket_size_mb: float = 256.0) -> int:
    r"""
    Average the `.grad` of `parameters` over all processes of `group`, in place.

    Parameters that do not require grad are ignored. Every process must pass the same parameters in the same order
    (the same model). A parameter whose `.grad` is `None` on this process takes part with zeros (its `.grad` becomes a
    zero tensor), so buckets line up even when a branch gave no gradient on one process. Gradients are flattened into
    buckets of at most `bucket_size_mb` per (device, dtype), each all-reduced once (`SUM`, then divided by the world
    size) and copied back. A NaN/Inf on any process reaches every process, so a non-finite check after this call
    skips the update everywhere.

    Without an initialised process group, or with a world size of 1, nothing happens.

    Returns:
        `int`: the number of all-reduce calls made (0 when nothing was done).
    """
    world_size = _distributed_world_size(group)
    if world_size == 1:
        return 0
    grads = []
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        grads.append(parameter.grad)
    calls = 0
    for bucket in _buckets(grads, int(bucket_size_mb * 2**20)):
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        for grad, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)
        calls += 1
    return calls


@torch.no_grad()
def broadcast_parameters(modules: Iterable[torch.nn.Module], src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of `modules` from process `src` to all processes (no-op without a group)."""
    if _distributed_world_size(group) == 1:
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src, group=group)


def global_micro_batch_index(accumulation_step: int, process_index: int, num_processes: int) -> int:
    """A micro-batch's layout-independent number in its step: `accumulation_step * num_processes + process_index`."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index}.")
    if accumulation_step < 0:
        raise ValueError(f"`accumulation_step` must be >= 0, got {accumulation_step}.")
    return accumulation_step * num_processes + process_index


def _key_to_int(key) -> int:
    if isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, (int, np.integer)):
        if key < 0:
            raise ValueError(f"Seed keys must be >= 0, got {key}.")
        return int(key)
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))
    raise TypeError(f"Seed keys must be ints or strings, got {type(key).__name__}.")


def derive_seed(seed: int, *keys: int | str) -> int:
    """
    A 63-bit seed that is a fixed function of `(seed, *keys)` (numpy `SeedSequence` hashing; strings via CRC32).

    Distinct key tuples give statistically independent streams, e.g. `derive_seed(seed, "generator", step, index)`.
    """
    entropy = [_key_to_int(seed)] + [_key_to_int(key) for key in keys]
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 31 | int(low)) & (2**63 - 1)


def make_generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with [`derive_seed`]`(seed, *keys)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))


__all__ = [
    "all_reduce_gradients",
    "broadcast_parameters",
    "derive_seed",
    "global_micro_batch_index",
    "make_generator",
]
