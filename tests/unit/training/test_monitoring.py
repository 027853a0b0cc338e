"""training.monitoring: the skipped-update guard and the non-finite checkpoint check."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_sprint.training.monitoring import SkipMonitor, check_finite_state_dict, step_if_finite


def test_skips_warn_rate_limited_and_summarise():
    warnings = []
    monitor = SkipMonitor(max_consecutive_skips=5, warn_every=3, warn=warnings.append)
    pattern = [False, True, True, False, True, True, True, False, True, False]  # 6 skips, longest streak 3
    for step, skipped in enumerate(pattern):
        monitor.record("generator", skipped, step, grad_norm=math.nan if skipped else 1.0)
        monitor.record("discriminator", False, step, grad_norm=0.5)
    assert len(warnings) == 3  # skips number 1, 3 and 6
    assert warnings[0].startswith("Step 1: generator update skipped, non-finite gradient norm (gradient norm nan); ")
    assert "1 in a row, 1 of 2 so far" in warnings[0]
    assert "Step 4:" in warnings[1] and "1 in a row, 3 of 5 so far" in warnings[1]
    assert "Step 8:" in warnings[2] and "6 of 9 so far" in warnings[2]
    assert monitor.total_skipped == 6
    assert monitor.summary() == "Skipped updates: generator 6 of 10 (longest streak 3), discriminator 0 of 10."
    assert SkipMonitor().summary() == "Skipped updates: none recorded."


def test_too_many_consecutive_skips_abort_with_a_clear_error():
    monitor = SkipMonitor(max_consecutive_skips=4, warn=lambda message: None)
    monitor.record("generator", True, 0)
    monitor.record("generator", False, 1)  # a good update resets the streak
    for step in range(2, 5):
        monitor.record("generator", True, step, grad_norm=math.inf)
        monitor.record("discriminator", False, step)  # the other phase's good updates do not reset it
    with pytest.raises(RuntimeError) as error:
        monitor.record("generator", True, 5, grad_norm=math.inf)
    message = str(error.value)
    assert message.startswith("Training diverged: the last 4 generator updates (steps 2 to 5) had a non-finite")
    assert "weights have not changed since step 2" in message and "--max_consecutive_skips (now 4)" in message
    assert "generator 5 of 6 (longest streak 4)" in message


def test_the_streak_survives_a_checkpoint():
    first = SkipMonitor(max_consecutive_skips=3, warn=lambda message: None)
    first.record("generator", True, 0)
    first.record("generator", True, 1)
    resumed = SkipMonitor(max_consecutive_skips=3, warn=lambda message: None)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="the last 3 generator updates \\(steps 0 to 2\\)"):
        resumed.record("generator", True, 2)
    with pytest.raises(ValueError, match="`max_consecutive_skips` must be an int >= 1, got 0"):
        SkipMonitor(max_consecutive_skips=0)


def test_a_diverging_run_is_stopped():
    """The guard on real updates: a learning rate that overflows the weights makes every later gradient NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e38)
    monitor = SkipMonitor(max_consecutive_skips=5, warn=lambda message: None)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with pytest.raises(RuntimeError, match="the last 5 generator updates"):
        for step in range(100):
            loss = ((model(x) * 1e3 - y) ** 2).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            monitor.record("generator", step_if_finite(optimizer, grad_norm), step, float(grad_norm))
    assert step < 10 and monitor.updates["generator"] - monitor.skipped["generator"] <= 2


