"""The run fingerprint kept in every checkpoint: the settings that change the math of a run.

Which settings enter it is declared with each setting (`Setting.fingerprint`, `Setting.recorded_unless`); this module
only reads those declarations. Resuming with a different value would continue another run's weights under this run's
recipe, so the training scripts refuse it, listing each difference (`compare_fingerprints`).
"""

import json
import os

from .recipe import ALL_SECTIONS
from .settings import ALWAYS, When, settings_of


FINGERPRINT_NAME = "run_fingerprint.json"

# Settings the scripts no longer have, with the value they now always use: a checkpoint that recorded it resumes.
_RETIRED = {"head_kernel_size": 9, "head_virtual_batch_size": 8}
# Settings recorded under an older name (the flag name is kept as an alias): old checkpoints compare under the new one.
_RENAMED = {"jvp_step": "finite_difference_step", "cfg_null_mask": "null_branch_mask"}


def _json_value(value):
    """Tuples become lists, so a fingerprint equals itself after a JSON round trip."""
    return json.loads(json.dumps(value))


def _recorded(info, args, value) -> bool:
    rule = info.fingerprint
    if isinstance(rule, When):
        if not rule.test(args):
            return False
    elif not rule:
        return False
    return info.recorded_unless is ALWAYS or value != info.recorded_unless


def run_fingerprint(args, num_processes: int | None = None, sections=ALL_SECTIONS) -> dict:
    r"""
    The settings (of `sections`: by default every script's) that change the math of the run, read from `args`, as a
    JSON-ready `{name: value}` with `args.stage` (the script) under `"stage"`. A setting enters when its declaration
    says so (conditions such as "only with --lora_rank" or "not at its old default" included); a setting `args` lacks
    is left out.
    With `num_processes`, `gradient_accumulation_steps` is replaced by `global_batch_size` (`train_batch_size x
    accumulation x processes`), which is what a layout change must keep (see `training.seeding`).
    """
    fingerprint = {"stage": getattr(args, "stage", None)} if hasattr(args, "stage") else {}
    for section in sections:
        for field, info in settings_of(section):
            if hasattr(args, field.name) and _recorded(info, args, getattr(args, field.name)):
                fingerprint[field.name] = _json_value(getattr(args, field.name))
    if num_processes is not None and "train_batch_size" in fingerprint:
        accumulation = fingerprint.pop("gradient_accumulation_steps", 1)
        fingerprint["global_batch_size"] = fingerprint["train_batch_size"] * accumulation * int(num_processes)
    return fingerprint


def compare_fingerprints(saved: dict, current: dict) -> list[str]:
    r"""
    Human-readable differences between a checkpoint's fingerprint and this run's, one line per setting, e.g.
    `"--learning_rate: 0.0001 in the checkpoint, 0.001 now"`. Empty when they agree. A removed setting (`_RETIRED`)
    saved at the value the script now always uses agrees; one saved under its older name (`_RENAMED`) is compared
    under the new one.
    """
    saved = {_RENAMED.get(name, name): value for name, value in _json_value(saved).items()}
    current = _json_value(current)
    lines = []
    for name in sorted(set(saved) | set(current)):
        flag = name if name == "global_batch_size" else f"--{name}"
        if name in _RETIRED and name not in current:
            if saved[name] != _RETIRED[name]:
                fixed = _RETIRED[name]
                lines.append(f"{flag}: {saved[name]!r} in the checkpoint, a removed flag (always {fixed!r} now)")
        elif name not in current:
            lines.append(f"{flag}: {saved[name]!r} in the checkpoint, not recorded now")
        elif name not in saved:
            lines.append(f"{flag}: not recorded in the checkpoint, {current[name]!r} now")
        elif saved[name] != current[name]:
            lines.append(f"{flag}: {saved[name]!r} in the checkpoint, {current[name]!r} now")
    return lines


def write_fingerprint(folder: str, fingerprint: dict) -> str:
    """Write `fingerprint` as `folder/run_fingerprint.json`; returns the path."""
    path = os.path.join(folder, FINGERPRINT_NAME)
    with open(path, "w") as file:
        json.dump(fingerprint, file, indent=2, sort_keys=True)
    return path


def read_fingerprint(folder: str) -> dict | None:
    """The fingerprint saved in `folder`, or `None` when it has none; an unreadable file raises naming it."""
    path = os.path.join(folder, FINGERPRINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            fingerprint = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"The run fingerprint {path} cannot be read ({error}); the checkpoint is damaged.") from error
    if not isinstance(fingerprint, dict):
        raise ValueError(f"The run fingerprint {path} holds {type(fingerprint).__name__}, not a JSON object.")
    return fingerprint
