"""benchmarks/gpu_train_smoke.py --smoke: the multi-GPU DDP / FSDP2 training check, on 2 gloo processes, cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(subprocess.check_output([sys.executable, "-c", code], text=True))


def test_smoke_mode_runs_ddp_fsdp2_and_an_exact_resume(tmp_path):
    result_file = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_train_smoke.py"), "--smoke", "--json", str(result_file)]
    command += ["--workdir", str(tmp_path / "work"), "--port", str(_free_port())]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result_file.read_text())
    assert report["ok"] and report["num_processes"] == 2
    assert [run["name"] for run in report["runs"]] == ["ddp", "fsdp2", "fsdp2 resumed"]
    assert report["agreement"] < 1e-4 and report["runs"][2]["exact"]
    assert all(len(run["log"]) == 3 for run in report["runs"][:2])
