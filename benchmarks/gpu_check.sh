#!/usr/bin/env bash
# One-command GPU check (issue 15, item 4): pipeline latency of the released 0.6B/1.6B configs with random weights
# at 1024 px (ours vs diffusers, eager and compiled) and the JVP-on-the-math-kernel check, <= 8 minutes on one
# H100/H200, nothing downloaded. Extra arguments go to gpu_check.py (e.g. --checks jvp_math_kernel, --repeats 20).
# Writes gpu_check.json next to where it is run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$root/benchmarks/gpu_check.py" --json gpu_check.json "$@"
