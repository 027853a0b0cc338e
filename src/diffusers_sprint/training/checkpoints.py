"""Checkpoint folders that a killed process can never leave half-written under a name that looks complete.

A checkpoint is written into a hidden temporary folder `.checkpoint-N.incomplete` (by `accelerator.save_state`, on
every process), then renamed to `checkpoint-N` in one `os.rename` once everything is on disk. `--resume_from_checkpoint
latest` only ever considers names matching `checkpoint-<digits>` exactly, so a temporary folder, a stray
`checkpoint-8.bak` or a user's copy never shadows a complete checkpoint. Old checkpoints are pruned after the new
one is complete and, when there are more than the limit (lowered on resume), down to the limit before it is written.
A save that runs out of disk space raises an `OSError` (`ENOSPC`) that says so and names the folder, whatever form
the writer gave it (`torch.save` says only `basic_ios::clear: iostream error`); the run stays resumable from the last
complete checkpoint.

A checkpoint has one of two layouts ([`checkpoint_layout`]): `"sharded"` (an FSDP2 run: DCP shards in `sharded/`,
which any number of processes can read, DCP reshards) or `"full"` (the trained weights as safetensors files beside
accelerate's `optimizer*.bin`). A run reads only its own layout ([`check_checkpoint_layout`]).
"""

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator

from torch.distributed.checkpoint.api import CheckpointException


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"
SHARDED_STATE_FOLDER = "sharded"
"""The folder of a checkpoint that holds `save_sharded_state`'s DCP shards (FSDP2 runs)."""
CHECKPOINT_LAYOUTS = {
    "sharded": f"FSDP2: DCP shards of models, optimizers and EMA in `{SHARDED_STATE_FOLDER}/`, any process count",
    "full": "unsharded: the trained weights as safetensors files, the optimizers in accelerate's `optimizer*.bin`",
}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{int(step)}"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as `(step, path)`, oldest first; anything else is ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or `None`."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


NO_SPACE_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")
"""How writers that drop the `OSError` say it (safetensors: `I/O error: No space left on device (os error 28)`)."""
TORCH_WRITE_FAILURE_TEXTS = ("basic_ios::clear", "iostream error", "inline_container.cc", "file write failed")
"""`torch.save`'s write failures, which give no cause: read as "no space" when the disk is (nearly) full."""
LOW_SPACE_BYTES = 2**20
"""Free space below which a cause-less `torch.save` write failure is taken for a full disk."""


