#!/usr/bin/env python
"""Train the prompt-adherence classifier: 32x32 emoji image -> one of the 8 Unicode categories.

    python examples/toy/train_emoji_classifier.py
    # writes src/diffusers_sprint/toy/emoji_classifier.safetensors

A stratified 15% of the emoji is held out; the held-out accuracy is printed and stored in the weights' metadata.
Augmentations mimic what generated images get wrong: shifts, blur, noise, contrast/brightness drift (no hue change:
colour is part of an emoji's identity, no flips: arrows have a direction).

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from toy_common import set_up, training_parser  # examples/toy/toy_common.py, beside this script

from diffusers_sprint.toy import CATEGORIES, load_emoji_dataset
from diffusers_sprint.toy.classifier import WEIGHTS_PATH, EmojiClassifier, images_to_tensor, save_classifier


def parse_args(argv=None):
    p = training_parser(__doc__, steps=2000, batch_size=64, lr=2e-3)
    p.add_argument("--output", default=WEIGHTS_PATH)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--holdout", type=float, default=0.15)
    return p.parse_args(argv)


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        held.extend(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False).tolist())
    held = np.array(sorted(held))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x in [-1, 1], white background = 1."""
    n = len(x)
    # shift by up to 3 px (pad with background white)
    padded = F.pad(x, (3, 3, 3, 3), value=1.0)
    dx, dy = torch.randint(0, 7, (2, n), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])
    # random blur on half the batch
    blur = torch.rand(n, generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16
        kernel = kernel.expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    # contrast / brightness drift and noise
    scale = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return (x * scale + shift + noise).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = sum((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum().item() for i in range(0, len(x), 512))
    return correct / len(x)


def main(argv=None):
    args = parse_args(argv)
    set_up(args)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()

    dataset = load_emoji_dataset(resolution=32)
    x = images_to_tensor(dataset["image"])
    labels = np.array([CATEGORIES.index(c) for c in dataset["category"]])
    y = torch.from_numpy(labels)
    train, held = stratified_split(labels, args.holdout, args.seed)
    print(f"{len(train)} train / {len(held)} held-out emoji, {len(CATEGORIES)} categories")

    # class-balanced sampling: "People & Body" alone is 24% of the data
    counts = np.bincount(labels[train], minlength=len(CATEGORIES))
    weights = torch.from_numpy(1.0 / counts[labels[train]]).float()

    model = EmojiClassifier(width=args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    for step in range(args.steps):
        model.train()
        idx = train[torch.multinomial(weights, args.batch_size, replacement=True, generator=generator).numpy()]
        logits = model(augment(x[idx], generator))
        loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            held_acc = accuracy(model, x[held], y[held])
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out acc {held_acc:.3f}  {time.time() - start:.0f}s")

    train_acc, held_acc = accuracy(model, x[train], y[train]), accuracy(model, x[held], y[held])
    all_acc = accuracy(model, x, y)
    seconds = round(time.time() - start)
    print(f"train acc {train_acc:.3f}  held-out acc {held_acc:.3f}  all {all_acc:.3f}  ({seconds}s)")
    save_classifier(
        model,
        args.output,
        metadata={
            "train_accuracy": round(train_acc, 4),
            "heldout_accuracy": round(held_acc, 4),
            "dataset_accuracy": round(all_acc, 4),
            "heldout_indices": held.tolist(),
            "chance_accuracy": round(float(np.bincount(labels).max() / len(labels)), 4),
            "training_seconds": seconds,
            "args": vars(args),
        },
    )
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
