"""Training settings declared once: a dataclass field carries its default, help, allowed range and fingerprint rule.

Everything else is derived from the fields: the command line (`RecipeParser`, transformers' `HfArgumentParser` plus
`--config file.yaml|json` and `@file` flag files), the range checks (`check_settings`), the run fingerprint
(`training.fingerprint`) and the flag tables of docs/training.md (`flag_table`). The sections themselves live in
`training.recipe` (and the library configs `SCMLossConfig` / `DistillationConfig`).
"""

import argparse
import dataclasses
import json
import math
import shlex
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from transformers import HfArgumentParser


_KEY = "setting"  # the field-metadata key of a `Setting`
ALWAYS = type("Always", (), {"__repr__": lambda self: "ALWAYS"})()  # `Setting.recorded_unless`: no exception


@dataclass(frozen=True)
class Range:
    """An allowed range: `check(value) -> bool` (element-wise for lists) and the text shown to the user."""

    check: Callable[[Any], bool]
    text: str


def at_least(low, note: str = "") -> Range:
    return Range(lambda v: v >= low, f">= {low}{note}")


def greater_than(low, note: str = "") -> Range:
    return Range(lambda v: v > low, f"> {low}{note}")


def between(low, high, note: str = "", high_open: bool = False) -> Range:
    if high_open:
        return Range(lambda v: low <= v < high, f"in [{low}, {high}){note}")
    return Range(lambda v: low <= v <= high, f"in [{low}, {high}]{note}")


PROBABILITY = between(0, 1)


@dataclass(frozen=True)
class When:
    """A condition on the other settings (`test(args) -> bool`) and the text the docs show for it."""

    text: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Setting:
    """
    What a field of a settings section declares besides its default.

    Args:
        help: One or two sentences for `--help` and the docs' flag table.
        range: The allowed values (`None`: any value of the field's type); checked element-wise for lists.
        choices: The allowed values of a string setting.
        fingerprint: Whether the value enters the run fingerprint (it changes the math of the run): `True`, `False`,
            or a `When` (only when the condition holds, e.g. the LoRA flags only with `--lora_rank`).
        recorded_unless: The fingerprint leaves the setting out at this value (a checkpoint written before the
            setting existed, at its old behaviour, still matches).
        advanced: A research ablation or a speed switch: accepted on the command line and in recipe files, left out
            of `--help` (the docs' table lists it).
        infinity_allowed: `inf` is a valid value (e.g. `--max_grad_norm inf`: no clipping).
        aliases: Older flag names still accepted.
    """

    help: str
    range: Range | None = None
    choices: tuple | None = None
    fingerprint: bool | When = True
    recorded_unless: Any = ALWAYS
    advanced: bool = False
    infinity_allowed: bool = False
    aliases: tuple[str, ...] = ()


def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **declaration) -> dataclasses.Field:
    """A dataclass field that is a training setting (see `Setting` for the keywords)."""
    info = Setting(**declaration)
    if isinstance(default, list):
        default, default_factory = dataclasses.MISSING, (lambda value=tuple(default): list(value))
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: info})


def settings_of(section) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields of a section (class or instance) that are settings, with their declarations."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(section) if _KEY in f.metadata]


