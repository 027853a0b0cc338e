"""Divergence guards: skipping and counting non-finite (NaN/Inf) updates, refusing non-finite weights in checkpoints.

[`step_if_finite`] is the one place that decides: an update whose gradient norm is NaN/Inf is skipped and changes no
parameter, learning-rate schedule or EMA. A run that skips every update therefore "succeeds" with untouched weights;
[`SkipMonitor`] makes that visible (rate-limited warnings, an end-of-run summary) and stops it after
`max_consecutive_skips` skips in a row; [`SkipMonitor.update`] does both for one update. Every process sees the same
gradient norm (gradients are averaged before clipping), so all processes stop at the same update.
"""

import logging
import math
from collections.abc import Callable, Mapping

import torch


logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_SKIPS = 20


def grad_norm_value(grad_norm: torch.Tensor | float) -> torch.Tensor:
    """The gradient norm (e.g. from `accelerator.clip_grad_norm_`) as a plain tensor: an FSDP2 DTensor gathered."""
    grad_norm = torch.as_tensor(grad_norm)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    grad_norm: torch.Tensor | float,
    lr_scheduler=None,
    ema=None,
    parameters=None,
    scaler=None,
) -> bool:
    """
    `optimizer.step()` unless `grad_norm` (e.g. from `accelerator.clip_grad_norm_`) is NaN/Inf, then zero the
    gradients either way. After an applied step, `lr_scheduler.step()` and `ema.step(parameters)` (when given);
    after a skipped one, `scaler.update()` (fp16: lower the loss scale; `optimizer.step()` did not run). Returns `True`
    when the update was skipped. Under DDP / FSDP2 the clipped norm is the global one, so every process takes the same
    decision.
    """
    skipped = not bool(torch.isfinite(grad_norm_value(grad_norm)).all())
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if skipped and scaler is not None:
        scaler.update()
    if not skipped and lr_scheduler is not None:
        lr_scheduler.step()
    if not skipped and ema is not None:
        ema.step(parameters)
    return skipped


