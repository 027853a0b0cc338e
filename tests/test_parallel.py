"""training.parallel: explicit gradient averaging (2 gloo processes vs one full batch) and layout-invariant seeds."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusers_sprint.training.parallel import (
    all_reduce_gradients,
    broadcast_parameters,
    derive_seed,
    global_micro_batch_index,
    make_generator,
)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        self.unused = torch.nn.Linear(2, 2)  # gets a gradient on rank 0 only (a branch not taken on rank 1)
        self.register_buffer("running", torch.randn(4))

    def forward(self, x):
        return self.body(x)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Net()


def _data():
    generator = torch.Generator().manual_seed(123)
    return torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)


def _loss(model, x, y, rank):
    loss = (model(x) - y).square().mean()
    if rank == 0:
        loss = loss + model.unused(x[:, :2]).sum() * 0.1
    return loss


def _worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank, world_size=world_size
    )
    try:
        model = _model(seed=rank)  # different weights per rank: the broadcast must fix that
        broadcast_parameters([model])
        x, y = _data()
        _loss(model, x[rank::world_size], y[rank::world_size], rank).backward()
        # Tiny buckets: several all-reduce calls, and a bucket boundary inside the parameter list.
        calls = all_reduce_gradients(model.parameters(), bucket_size_mb=100 / 2**20)
        torch.save(
            {
                "calls": calls,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
            },
            os.path.join(folder, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_average_to_the_full_batch_gradient(tmp_path):
    """2 processes x 4 samples, averaged, equal 1 process x 8 samples (the loss is a per-sample mean)."""
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    reference = _model(seed=0)
    x, y = _data()
    # Same per-process losses, averaged: mean over ranks of the per-rank mean loss.
    loss = 0.5 * (_loss(reference, x[0::2], y[0::2], 0) + _loss(reference, x[1::2], y[1::2], 1))
    loss.backward()
    for result in results:
        assert result["calls"] > 1
        for key, value in reference.state_dict().items():
            assert torch.equal(result["state"][key], value), key  # broadcast from rank 0, buffers included
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, rtol=1e-6, atol=1e-7, msg=name)
    for name in results[0]["grads"]:
        assert torch.equal(results[0]["grads"][name], results[1]["grads"][name]), name


def test_without_a_process_group_nothing_happens():
    model = _model(seed=0)
    x, y = _data()
    _loss(model, x, y, 1).backward()
    before = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    assert all_reduce_gradients(model.parameters()) == 0
    broadcast_parameters([model])
    for name, parameter in model.named_parameters():
        assert (parameter.grad is None) == (before[name] is None)
        if parameter.grad is not None:
            assert torch.equal(parameter.grad, before[name])


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
