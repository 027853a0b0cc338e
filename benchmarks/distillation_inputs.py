"""The random distillation inputs and the training script's update, shared by bench_train_step.py and gpu_check.py."""

import torch

from diffusers_sprint.training import DistillationBatch, sample_trigflow_time, step_if_finite
from diffusers_sprint.trigflow import add_trigflow_noise


def random_distillation_inputs(
    batch_size: int,
    channels: int,
    side: int,
    seq_len: int,
    caption_channels: int,
    sigma_data: float,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[DistillationBatch, torch.Tensor, torch.Tensor]:
    """
    One batch of `(batch_size, channels, side, side)` unit-scale latents with random captions of `seq_len` tokens
    (every other caption half padding) and a 4-token null caption, plus a TrigFlow point on it. Returns the
    `DistillationBatch` (latents times `sigma_data`), `x_t / sigma_data` and `t` (radians), drawn in that order from
    `generator`.
    """
    latents = torch.randn(batch_size, channels, side, side, generator=generator, device=device)
    embeds = torch.randn(batch_size, seq_len, caption_channels, generator=generator, device=device)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    mask[::2, seq_len // 2 :] = 0
    null = torch.randn(1, seq_len, caption_channels, generator=generator, device=device)
    null_mask = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    null_mask[:, :4] = 1
    t = sample_trigflow_time(batch_size, device=device, generator=generator)
    z = torch.randn(latents.shape, generator=generator, device=device)
    batch = DistillationBatch(latents * sigma_data, embeds, mask, null, null_mask)
    return batch, add_trigflow_noise(latents, z, t), t


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters) -> bool:
    """The training script's update: backward, clip to 1.0, step unless NaN/Inf (`step_if_finite`); True if skipped."""
    parameters = [p for p in parameters if p.requires_grad]
    loss.backward()
    return step_if_finite(optimizer, torch.nn.utils.clip_grad_norm_(parameters, 1.0))
