"""training.checkpoints: atomic folders, `latest` among complete ones only, pruning after the save, layouts."""

import errno
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from diffusers_sprint.training import checkpoints
from diffusers_sprint.training.checkpoints import (
    SHARDED_STATE_FOLDER,
    check_checkpoint_layout,
    checkpoint_layout,
    incomplete_path,
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
    save_checkpoint,
)
from diffusers_sprint.training.sharding import save_sharded_state


def _write(payload: str):
    def write(folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "state.txt"), "w") as file:
            file.write(payload)

    return write


def test_save_renames_only_when_complete_and_latest_ignores_everything_else(tmp_path):
    seen = {}

    def write(folder):
        _write("two")(folder)
        seen["listing"] = sorted(os.listdir(tmp_path))  # while writing: only the hidden temporary folder

    path = save_checkpoint(str(tmp_path), 2, write)
    assert seen["listing"] == [".checkpoint-2.incomplete"]
    assert path == str(tmp_path / "checkpoint-2") and (tmp_path / "checkpoint-2" / "state.txt").read_text() == "two"
    assert not (tmp_path / ".checkpoint-2.incomplete").exists()
    for stray in ("checkpoint-8.bak", "checkpoint-x", ".checkpoint-9.incomplete", "checkpoint-10-copy"):
        (tmp_path / stray).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a folder")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_a_failed_write_leaves_no_checkpoint_and_the_next_save_cleans_up(tmp_path):
    def crash(folder):
        _write("partial")(folder)
        raise KeyboardInterrupt  # a kill mid-save (the real SIGKILL test is in test_train_script.py)

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 3, crash)
    assert latest_checkpoint(str(tmp_path)) is None and (tmp_path / ".checkpoint-3.incomplete").exists()
    save_checkpoint(str(tmp_path), 3, _write("three"))  # the same step again: the leftover is replaced
    assert (tmp_path / "checkpoint-3" / "state.txt").read_text() == "three"
    (tmp_path / ".checkpoint-4.incomplete").mkdir()
    assert remove_incomplete_checkpoints(str(tmp_path)) == [".checkpoint-4.incomplete"]


def test_pruning_keeps_the_newest_complete_checkpoints_after_the_new_one_exists(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, _write(str(step)), total_limit=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 3]

    def crash(folder):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(str(tmp_path), 4, crash, total_limit=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 3]  # nothing pruned before step 4 is complete
    save_checkpoint(str(tmp_path), 3, _write("again"), total_limit=5)  # re-saving an existing step replaces it
    assert (tmp_path / "checkpoint-3" / "state.txt").read_text() == "again"
    with pytest.raises(ValueError, match="total_limit"):
        save_checkpoint(str(tmp_path), 5, _write("5"), total_limit=0)


def test_a_run_reads_only_its_own_checkpoint_layout_and_names_both(tmp_path):
    sharded, full = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    save_sharded_state(str(sharded / SHARDED_STATE_FOLDER), {"student": torch.nn.Linear(2, 2)}, {})  # one process
    (full / "transformer").mkdir(parents=True)
    assert (checkpoint_layout(str(sharded)), checkpoint_layout(str(full))) == ("sharded", "full")
    check_checkpoint_layout(str(sharded), sharded=True)
    check_checkpoint_layout(str(full), sharded=False)
    sharded_text = "FSDP2: DCP shards of models, optimizers and EMA in `sharded/`, any process count"
    full_text = "unsharded: the trained weights as safetensors files, the optimizers in accelerate's `optimizer*.bin`"
    with pytest.raises(ValueError) as error:
        check_checkpoint_layout(str(sharded), sharded=False)
    assert str(error.value) == (
        f"Checkpoint {sharded} has the 'sharded' layout ({sharded_text}), but this run reads the 'full' layout "
        f"({full_text}). Resume it with FSDP2 (--fsdp or an FSDP2 accelerate config), on any number of processes."
    )
    with pytest.raises(ValueError) as error:
        check_checkpoint_layout(str(full), sharded=True)
    assert str(error.value) == (
        f"Checkpoint {full} has the 'full' layout ({full_text}), but this run reads the 'sharded' layout "
        f"({sharded_text}). Resume it without FSDP2 (no --fsdp, DDP or one process)."
    )


