"""The toy evaluation protocol's tuning / held-out splits (diffusers_sprint.toy.protocol): disjoint, deterministic."""

import numpy as np
import pytest

from diffusers_sprint.evaluation.fid import reference_indices
from diffusers_sprint.toy.protocol import SEED_STRIDE, SPLITS, evaluation_set, split_rows


NUM_ROWS = 1628  # the emoji dataset


def test_splits_partition_the_dataset_and_tuning_is_the_fid_reference():
    tuning, held_out = split_rows("tuning", NUM_ROWS), split_rows("held_out", NUM_ROWS)
    assert len(tuning) == 1024 and len(held_out) == 604
    assert not set(tuning) & set(held_out)
    assert sorted(tuning + held_out) == list(range(NUM_ROWS))
    assert tuning == [int(i) for i in reference_indices(NUM_ROWS, 1024)]


def test_evaluation_sets_are_deterministic_and_share_no_prompt_or_noise_seed():
    sets = {(split, seed): evaluation_set(split, 500, seed, NUM_ROWS) for split in SPLITS for seed in (0, 1, 2)}
    for (split, seed), value in sets.items():
        assert value == evaluation_set(split, 500, seed, NUM_ROWS)  # deterministic
        assert len(value.rows) == len(set(value.rows)) == 500  # no prompt twice below the split size
        assert set(value.rows) <= set(split_rows(split, NUM_ROWS))
    for seed in (0, 1, 2):
        assert not set(sets["tuning", seed].rows) & set(sets["held_out", seed].rows)
    all_seeds = [s for value in sets.values() for s in value.noise_seeds]
    assert len(all_seeds) == len(set(all_seeds))  # every image of every split and seed has its own noise
    assert sets["tuning", 1].rows != sets["tuning", 2].rows


def test_tuning_split_is_the_demo_set_used_before_the_split():
    """The demo's former evaluation set (seed k): rng(k) permutation of the reference rows, noise k * 100000 + i."""
    reference = [int(i) for i in reference_indices(NUM_ROWS, 1024)]
    for seed in (0, 1):
        order = np.random.default_rng(seed).permutation(len(reference))[:200]
        value = evaluation_set("tuning", 200, seed, NUM_ROWS)
        assert value.rows == [reference[int(i)] for i in order]
        assert value.noise_seeds == [seed * SEED_STRIDE + i for i in range(200)]


def test_small_dataset_and_cycling_and_errors():
    tuning, held_out = split_rows("tuning", 32, None), split_rows("held_out", 32, None)
    assert len(tuning) == len(held_out) == 16 and not set(tuning) & set(held_out)
    value = evaluation_set("held_out", 40, 0, 32, None)  # more samples than prompts: the permutation cycles
    assert len(value.rows) == 40 and set(value.rows) == set(held_out)
    with pytest.raises(ValueError, match=r"`split` must be one of \('tuning', 'held_out'\), got 'test'"):
        split_rows("test", NUM_ROWS)
    with pytest.raises(ValueError, match="`count` must be >= 1"):
        evaluation_set("tuning", 0, 0, NUM_ROWS)
