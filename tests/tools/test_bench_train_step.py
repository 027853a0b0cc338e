"""benchmarks/bench_train_step.py on a tiny config: the timed variants run, the report adds up, --only is checked."""

import json

import pytest


TINY = ["--layers", "2", "--dim", "32", "--latent", "4", "--batch", "4", "--seq-len", "8", "--caption-channels", "16"]


@pytest.fixture(scope="module")
def bench_train_step(load_module):
    return load_module("benchmarks/bench_train_step.py", siblings=("distillation_inputs",))  # imported from beside it


def test_tiny_run_times_the_selected_variants_and_accounts_for_the_g_step(tmp_path, bench_train_step):
    path = tmp_path / "bench.json"
    pieces = ["teacher_cfg", "jvp", "fwd_bwd_one_and_half", "disc_to_input", "disc_heads", "optimizer"]
    only = ["g_ladd", "g_ladd_two_calls", *pieces]
    argv = [*TINY, "--repeats", "2", "--warmup", "0", "--no-memory", "--json", str(path), "--only", *only]
    assert bench_train_step.main(argv) == 0
    report = json.loads(path.read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"fwd", *only}
    assert all(row["forward_equivalents"] > 0 and len(row["samples_ms"]) >= 2 for row in rows.values())
    # The default G step (fake rows joined to the sCM forward) is accounted for by its pieces; the two-call one
    # needs pieces that were not selected, so it is left out rather than summed from missing numbers.
    assert set(report["breakdown"]) == {"g_ladd"}
    assert "student forward + backward, sCM rows + max-time rows (B + ~B/2, one call)" in report["breakdown"]["g_ladd"]
    assert report["options"]["exact JVP (default), measured"] == rows["g_ladd"]["forward_equivalents"]


@pytest.mark.parametrize(
    "only, message",
    [
        (["g_nope"], "unknown variants"),
        (["g_ladd_fd_compiled_all"], "need --compile"),
        (["g_ladd_fd_compiled_script"], "need --compile"),
    ],
)
def test_only_rejects_unknown_and_uncompiled_variants(only, message, capsys, bench_train_step):
    with pytest.raises(SystemExit):
        bench_train_step.main([*TINY, "--no-memory", "--only", *only])
    assert message in capsys.readouterr().err
