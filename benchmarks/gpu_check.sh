#!/usr/bin/env bash
# One-command GPU check (issue 15, item 4): pipeline latency of the released 0.6B/1.6B configs with random weights
# at 1024 px (ours vs diffusers, eager and compiled), the JVP-on-the-math-kernel check and the 0.6B training step
# (exact vs finite-difference vs compiled JVP, sCM and sCM+LADD, D step; time and peak memory), <= 8 minutes on one
# H100/H200, nothing downloaded. Extra arguments go to gpu_check.py (e.g. --checks jvp_math_kernel, --repeats 20).
# Writes gpu_check.json next to where it is run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" "$root/benchmarks/gpu_check.py" --json gpu_check.json "$@"
# Training on several GPUs (DDP and FSDP2, random-weight 0.6B teacher at 512 px, with an exact-resume check); it says
# so and exits 1 on a machine with a single GPU.
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" "$root/benchmarks/gpu_train_smoke.py" --json gpu_train_smoke.json
