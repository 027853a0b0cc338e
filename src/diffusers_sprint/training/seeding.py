"""Randomness that does not depend on the process layout.

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

import numpy as np
import torch


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
    "derive_seed",
    "global_micro_batch_index",
    "make_generator",
]
