"""Accuracy of the finite-difference tangent against the exact JVP, on the embedded toy teacher.

The student is `build_student(teacher)` of the embedded toy teacher (`diffusers_sprint.toy.TOY_TEACHER_PATH`,
6 layers, 32x4x4 latents); inputs are random latents/noise/captions at fixed TrigFlow times, the direction is the
sCM one (`pf_ode_tangents` of the teacher's CFG velocity, w = 4.5). Reference: `torch.func.jvp` in fp32. Printed:
the relative error `||dF_fd - dF_exact|| / ||dF_exact||` per time `t` and step `delta` (radians of ODE time, the
`SCMLossConfig.finite_difference_step`), one-sided and central, with the forwards in fp32 (what
`trigflow_velocity_finite_difference` does) and, for contrast, under bf16 autocast; and the exact JVP itself under
bf16 autocast.

    python benchmarks/fd_jvp_accuracy.py                  # ~1 CPU-minute
    python benchmarks/fd_jvp_accuracy.py --json fd.json
"""

import argparse
import json
import os
import statistics
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.models import TrigFlowInputs, TrigFlowModel  # noqa: E402
from diffusers_sprint.toy import TOY_TEACHER_PATH  # noqa: E402
from diffusers_sprint.training import build_student  # noqa: E402
from diffusers_sprint.training.scm import pf_ode_tangents, teacher_cfg_velocity  # noqa: E402
from diffusers_sprint.training.tangent import trigflow_velocity_finite_difference, trigflow_velocity_jvp  # noqa: E402
from diffusers_sprint.trigflow import add_trigflow_noise, append_dims  # noqa: E402


SIGMA_DATA = 0.5
TIMES = (0.05, 0.2, 0.5, 0.8, 1.1, 1.4, 1.55)
STEPS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2)


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate.double() - exact.double()).norm() / exact.double().norm()).item()


def bf16_difference(model, x, t, v_x, v_t, conditioning, step, central):
    """The same difference with every forward under bf16 autocast (what the fp32 rule avoids)."""
    h = append_dims(step / v_t, 4)

    def velocity(dx, dt):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x + dx, t + dt, *conditioning[:2], guidance_scale=conditioning[2])[0].float()

    plus = velocity(h * v_x, step)
    if central:
        return (plus - velocity(-h * v_x, -step)) / (2 * h)
    return (plus - velocity(0 * v_x, 0.0)) / h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    teacher = SanaSprintTransformer2DModel.from_pretrained(TOY_TEACHER_PATH, subfolder="transformer")
    teacher.eval().requires_grad_(False)
    student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(args.seed)).eval()
    model = TrigFlowModel(student)
    generator = torch.Generator().manual_seed(args.seed)
    b, c, size = args.batch, teacher.config.in_channels, teacher.config.sample_size
    x0 = SIGMA_DATA * torch.randn(b, c, size, size, generator=generator)
    z = SIGMA_DATA * torch.randn(b, c, size, size, generator=generator)
    embeds = torch.randn(b, 8, teacher.config.caption_channels, generator=generator)
    mask = torch.ones(b, 8, dtype=torch.long)
    mask[::2, 5:] = 0
    null, null_mask = torch.zeros(1, 8, teacher.config.caption_channels), torch.ones(1, 8, dtype=torch.long)
    w = torch.full((b,), 4.5)
    conditioning = (embeds, mask, w)

    rows = []
    for time in TIMES:
        t = torch.full((b,), time)
        x_t = add_trigflow_noise(x0, z, t)
        x = x_t / SIGMA_DATA
        dxt_dt = teacher_cfg_velocity(teacher, x, t, embeds, mask, null, null_mask, w, SIGMA_DATA)
        v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, SIGMA_DATA)
        with torch.no_grad():
            base, exact = trigflow_velocity_jvp(model, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, exact_bf16 = trigflow_velocity_jvp(model, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
            base = model(x, t, embeds, mask, guidance_scale=w)[0]
        row = {"t": time, "exact_jvp_bf16_autocast": relative_error(exact_bf16, exact), "fp32": {}, "bf16": {}}
        for step in STEPS:
            one = trigflow_velocity_finite_difference(
                model, TrigFlowInputs(x, t, *conditioning), v_x, v_t, step=step, base=base
            )
            central = trigflow_velocity_finite_difference(
                model, TrigFlowInputs(x, t, *conditioning), v_x, v_t, step=step
            )
            row["fp32"][step] = {"one_sided": relative_error(one, exact), "central": relative_error(central, exact)}
            row["bf16"][step] = {
                "one_sided": relative_error(bf16_difference(model, x, t, v_x, v_t, conditioning, step, False), exact),
                "central": relative_error(bf16_difference(model, x, t, v_x, v_t, conditioning, step, True), exact),
            }
        rows.append(row)
        print(f"t = {time}: done", flush=True)

    for precision in ("fp32", "bf16"):
        for scheme in ("one_sided", "central"):
            print(f"\n{precision} forwards, {scheme}: relative error of dF vs the exact fp32 JVP")
            print(f"{'t (rad)':>8} " + " ".join(f"{f'd={s:g}':>9}" for s in STEPS))
            for row in rows:
                print(f"{row['t']:>8} " + " ".join(f"{row[precision][s][scheme]:9.1e}" for s in STEPS))
            medians = [statistics.median(row[precision][s][scheme] for row in rows) for s in STEPS]
            print(f"{'median':>8} " + " ".join(f"{m:9.1e}" for m in medians))
    print("\nexact JVP under bf16 autocast vs fp32: " + ", ".join(f"{r['exact_jvp_bf16_autocast']:.1e}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": TIMES, "steps": STEPS, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
