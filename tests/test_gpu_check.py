"""benchmarks/gpu_check.py --smoke: the GPU check's code paths on tiny configs on the CPU, so the script cannot rot."""

import json
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_check  # noqa: E402
import sana_configs  # noqa: E402


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "report.json"
    report = gpu_check.main(["--smoke", "--device", "cpu", "--json", str(path)])
    assert json.loads(path.read_text())["rows"] == report["rows"]
    return report


def rows_of(report, check):
    return [row for row in report["rows"] if row["check"] == check]


def test_smoke_passes_every_check(smoke_report):
    assert smoke_report["failures"] == {}
    assert smoke_report["all_ok"]
    assert list(smoke_report["durations_s"]) == list(gpu_check.CHECKS)


def test_smoke_pipeline_latency_covers_eager_and_compiled(smoke_report):
    rows = rows_of(smoke_report, "pipeline_latency")
    parity = [row for row in rows if row["metric"] == "max abs image diff"]
    assert len(parity) == 2  # 1 and 4 steps
    assert all(row["ours"] <= 1e-4 and row["ok"] for row in parity)  # fp32: ours == diffusers on the same weights
    (compiled,) = [row for row in rows if row["metric"] == "graphs compiled"]
    assert compiled["ours"] > 0 and compiled["ok"]  # Dynamo really traced the blocks
    timed = [row for row in rows if row["metric"].startswith("ms")]
    cases = {row["case"].split(", ", 1)[1] for row in timed}
    assert cases == {
        f"{scope}, {mode}"
        for scope in ("transformer forward", "pipeline 1 step(s)", "pipeline 4 step(s)")
        for mode in ("eager", "compiled")
    }
    for row in timed:
        assert row["ours"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])


def test_smoke_jvp_picks_the_math_kernel_by_itself(smoke_report):
    rows = {row["case"].split(", ", 1)[1]: row for row in rows_of(smoke_report, "jvp_math_kernel")}
    fd = rows["torch.func.jvp(trigflow_forward), default settings"]
    assert fd["ours"] < 2e-2 and fd["ok"]
    assert rows["JVP primal vs plain forward"]["ours"] < 1e-4
    # The control: diffusers' stock model has no way to the math kernel and fails in forward mode on the CPU.
    control = rows["control: torch.func.jvp on diffusers' stock transformer"]
    assert control["metric"] == "stock model raised"
    assert "forward AD" in control["note"]
    assert rows["JVP under bf16 autocast vs fp32 JVP"]["ok"]


def test_a_crashing_check_is_reported_not_hidden(monkeypatch):
    def broken(context):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.CHECKS, "broken", broken)
    report = gpu_check.main(["--smoke", "--device", "cpu", "--checks", "broken"])
    assert not report["all_ok"]
    assert report["rows"][0]["metric"] == "crashed" and "boom" in report["rows"][0]["note"]
    assert "RuntimeError: boom" in report["failures"]["broken"]


def test_registry_and_arguments_are_checked(capsys):
    with pytest.raises(ValueError, match="already registered"):
        gpu_check.register_check("pipeline_latency")(lambda context: [])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "no_such_check"])
    assert (
        "--checks: unknown ['no_such_check']; allowed: ['pipeline_latency', 'jvp_math_kernel']"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "2B"])
    assert "Unknown model '2B'; allowed:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--image-size must be a multiple of 32, got 100"):
        gpu_check.make_context(gpu_check.parse_args(["--image-size", "100"]))


def test_ours_and_diffusers_share_the_weight_tensors():
    ours, reference = gpu_check.make_transformers(sana_configs.TINY_TRANSFORMER, "cpu", torch.float32)
    assert (
        type(ours).__name__ == "SanaSprintTransformer2DModel" and type(reference).__name__ == "SanaTransformer2DModel"
    )
    ours_tensors = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        assert ours_tensors[name].data_ptr() == parameter.data_ptr(), name
    assert len(ours_tensors) == len(dict(reference.named_parameters()))
