"""What the toy's training scripts share (`train_toy_teacher.py`, `train_toy_controlnet.py`,
`train_emoji_classifier.py`): the common flags, the learning-rate schedule, caption encoding and one flow-matching
training step. Imported from beside the scripts, as `examples/training_common.py` is by the main ones."""

import argparse
import math

import torch


def training_parser(description: str, steps: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    """A parser with the flags of every toy trainer: `--seed`, `--threads`, `--steps`, `--batch_size`, `--lr`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    return p


def add_flow_training_arguments(p: argparse.ArgumentParser, ema_decay: float = 0.995) -> None:
    """The flow-matching trainers' `--warmup_steps`, `--ema_decay` and `--cfg_dropout`."""
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=ema_decay)
    p.add_argument("--cfg_dropout", type=float, default=0.1)


def set_up(args) -> None:
    """`--threads` and the global seed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`: the factor on the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(embeds, masks)` of `captions` from a `SanaPipeline`'s text encoder, 256 at a time, no prompt instruction."""
    embeds, masks = [], []
    for i in range(0, len(captions), 256):
        e, m, _, _ = pipe.encode_prompt(
            captions[i : i + 256],
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            complex_human_instruction=None,
        )
        embeds.append(e)
        masks.append(m)
    return torch.cat(embeds), torch.cat(masks)


def flow_matching_batch(latents, embeds, masks, null_embed, null_mask, batch_size, cfg_dropout, generator):
    """
    One rectified-flow batch: samples drawn with replacement, captions -> empty prompt with `cfg_dropout`,
    `s ~ U[0, 1]`, `z ~ N(0, I)`, `x_s = (1 - s) x0 + s z` (target `z - x0`).

    Returns `(idx, x0, cond, mask, s, z, x_s)`; `null_embed`, `null_mask` of shape `(L, D)`, `(L,)`.
    """
    idx = torch.randint(len(latents), (batch_size,), generator=generator)
    x0, cond, mask = latents[idx], embeds[idx].clone(), masks[idx].clone()
    drop = torch.rand(batch_size, generator=generator) < cfg_dropout
    cond[drop], mask[drop] = null_embed, null_mask
    s = torch.rand(batch_size, generator=generator)
    z = torch.randn(x0.shape, generator=generator)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * z
    return idx, x0, cond, mask, s, z, x_s


def optimizer_step(loss: torch.Tensor, optimizer, params, ema) -> None:
    """Backward, clip the gradient norm to 1, step, update the EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    ema.step(params)