def values_of(args, section, **overrides) -> dict:
    """`{name: value}` of `section`'s settings read from `args` (any object with those attributes), then `overrides`;
    for building a section from a parsed command line: `SCMLossConfig(**values_of(args, SCMLossConfig))`."""
    values = {f.name: getattr(args, f.name) for f, _ in settings_of(section) if hasattr(args, f.name)}
    values.update(overrides)
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def setting_errors(values: dict, sections: Sequence, flags: bool = True) -> list[str]:
    """
    One line per invalid value of `values` (`{name: value}`; names not declared by `sections`, and `None` values,
    are skipped): a non-finite float (unless `infinity_allowed` and `+inf`), a value outside its `range` or its
    `choices`. Non-finite values come first (sorted by name), then the others in declaration order. Each line names
    the setting as a flag (`--name must be ... (got ...).`) or, with `flags=False`, as a field (`` `name` must be
    ..., got ....``).
    """

    def line(name, requirement, value):
        if flags:
            return f"--{name} must be {requirement} (got {value!r})."
        return f"`{name}` must be {requirement}, got {value!r}."

    declared = [(f.name, info) for section in sections for f, info in settings_of(section)]
    infinity = {name for name, info in declared if info.infinity_allowed}
    errors, non_finite = [], set()
    for name, value in sorted(values.items()):
        for item in _items(value):
            if isinstance(item, float) and not math.isfinite(item) and not (name in infinity and item == math.inf):
                non_finite.add(name)
                errors.append(line(name, "a finite number", value))
                break
    for name, info in declared:
        value = values.get(name)
        if value is None or name in non_finite:
            continue
        if info.choices is not None and not all(item in info.choices for item in _items(value)):
            errors.append(line(name, f"one of {info.choices}", value))
        elif info.range is not None:
            try:
                valid = all(info.range.check(item) for item in _items(value))
            except TypeError:
                valid = False
            if not valid:
                errors.append(line(name, info.range.text, value))
    return errors


def _has_type(value, annotation) -> bool:
    """Whether `value` fits a setting's annotation: `bool`, `int` (not a bool), `float` (an int too), `str`, a list
    of those (a tuple too), or any of them `| None`."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if options:
        return any(_has_type(value, option) for option in options)
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_settings(section_instance) -> None:
    """Raise a `ValueError` listing every invalid setting of a section instance (a library config's
    `__post_init__`), each named as a field: a value of the wrong type, then `setting_errors`."""
    hints = typing.get_type_hints(type(section_instance))
    values = {f.name: getattr(section_instance, f.name) for f, _ in settings_of(section_instance)}
    errors = [
        f"`{name}` must be of type {hints[name]}, got {value!r}."
        for name, value in values.items()
        if not _has_type(value, hints[name])
    ]
    wrong_type = {name for name in values if not _has_type(values[name], hints[name])}
    errors += setting_errors({k: v for k, v in values.items() if k not in wrong_type}, [type(section_instance)], False)
    if errors:
        raise ValueError(" ".join(errors))


# ---------------------------------------------------------------------------------------------------------------------
# Command line and recipe files
# ---------------------------------------------------------------------------------------------------------------------


def _boolean(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class RecipeParser(HfArgumentParser):
    """
    transformers' `HfArgumentParser` over settings sections, with:

    - only the fields declared with `setting` become flags (a library config's other fields, e.g. a nested config,
      are not settings); `Setting.advanced` ones are hidden from `--help`; `Setting.aliases` are accepted;
    - every boolean takes `--flag`, `--flag true|false`, `--no-flag` and `--no_flag`;
    - `--config recipe.yaml` (or `.json`): a mapping `{setting: value}` read before the command line, whose flags win;
    - `@file`: flags read from a file, one or more per line, split like a shell command line (`#` comments).
    """

    def __init__(self, sections: Sequence, **kwargs):
        kwargs.setdefault("fromfile_prefix_chars", "@")
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        self.sections = tuple(sections)
        super().__init__(self.sections, **kwargs)
        self.add_argument(
            "--config",
            type=str,
            default=None,
            help="A recipe file (YAML or JSON mapping of setting names to values, e.g. examples/configs/*.yaml); "
            "flags on the command line win.",
        )

    def _add_dataclass_arguments(self, dtype):
        group = self.add_argument_group(getattr(dtype, "_argument_group_name", dtype.__name__))
        hints = typing.get_type_hints(dtype)
        for field, info in settings_of(dtype):
            field.type = hints[field.name]
            self._add_setting(group, field, info)

    @staticmethod
    def _add_setting(group, field: dataclasses.Field, info: Setting) -> None:
        help_text = argparse.SUPPRESS if info.advanced else info.help
        clone = dataclasses.field(
            default=field.default,
            default_factory=field.default_factory,
            metadata={
                "help": help_text,
                "aliases": list(info.aliases),
                **({"choices": info.choices} if info.choices else {}),
            },
        )
        clone.name, clone.type = field.name, field.type
        is_bool = field.type is bool or field.type == bool | None
        if is_bool:
            # our own boolean: one value optional, and both negations
            names = [f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])]
            group.add_argument(
                *names, *info.aliases, type=_boolean, nargs="?", const=True, default=field.default, help=help_text
            )
            negations = {f"--no_{field.name}", f"--no-{field.name}", f"--no-{field.name.replace('_', '-')}"}
            group.add_argument(*sorted(negations), action="store_false", dest=field.name, help=argparse.SUPPRESS)
            return
        HfArgumentParser._parse_dataclass_field(group, clone)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        args = self._read_args_from_files(args)  # @file expansion first, so a --config inside a flag file works
        config = _config_path(args)
        if config is not None:
            args = recipe_file_arguments(config, self) + args
        return super().parse_args(args, namespace)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)

    def setting_names(self) -> dict[str, Setting]:
        return {f.name: info for section in self.sections for f, info in settings_of(section)}


def _config_path(args: list[str]) -> str | None:
    path = None
    for i, word in enumerate(args):
        if word == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
    return path


def load_recipe_file(path: str) -> dict:
    """A recipe file's mapping (YAML or JSON by extension); raises naming the file when it is not a mapping."""
    try:
        with open(path, encoding="utf-8") as file:
            values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"--config {path}: cannot be read ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path}: must hold a mapping of setting names to values, not {type(values).__name__}."
        )
    return values


