"""`make demo-controlnet` (examples/toy/demo_controlnet.py) end to end on a subset: `--quick` (32 rows, 2 joint
ControlNet-distillation iterations on one process, 4 evaluation samples, 1 seed) writes the metrics, the grid and a
`SanaSprintControlNetPipeline` folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffusers_sprint import SanaSprintControlNetPipeline


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "toy" / "demo_controlnet.py"
SAMPLERS = {
    "teacher-20",
    "student-1",
    "student-2",
    "student-4",
    "teacher-20 without ControlNet",
    "student-1 at controlnet_conditioning_scale 0",
}


def test_demo_controlnet_quick(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "DIFFUSERS_SPRINT_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO / "src"),
    }
    output = tmp_path / "out"
    grid = tmp_path / "grid.png"
    command = [sys.executable, str(DEMO), "--quick", "--num_processes", "1", "--threads", "1"]
    command += ["--output_dir", str(output), "--grid", str(grid)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["samplers"]) == SAMPLERS
    for name, row in metrics["samplers"].items():
        assert 0 <= row["f1_mean"] <= 1 and len(row["per_seed"]) == 1, name
        assert ("fid_mean" in row) == (name in {"teacher-20", "student-1", "student-2", "student-4"}), name
    assert metrics["samplers"]["teacher-20"]["f1_ratio_to_teacher"] == 1.0
    width, height = Image.open(grid).size
    assert height == 5 * 96 + 4 * 6 and (width - 120) % 96 == 0  # rows: condition, teacher, students 1/2/4
    pipe = SanaSprintControlNetPipeline.from_pretrained(output / "student")
    assert pipe.controlnet.config.num_layers == 3
