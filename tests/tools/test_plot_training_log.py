"""examples/toy/plot_training_log.py: the curves script reads training logs and writes one six-panel PNG."""

import json

import numpy as np
import pytest
from PIL import Image


def _load_script(load_module):
    return load_module("examples/toy/plot_training_log.py")


def _write_log(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def test_moving_average_is_the_trailing_mean(load_module):
    script = _load_script(load_module)
    values = list(np.random.default_rng(0).normal(size=37))
    for window in (1, 5, 40):
        expected = [np.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(script.moving_average(values, window), expected, rtol=1e-12, atol=1e-12)


def test_series_keeps_only_the_records_that_carry_the_key(load_module):
    script = _load_script(load_module)
    records = [{"step": 1, "a": 1.0}, {"step": 2}, {"step": 3, "a": None}, {"step": 4, "a": "2.5"}]
    assert script.series(records, "a") == ([1, 4], [1.0, 2.5])


def test_two_logs_give_one_png_of_the_stated_size(tmp_path, load_module):
    script = _load_script(load_module)
    scm_only = [
        {"step": s, "scm_loss": 1.0 / s, "g_norm_mean": 0.1 * s, "logvar_mean": -0.01 * s} for s in range(1, 31)
    ]
    ladd = [dict(r, discriminator_loss=1.0, real_logits_mean=0.1, fake_logits_mean=-0.1) for r in scm_only]
    _write_log(tmp_path / "a.jsonl", scm_only)
    _write_log(tmp_path / "b.jsonl", ladd)
    path = script.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--labels", "scm", "ladd",
                        "--output", str(tmp_path / "out" / "curves"), "--smooth", "5"])  # fmt: skip
    assert path == str(tmp_path / "out" / "curves.png")
    with Image.open(path) as image:
        assert image.size == (15 * 90, 8 * 90)  # figsize (15, 8) inches at dpi 90
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # curves and text drawn, not a blank canvas


def test_bad_input_is_refused_with_the_argument_named(tmp_path, capsys, load_module):
    script = _load_script(load_module)
    _write_log(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="holds no records"):
        script.read_log(str(tmp_path / "empty.jsonl"))
    with pytest.raises(SystemExit):
        script.parse_args(["a.jsonl", "b.jsonl", "--labels", "only_one"])
    assert "--labels needs one label per log" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["a.jsonl", "--smooth", "0"])
    assert "--smooth must be >= 1" in capsys.readouterr().err