def recipe_file_arguments(path: str, parser: RecipeParser) -> list[str]:
    """The flags a recipe file stands for (`{name: value}` -> `--name value`), checked against the parser's settings:
    an unknown name raises listing it. A list becomes several values; `null` keeps the default of a setting whose
    default is `None`."""
    values = load_recipe_file(path)
    known = parser.setting_names()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {', '.join(unknown)} (see --help or docs/training.md).")
    words = []
    for name, value in values.items():
        if value is None:
            continue
        words.append(f"--{name}")
        words.extend(str(item) for item in _items(value))
    return words


# ---------------------------------------------------------------------------------------------------------------------
# Docs
# ---------------------------------------------------------------------------------------------------------------------


def _shown_default(field: dataclasses.Field, defaults: dict):
    if field.name in defaults:
        value = defaults[field.name]
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return "required"
    else:
        value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "(empty)"
    return "unset" if value is None else str(value)


def _fingerprint_text(info: Setting) -> str:
    if isinstance(info.fingerprint, When):
        text = info.fingerprint.text
    else:
        text = "yes" if info.fingerprint else "no"
    if info.recorded_unless is not ALWAYS and info.fingerprint:
        text += f" (not at {info.recorded_unless})"
    return text


def flag_tables(sections: Sequence, defaults: dict | None = None, skip: Sequence = ()) -> str:
    """Markdown tables of the flags of `sections` (but those in `skip`), one per section under its group name: flag,
    default (`defaults` override the declared ones), allowed values, fingerprint rule, help. Advanced settings (not
    in `--help`) are marked."""
    defaults = defaults or {}
    parts = []
    for section in sections:
        if section in skip:
            continue
        rows = [f"**{getattr(section, '_argument_group_name', section.__name__)}**", ""]
        rows += ["| flag | default | allowed | fingerprint | what |", "| --- | --- | --- | --- | --- |"]
        for field, info in settings_of(section):
            if info.choices:
                allowed = " | ".join(map(str, info.choices))
            elif info.range is not None:
                allowed = info.range.text
            else:
                allowed = ""
            flag = f"`--{field.name}`" + "".join(f" (`{alias}`)" for alias in info.aliases)
            what = ("(advanced) " if info.advanced else "") + info.help
            default = _shown_default(field, defaults)
            cells = [flag, default, allowed, _fingerprint_text(info), what]
            rows.append(
                "| " + " | ".join(cell.replace("|", "\\|") if i else cell for i, cell in enumerate(cells)) + " |"
            )
        parts.append("\n".join(rows))
    return "\n\n".join(parts)
