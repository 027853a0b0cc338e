"""benchmarks/gpu_check.py --smoke: the GPU check's code paths on tiny configs on the CPU, so the script cannot rot."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_check(load_module):
    return load_module("benchmarks/gpu_check.py")


@pytest.fixture(scope="module")
def sana_configs(load_module):
    return load_module("benchmarks/sana_configs.py")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, gpu_check):
    path = tmp_path_factory.mktemp("gpu_check") / "report.json"
    report = gpu_check.main(["--smoke", "--device", "cpu", "--json", str(path)])
    assert json.loads(path.read_text())["rows"] == report["rows"]
    return report


def rows_of(report, check):
    return [row for row in report["rows"] if row["check"] == check]


def test_smoke_passes_every_check(smoke_report, gpu_check):
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


def test_smoke_train_step_times_every_variant_with_finite_losses(smoke_report):
    rows = {row["case"].split(", ", 1)[1]: row for row in rows_of(smoke_report, "train_step")}
    steps = [
        f"G {recipe}, {jvp}"
        for recipe in ("sCM", "sCM+LADD")
        for jvp in ("exact JVP", "finite-difference JVP", "exact JVP, compile_jvp")
    ] + ["D step"]
    unit = rows["student forward (no grad), the unit"]
    assert unit["metric"] == "ms" and unit["ours"] > 0
    for name in steps:
        row = rows[name]
        assert row["metric"] == "ms (ratio: forward-equivalents)"
        assert row["ok"], row["note"]  # every loss of the step (warm-up and timed calls) was finite
        assert row["note"].startswith("ok: ") and "losses finite" in row["note"]
        assert row["baseline"] == pytest.approx(unit["ours"])
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"]) and row["ratio"] > 0
        # a training step does at least a forward and a backward of the student: more than one unit forward
        assert row["ratio"] > 1
    ladd = [rows[name] for name in steps if name.startswith("G sCM+LADD")]
    assert all("target <= 9 forward-equivalents" in row["note"] for row in ladd)
    # peak memory is CUDA's max_memory_allocated: no rows on the CPU
    assert not [row for row in rows.values() if row["metric"] == "peak MiB"]


def test_smoke_train_step_agrees_with_the_exact_jvp(smoke_report, gpu_check):
    rows = {row["case"].split(", ", 1)[1]: row for row in rows_of(smoke_report, "train_step")}
    compared = {
        "G sCM, finite-difference JVP": gpu_check.FINITE_DIFFERENCE_TOLERANCE,
        "G sCM+LADD, finite-difference JVP": gpu_check.FINITE_DIFFERENCE_TOLERANCE,
        "G sCM, finite-difference JVP, TF32 off": gpu_check.FINITE_DIFFERENCE_TOLERANCE,
        "G sCM, exact JVP, compile_jvp": gpu_check.COMPILED_JVP_TOLERANCE,
        "G sCM+LADD, exact JVP, compile_jvp": gpu_check.COMPILED_JVP_TOLERANCE,
    }
    for name, tolerance in compared.items():
        row = rows[f"{name} vs exact JVP, first call"]
        assert row["baseline"] == tolerance
        assert row["ok"] and 0 <= row["ours"] <= tolerance, row
        for key in gpu_check.AGREEMENT_LOGS:
            assert key in row["note"]
    # The finite difference is a different tangent (truncation and bf16 rounding of the exact JVP): not equal, close.
    assert rows["G sCM, finite-difference JVP vs exact JVP, first call"]["ours"] > 0
    (compiled,) = [row for name, row in rows.items() if name.endswith("first call (compiles) vs a timed call")]
    assert compiled["ok"] and compiled["ours"] > 0 and compiled["baseline"] > 0
    assert "backend eager: 1 Dynamo graph(s)" in compiled["note"]  # one JVP graph serves both recipes


def test_train_step_restores_the_jvp_compile_backend(smoke_report):
    from diffusers_sprint.training import tangent

    assert tangent.JVP_COMPILE_BACKEND == "inductor"


def test_a_crashing_train_step_variant_is_reported_and_the_others_still_run(monkeypatch, gpu_check):
    """A variant that fails on its first call (on a GPU: e.g. Inductor on the JVP) becomes a failed row; the rest of
    the check still times its steps. Here the finite difference is made to fail and compile_jvp is left out."""
    generator_loss = gpu_check._generator_loss

    def failing_finite_difference(s, config, generator):
        if config.scm.jvp == "finite_difference":
            raise RuntimeError("no finite difference today")
        return generator_loss(s, config, generator)

    monkeypatch.setattr(gpu_check, "_generator_loss", failing_finite_difference)
    argv = ["--smoke", "--device", "cpu", "--checks", "train_step", "--train-repeats", "1", "--no-train-compile-jvp"]
    report = gpu_check.main(argv)
    assert report["failures"] == {} and not report["all_ok"]
    rows = {row["case"].split(", ", 1)[1]: row for row in rows_of(report, "train_step")}
    for recipe in ("sCM", "sCM+LADD"):
        crashed = rows[f"G {recipe}, finite-difference JVP, first call"]
        assert crashed["metric"] == "crashed" and not crashed["ok"]
        assert crashed["note"] == "RuntimeError: no finite difference today"
        assert rows[f"G {recipe}, exact JVP"]["ok"] and rows[f"G {recipe}, exact JVP"]["ratio"] > 1
    assert rows["D step"]["ok"]
    assert not [name for name in rows if "compile_jvp" in name or "vs exact JVP" in name]


def test_a_crashing_check_is_reported_not_hidden(monkeypatch, gpu_check):
    def broken(context):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.CHECKS, "broken", broken)
    report = gpu_check.main(["--smoke", "--device", "cpu", "--checks", "broken"])
    assert not report["all_ok"]
    assert report["rows"][0]["metric"] == "crashed" and "boom" in report["rows"][0]["note"]
    assert "RuntimeError: boom" in report["failures"]["broken"]


def test_registry_and_arguments_are_checked(capsys, gpu_check):
    with pytest.raises(ValueError, match="already registered"):
        gpu_check.register_check("pipeline_latency")(lambda context: [])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "no_such_check"])
    assert (
        "--checks: unknown ['no_such_check']; allowed: ['pipeline_latency', 'jvp_math_kernel', 'train_step']"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--train-batch", "0"])
    assert "--train-batch must be >= 1, got 0." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--train-model", "2B"])
    assert "Unknown model '2B'; allowed:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "2B"])
    assert "Unknown model '2B'; allowed:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--image-size must be a multiple of 32, got 100"):
        gpu_check.make_context(gpu_check.parse_args(["--image-size", "100"]))


def test_ours_and_diffusers_share_the_weight_tensors(gpu_check, sana_configs):
    ours, reference = gpu_check.make_transformers(sana_configs.TINY_TRANSFORMER, "cpu", torch.float32)
    assert (
        type(ours).__name__ == "SanaSprintTransformer2DModel" and type(reference).__name__ == "SanaTransformer2DModel"
    )
    ours_tensors = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        assert ours_tensors[name].data_ptr() == parameter.data_ptr(), name
    assert len(ours_tensors) == len(dict(reference.named_parameters()))