def _wrapped_errors(error: BaseException) -> Iterator[BaseException]:
    """`error` and every error it wraps: causes, contexts and DCP's per-rank failures (`CheckpointException`)."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # {rank: (exception, traceback)}
            stack.append(failure[0] if isinstance(failure, tuple) else failure)


def out_of_space_error(error: BaseException, folder: str) -> BaseException | None:
    """
    The error that says `folder`'s file system is full, if `error` (raised while writing into `folder`) means so:
    an `OSError` `ENOSPC` / `EDQUOT` (or its text) anywhere in what `error` wraps, or `torch.save`'s cause-less
    write failure while less than `LOW_SPACE_BYTES` are free in `folder`. `None` otherwise.
    """
    errors = list(_wrapped_errors(error))
    for current in errors:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
    for current in errors:
        if any(text in str(current) for text in NO_SPACE_TEXTS):
            return current
    for current in errors:
        if any(text in str(current) for text in TORCH_WRITE_FAILURE_TEXTS) and _free_bytes(folder) < LOW_SPACE_BYTES:
            return current
    return None


def _free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def _prune(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def checkpoint_layout(checkpoint: str) -> str:
    """`"sharded"` when `checkpoint` holds a `sharded/` folder (written by an FSDP2 run), else `"full"`."""
    return "sharded" if os.path.isdir(os.path.join(checkpoint, SHARDED_STATE_FOLDER)) else "full"


def check_checkpoint_layout(checkpoint: str, sharded: bool) -> None:
    """
    Raises a `ValueError` naming both layouts unless `checkpoint` has the one a run reads: `"sharded"` when it
    shards with FSDP2 (`sharded=True`, on any number of processes), `"full"` otherwise.
    """
    layout, expected = checkpoint_layout(checkpoint), "sharded" if sharded else "full"
    if layout == expected:
        return
    if layout == "sharded":
        how = "with FSDP2 (--fsdp or an FSDP2 accelerate config), on any number of processes"
    else:
        how = "without FSDP2 (no --fsdp, DDP or one process)"
    raise ValueError(
        f"Checkpoint {checkpoint} has the {layout!r} layout ({CHECKPOINT_LAYOUTS[layout]}), but this run reads the "
        f"{expected!r} layout ({CHECKPOINT_LAYOUTS[expected]}). Resume it {how}."
    )


def incomplete_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f".{checkpoint_name(step)}{INCOMPLETE_SUFFIX}")


def save_checkpoint(
    output_dir: str,
    step: int,
    write: Callable[[str], None],
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
    total_limit: int | None = None,
) -> str:
    """
    Write checkpoint `step` atomically: `write(tmp)` on every process, then (main process) rename `tmp` to
    `checkpoint-<step>` and prune to `total_limit` complete checkpoints.

    Args:
        output_dir (`str`): The run's folder.
        step (`int`): The step the checkpoint holds.
        write (`Callable[[str], None]`): Writes the state into the folder it is given, e.g.
            `accelerator.save_state`. Called on every process with the same path.
        is_main_process (`bool`), wait_for_everyone (`Callable`): The process role and a barrier (accelerate's).
        total_limit (`int`, *optional*): Keep at most this many complete checkpoints (the new one included); when
            there are more (a limit lowered on resume), the oldest go before the new one is written.

    Returns:
        `str`: The final path `output_dir/checkpoint-<step>`.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"`total_limit` must be >= 1 or None, got {total_limit}.")
    tmp = incomplete_path(output_dir, step)
    final = os.path.join(output_dir, checkpoint_name(step))
    if is_main_process:
        if os.path.exists(tmp):  # left by a process killed while saving this very step
            shutil.rmtree(tmp)
        if total_limit is not None:  # a limit lowered on resume: make room before writing (the newest stay)
            _prune(output_dir, total_limit)
    wait_for_everyone()
    try:
        write(tmp)
    except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
        cause = out_of_space_error(error, output_dir)
        if cause is None:
            raise
        latest = latest_checkpoint(output_dir)
        raise OSError(
            errno.ENOSPC,
            f"No space left in {output_dir} for {checkpoint_name(step)} ({_free_bytes(output_dir) / 2**20:.1f} MiB "
            f"free; {type(cause).__name__}: {cause}). The run can resume from "
            f"{latest or 'its start (no complete checkpoint)'}: the incomplete {os.path.basename(tmp)} is ignored "
            "and removed at the next start. Free space or lower --checkpoints_total_limit (older checkpoints are "
            "then pruned before the next save) and resume with --resume_from_checkpoint latest.",
        ) from error
    wait_for_everyone()
    if is_main_process:
        if os.path.exists(final):  # the same step saved again (e.g. a run re-done from an earlier checkpoint)
            stale = os.path.join(output_dir, f".{checkpoint_name(step)}.replaced")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        if total_limit is not None:
            _prune(output_dir, total_limit)
    wait_for_everyone()
    return final


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete the temporary folders of saves that were killed; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in os.listdir(output_dir):
        if name.startswith(".checkpoint-") and (name.endswith(INCOMPLETE_SUFFIX) or name.endswith(".replaced")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


__all__ = [
    "CHECKPOINT_LAYOUTS",
    "CHECKPOINT_PATTERN",
    "SHARDED_STATE_FOLDER",
    "check_checkpoint_layout",
    "checkpoint_layout",
    "checkpoint_name",
    "incomplete_path",
    "out_of_space_error",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_incomplete_checkpoints",
    "save_checkpoint",
]