def test_non_finite_checkpoints_are_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    check_finite_state_dict(model.state_dict(), "ok")
    with torch.no_grad():
        model[1].weight[0, 1] = math.nan
        model[1].weight[0, 2] = -math.inf
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir()
    save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError) as error:
        check_finite_state_dict(load_file(str(path)), str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: tensor '1.weight' (1, 3) holds 1 NaN and 1 Inf of 3 values.")
    assert "resume from an earlier one" in message
    # Nested optimizer states: the name is the path into the dict; integer tensors are not checked.
    state = {"state": {0: {"step": torch.tensor(3), "exp_avg": torch.tensor([0.0, math.nan])}}, "param_groups": []}
    with pytest.raises(ValueError, match=r"optimizer.bin: tensor 'state.0.exp_avg' \(2,\) holds 1 NaN and 0 Inf"):
        check_finite_state_dict(state, "optimizer.bin")
    check_finite_state_dict({"step": torch.tensor([2**62]), "flags": torch.tensor([True])}, "ints")
    with pytest.raises(ValueError, match=r"scaler.pt: 'scale' is inf"):
        check_finite_state_dict({"scale": math.inf}, "scaler.pt")


def test_loss_gradient_norms_match_each_part_alone_and_leave_grads_untouched():
    from diffusers_sprint.training.monitoring import loss_gradient_norms

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    x = torch.randn(5, 4)
    out = model(x) * frozen
    first, second = out.square().mean(), 3.0 * out.sum()
    norms = loss_gradient_norms({"first": first, "second": second, "absent": None}, [*model.parameters(), frozen])
    for name, loss in (("first", first), ("second", second)):
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        assert norms[name] == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(), rel=1e-6)
    assert norms["absent"] == 0.0
    assert all(p.grad is None for p in model.parameters())
    (first + second).backward()  # the graph is still there for the real backward
    assert all(p.grad is not None for p in model.parameters())


def _one_update(grad_value: float, scaler=None, monitor=None):
    """A linear model with gradient `grad_value` on every weight, SGD lr 0.1 under a halving schedule and an EMA."""
    from diffusers.training_utils import EMAModel

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    ema = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False)
    model.weight.grad = torch.full_like(model.weight, grad_value)
    arguments = (optimizer, torch.tensor(grad_value), schedule, ema, model.parameters(), scaler)
    if monitor is None:
        return step_if_finite(*arguments), model, optimizer, ema
    return monitor.update("generator", 7, *arguments), model, optimizer, ema


class RecordingScaler:
    updates = 0

    def update(self):
        self.updates += 1


def test_step_if_finite_advances_schedule_and_ema_only_after_an_applied_step():
    scaler = RecordingScaler()
    skipped, model, optimizer, ema = _one_update(2.0, scaler)
    assert not skipped and scaler.updates == 0
    torch.testing.assert_close(model.weight, torch.full((1, 2), 0.8), rtol=0, atol=1e-7)  # 1 - 0.1 * 2
    assert optimizer.param_groups[0]["lr"] == 0.05 and ema.optimization_step == 1
    # diffusers' EMA uses decay 0 on its first step: the shadow moves from 1 to the new weights
    torch.testing.assert_close(ema.shadow_params[0], torch.full((1, 2), 0.8), rtol=0, atol=1e-7)
    assert model.weight.grad is None

    skipped, model, optimizer, ema = _one_update(math.nan, scaler)
    assert skipped and scaler.updates == 1  # fp16: the loss scale drops although step() did not run
    assert torch.equal(model.weight, torch.ones(1, 2)) and model.weight.grad is None
    assert optimizer.param_groups[0]["lr"] == 0.1 and ema.optimization_step == 0
    assert torch.equal(ema.shadow_params[0], torch.ones(1, 2))


def test_skip_monitor_update_steps_and_records():
    warnings = []
    monitor = SkipMonitor(max_consecutive_skips=2, warn=warnings.append)
    (skipped, norm), model, _, _ = _one_update(2.0, monitor=monitor)
    assert (skipped, norm) == (False, 2.0) and monitor.updates == {"generator": 1} and not warnings
    (skipped, norm), model, _, _ = _one_update(math.inf, monitor=monitor)
    assert skipped and norm == math.inf and torch.equal(model.weight, torch.ones(1, 2))
    assert warnings == [
        "Step 7: generator update skipped, non-finite gradient norm (gradient norm inf); 1 in a row, 1 of 2 so far "
        "(warnings every 10 skips; the run stops after 2 in a row)."
    ]
    with pytest.raises(RuntimeError, match="^Training diverged: the last 2 generator updates"):
        _one_update(math.nan, monitor=monitor)