def test_a_lowered_limit_prunes_before_the_new_checkpoint_is_written(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, _write(str(step)))
    seen = {}

    def write(folder):
        seen["complete"] = [step for step, _ in list_checkpoints(str(tmp_path))]
        _write("4")(folder)

    save_checkpoint(str(tmp_path), 4, write, total_limit=2)  # resumed with --checkpoints_total_limit 2
    assert seen["complete"] == [2, 3]  # room made first, the newest kept
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [3, 4]


def _no_space_message(output_dir, step, error_text, latest):
    return (
        f"[Errno 28] No space left in {output_dir} for checkpoint-{step} (0.0 MiB free; {error_text}). The run "
        f"can resume from {latest}: the incomplete .checkpoint-{step}.incomplete is ignored and removed at the next "
        "start. Free space or lower --checkpoints_total_limit (older checkpoints are then pruned before the next "
        "save) and resume with --resume_from_checkpoint latest."
    )


def _torch_save_failure():
    """What `torch.save` raises on a full disk: no errno, no path (seen on a full tmpfs, torch 2.13)."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None


@pytest.mark.parametrize(
    "failure, text",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "OSError: [Errno 28] No space left on device"),
        (None, "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        (
            CheckpointException("dcp.save", {1: (OSError(errno.ENOSPC, "No space left on device"), [])}),
            "OSError: [Errno 28] No space left on device",
        ),
    ],
    ids=["enospc", "torch_save", "dcp"],
)
def test_a_full_disk_says_so_names_the_folder_and_stays_resumable(tmp_path, monkeypatch, failure, text):
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 0)
    save_checkpoint(str(tmp_path), 1, _write("one"))

    def write(folder):
        _write("partial")(folder)
        if failure is None:
            _torch_save_failure()
        raise failure

    with pytest.raises(OSError) as error:
        save_checkpoint(str(tmp_path), 2, write)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value) == _no_space_message(tmp_path, 2, text, tmp_path / "checkpoint-1")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert os.path.isdir(incomplete_path(str(tmp_path), 2))


def test_an_io_failure_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 10 * 2**20)

    def write(folder):
        _torch_save_failure()

    with pytest.raises(RuntimeError, match="inline_container.cc"):
        save_checkpoint(str(tmp_path), 1, write)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts need Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a failed torch.save may hold its file


def _torch_write(megabytes: float):
    def write(folder):
        os.makedirs(folder, exist_ok=True)
        torch.save({"weights": torch.zeros(int(megabytes * 2**18))}, os.path.join(folder, "state.pt"))  # fp32

    return write


def test_a_real_full_disk_and_a_lowered_limit_let_the_run_continue(tiny_disk):
    """On a 2 MiB tmpfs: 3 checkpoints of 0.55 MiB fill it; the 4th says "No space left in <dir>", leaves the 3rd
    as the latest, and saving again with the limit lowered to 1 prunes first and succeeds."""
    output_dir = str(tiny_disk)
    for step in (1, 2, 3):
        save_checkpoint(output_dir, step, _torch_write(0.55), total_limit=3)
    with pytest.raises(OSError, match=f"^\\[Errno 28\\] No space left in {output_dir} for checkpoint-4 ") as error:
        save_checkpoint(output_dir, 4, _torch_write(0.55), total_limit=3)
    assert "RuntimeError: [enforce fail at inline_container.cc" in str(error.value)
    assert latest_checkpoint(output_dir) == os.path.join(output_dir, "checkpoint-3")
    save_checkpoint(output_dir, 4, _torch_write(0.55), total_limit=1)  # resumed with --checkpoints_total_limit 1
    assert [step for step, _ in list_checkpoints(output_dir)] == [4]
    assert torch.load(os.path.join(output_dir, "checkpoint-4", "state.pt"))["weights"].numel() == int(0.55 * 2**18)
