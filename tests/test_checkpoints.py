"""training.checkpoints: atomic folders, `latest` among complete ones only, pruning after the save, layouts."""

import os

import pytest
import torch

from diffusers_sprint.training.checkpoints import (
    SHARDED_STATE_FOLDER,
    check_checkpoint_layout,
    checkpoint_layout,
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
        save_checkpoint(str(tmp_path), 4, crash, total_limit=1)
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
