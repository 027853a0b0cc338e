"""training.seeding: layout-invariant micro-batch numbers and derived seeds."""

import pytest
import torch

from diffusers_sprint.training.seeding import derive_seed, global_micro_batch_index, make_generator


def test_micro_batch_numbering_is_the_same_for_every_layout():
    """Processes x accumulation = 4 micro-batches per step, numbered 0..3 whatever the layout."""
    for num_processes, accumulation in ((1, 4), (2, 2), (4, 1)):
        numbers = sorted(
            global_micro_batch_index(m, p, num_processes) for p in range(num_processes) for m in range(accumulation)
        )
        assert numbers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="process_index"):
        global_micro_batch_index(0, 2, 2)


def test_derived_seeds_are_fixed_functions_of_their_keys():
    assert derive_seed(0, "generator", 3, 1) == derive_seed(0, "generator", 3, 1)
    seeds = {
        derive_seed(seed, name, step, index)
        for seed in (0, 1)
        for name in ("g", "d")
        for step in range(3)
        for index in range(3)
    }
    assert len(seeds) == 36
    assert 0 <= derive_seed(2**40, "x") < 2**63
    first = torch.randn(4, generator=make_generator(5, "a", 1))
    assert torch.equal(first, torch.randn(4, generator=make_generator(5, "a", 1)))
    assert not torch.equal(first, torch.randn(4, generator=make_generator(5, "a", 2)))
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(0, -1)
    with pytest.raises(TypeError):
        derive_seed(0, 1.5)