class SkipMonitor:
    r"""
    Counts skipped updates per phase (e.g. `"generator"`, `"discriminator"`, `"finetune"`), warns, and aborts.

    - A warning on the first skip of each phase and then on every `warn_every`-th skip of that phase, naming the step,
      the gradient norm and the skip counts.
    - A `RuntimeError` when `max_consecutive_skips` updates of one phase in a row are skipped: the run has diverged.
    - [`summary`]: one line of totals for the end of the run.

    Checkpointable (`state_dict` / `load_state_dict`, e.g. `accelerator.register_for_checkpointing`), so that a
    resumed run keeps counting the streak it was in.

    Args:
        max_consecutive_skips (`int`, defaults to 20): Skips in a row of one phase that abort the run.
        warn_every (`int`, defaults to 10): After the first, warn on every `warn_every`-th skip of a phase.
        warn (`Callable[[str], None]`, *optional*): Where warnings go (default: this module's `logger.warning`; the
            training script passes its accelerate logger's, which logs on the main process only).
    """

    def __init__(
        self,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        warn_every: int = 10,
        warn: Callable[[str], None] | None = None,
    ):
        for name, value in (("max_consecutive_skips", max_consecutive_skips), ("warn_every", warn_every)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.warn_every = int(warn_every)
        self.warn = warn if warn is not None else logger.warning
        self.updates: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.consecutive: dict[str, int] = {}
        self.longest: dict[str, int] = {}
        self.streak_start: dict[str, int | None] = {}

    def record(self, phase: str, skipped: bool, step: int, grad_norm: float | None = None) -> None:
        """Count one update of `phase` at training step `step`; raises `RuntimeError` when the streak is too long."""
        for counts in (self.updates, self.skipped, self.consecutive, self.longest):
            counts.setdefault(phase, 0)
        self.updates[phase] += 1
        if not skipped:
            self.consecutive[phase] = 0
            self.streak_start[phase] = None
            return
        self.skipped[phase] += 1
        self.consecutive[phase] += 1
        if self.consecutive[phase] == 1:
            self.streak_start[phase] = step
        self.longest[phase] = max(self.longest[phase], self.consecutive[phase])
        norm = "" if grad_norm is None else f" (gradient norm {grad_norm})"
        if self.consecutive[phase] >= self.max_consecutive_skips:
            raise RuntimeError(
                f"Training diverged: the last {self.consecutive[phase]} {phase} updates (steps "
                f"{self.streak_start[phase]} to {step}) had a non-finite gradient norm{norm} and were skipped, so the "
                f"weights have not changed since step {self.streak_start[phase]}. Lower the learning rate, check the "
                "guidance scales and the data, or raise --max_consecutive_skips (now "
                f"{self.max_consecutive_skips}). {self.summary()}"
            )
        if self.skipped[phase] == 1 or self.skipped[phase] % self.warn_every == 0:
            self.warn(
                f"Step {step}: {phase} update skipped, non-finite gradient norm{norm}; "
                f"{self.consecutive[phase]} in a row, {self.skipped[phase]} of {self.updates[phase]} so far "
                f"(warnings every {self.warn_every} skips; the run stops after {self.max_consecutive_skips} in a row)."
            )

    def update(
        self,
        phase: str,
        step: int,
        optimizer: torch.optim.Optimizer,
        grad_norm: torch.Tensor | float,
        lr_scheduler=None,
        ema=None,
        parameters=None,
        scaler=None,
    ) -> tuple[bool, float]:
        """One update of `phase` at training step `step`: [`step_if_finite`] (the arguments after `step`), then
        [`record`]. Returns `(skipped, grad_norm)`, the norm as a float."""
        skipped = step_if_finite(optimizer, grad_norm, lr_scheduler, ema, parameters, scaler)
        grad_norm = float(grad_norm_value(grad_norm))
        self.record(phase, skipped, step, grad_norm)
        return skipped, grad_norm

    def summary(self) -> str:
        """E.g. `"Skipped updates: generator 3 of 100 (longest streak 2), discriminator 0 of 100."`"""
        if not self.updates:
            return "Skipped updates: none recorded."
        parts = [
            f"{phase} {self.skipped[phase]} of {self.updates[phase]}"
            + (f" (longest streak {self.longest[phase]})" if self.skipped[phase] else "")
            for phase in self.updates
        ]
        return "Skipped updates: " + ", ".join(parts) + "."

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        return {
            "updates": dict(self.updates),
            "skipped": dict(self.skipped),
            "consecutive": dict(self.consecutive),
            "longest": dict(self.longest),
            "streak_start": dict(self.streak_start),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("updates", "skipped", "consecutive", "longest", "streak_start"):
            setattr(self, name, dict(state[name]))


def check_finite_state_dict(state_dict: Mapping, where: str) -> None:
    r"""
    Raise a `ValueError` naming `where` (e.g. the checkpoint file) and the first tensor holding NaN or Inf.

    Nested mappings and lists (an optimizer's `state_dict`) are walked; keys are joined with dots. Integer and bool
    tensors are skipped.
    """

    def walk(value, name):
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                nan = int(torch.isnan(value).sum())
                inf = int(torch.isinf(value).sum())
                raise ValueError(
                    f"{where}: tensor {name!r} {tuple(value.shape)} holds {nan} NaN and {inf} Inf of "
                    f"{value.numel()} values. Refusing non-finite weights: the run had diverged before this "
                    "checkpoint; resume from an earlier one."
                )
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {name!r} is {value}. Refusing non-finite state; resume from an earlier one.")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{name}.{index}" if name else str(index))

    walk(state_dict, "")


def loss_gradient_norms(losses: Mapping[str, torch.Tensor | None], parameters) -> dict[str, float]:
    r"""
    `{name: ||d loss / d parameters||_2}` for each (already weighted) loss part, e.g. the generator's
    `scm_lambda L_sCM` and `adversarial_lambda L_adv`: are the two gradients comparable in size? Uses
    `torch.autograd.grad` with `retain_graph=True` (no `.grad` is touched; the caller's backward of the total loss
    still works afterwards), so it costs about one extra backward per part: call it every few steps. A part that is
    `None` or does not reach `parameters` gets 0. Local to the process (not all-reduced, not for sharded parameters).
    """
    parameters = [p for p in parameters if p.requires_grad]
    norms = {}
    for name, loss in losses.items():
        if loss is None or not loss.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().square().sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
    "SkipMonitor",
    "check_finite_state_dict",
    "grad_norm_value",
    "loss_gradient_norms",
    "step_if_finite",
]
