#!/usr/bin/env python
"""Reference training curves: turn a distillation run's `training_log.jsonl` into PNG plots.

    pip install matplotlib                     # or: pip install -e ".[plots]"
    python examples/toy/plot_training_log.py demo-output/student/training_log.jsonl --output docs/images/training
    python examples/toy/plot_training_log.py run_a/training_log.jsonl run_b/training_log.jsonl --labels a b

`examples/train_sana_sprint.py` writes one JSON object per iteration to `<output_dir>/training_log.jsonl`. This
script draws one figure of six panels (sCM loss, adversarial losses, real/fake logits, sCM g-norm, logvar, gradient
norms), each raw (faint) and smoothed with a moving average of `--smooth` iterations, and saves it as
`<output>.png`. Several logs are drawn on the same axes (one colour each), e.g. to compare a run of yours with the
reference run in docs/demo.md. A panel whose keys a log lacks (an sCM-only run has no discriminator) is left out for
that log.
"""

from __future__ import annotations

import argparse
import json
import os


# (panel title, [(log key, legend label)], y-axis label)
PANELS = (
    ("sCM loss", [("scm_loss", "scm_loss")], "loss"),
    (
        "Adversarial losses",
        [("discriminator_loss", "D hinge loss"), ("adversarial_loss", "G adversarial loss")],
        "loss (D chance: 1)",
    ),
    (
        "Discriminator logits (means)",
        [
            ("real_logits_mean", "real (D step)"),
            ("fake_logits_mean", "fake (D step)"),
            ("fake_logits_mean_g", "fake (G step)"),
        ],
        "logit",
    ),
    ("sCM target norm", [("g_norm_mean", "||g|| before normalisation")], "norm"),
    ("Adaptive weight", [("logvar_mean", "logvar")], "logvar"),
    (
        "Gradient norms on the student",
        [
            ("scm_grad_norm", "sCM part"),
            ("adversarial_grad_norm", "adversarial part"),
            ("generator_grad_norm", "total, before clipping"),
        ],
        "L2 norm",
    ),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="training_log.jsonl files.")
    parser.add_argument("--labels", nargs="+", default=None, help="One legend label per log (default: its folder).")
    parser.add_argument("--output", default="training_curves", help="Output path without extension.")
    parser.add_argument("--smooth", type=int, default=20, help="Moving-average window in iterations (1: none).")
    parser.add_argument("--title", default=None, help="Figure title.")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.logs):
        parser.error(f"--labels needs one label per log: {len(args.logs)} logs, {len(args.labels)} labels.")
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}.")
    return args


def read_log(path: str) -> list[dict]:
    """The records of a training_log.jsonl, in order."""
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `key` (some keys are logged every N steps only)."""
    pairs = [(r["step"], float(r[key])) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first ones average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(logs: dict[str, list[dict]], output: str, smooth: int, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":")
    for axis, (panel, keys, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for run_index, (label, records) in enumerate(logs.items()):
            for key_index, (key, key_label) in enumerate(keys):
                steps, values = series(records, key)
                if not steps:
                    continue
                colour = colours[(run_index * len(keys) + key_index) % len(colours)]
                window = max(1, smooth if len(steps) == len(records) else smooth // 10)  # sparse keys: less
                axis.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
                name = key_label if len(logs) == 1 else f"{label}: {key_label}"
                axis.plot(steps, moving_average(values, window), color=colour, linestyle=styles[key_index % 3],
                          label=name)  # fmt: skip
                drawn = True
        axis.set_title(panel)
        axis.set_xlabel("iteration")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=axis.transAxes)
    if title:
        figure.suptitle(title)
    path = f"{output}.png"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    logs = {label: read_log(path) for label, path in zip(labels, args.logs)}
    path = plot(logs, args.output, args.smooth, args.title)
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    main()
