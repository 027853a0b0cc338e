"""The docs that are generated from the code stay equal to it: the flag tables of docs/training.md."""

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

from diffusers_sprint.training.recipe import FLAG_REFERENCE_MARKERS, flag_reference


DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_flag_tables_match_the_settings():
    text = (DOCS / "training.md").read_text()
    start, end = (text.index(marker) for marker in FLAG_REFERENCE_MARKERS)
    documented = text[start : end + len(FLAG_REFERENCE_MARKERS[1])]
    assert documented == flag_reference(), (
        "docs/training.md's flag tables differ from the settings: run "
        "`python -m diffusers_sprint.training.recipe docs/training.md`"
    )


# ---------------------------------------------------------------------------------------------------------------------
# API tables: every `name(arguments)` in the first column of a docs table is the real signature
# ---------------------------------------------------------------------------------------------------------------------

API_DOCS = ["api.md", "training/scm.md", "training/ladd.md", "training/teacher.md", "training/trigflow.md"]
# where a bare name in a table is looked up, in order
MODULES = [
    "diffusers_sprint.training.scm",
    "diffusers_sprint.training.tangent",
    "diffusers_sprint.training.ladd",
    "diffusers_sprint.training.teacher",
    "diffusers_sprint.training.distill",
    "diffusers_sprint.training",
    "diffusers_sprint.trigflow",
    "diffusers_sprint.models",
    "diffusers_sprint",
]


def _resolve(dotted: str):
    for module_name in MODULES:
        obj = importlib.import_module(module_name)
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    if "." in dotted:  # `tangent.velocity_tangent`, `models.TrigFlowInputs`: a module of the package
        head, rest = dotted.split(".", 1)
        for package in ("diffusers_sprint.training", "diffusers_sprint"):
            try:
                return _resolve_in(importlib.import_module(f"{package}.{head}"), rest)
            except (ImportError, AttributeError):
                continue
    return None


def _resolve_in(module, rest: str):
    obj = module
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def _documented_calls():
    """(doc, name, argument text) of each table row whose first cell starts with `name(...)`."""
    pattern = re.compile(r"^\| `([A-Za-z_][\w.]*)\(([^`]*?)\)(?: -> [^`]*)?`")
    for doc in API_DOCS:
        for line in (DOCS / doc).read_text().splitlines():
            match = pattern.match(line)
            if match and match.group(2).strip() not in ("...", ""):
                yield doc, match.group(1), match.group(2)


def _documented_parameters(text: str):
    """[(name, default or None)] of an argument list, or None when it is an example call, not a signature."""
    try:
        call = ast.parse(f"f({text.replace('*, ', '')})", mode="eval").body
    except SyntaxError:
        return None
    if not all(isinstance(arg, ast.Name) for arg in call.args):
        return None
    parameters = [(arg.id, None) for arg in call.args]
    for keyword in call.keywords:
        try:
            parameters.append((keyword.arg, ast.literal_eval(keyword.value)))
        except ValueError:
            parameters.append((keyword.arg, None))
    return parameters


CALLS = list(_documented_calls())


def test_the_docs_tables_name_api_signatures():
    assert len(CALLS) >= 35  # the tables of API_DOCS


@pytest.mark.parametrize("doc, name, text", CALLS, ids=[f"{d}:{n}" for d, n, _ in CALLS])
def test_documented_signature_matches_the_code(doc, name, text):
    documented = _documented_parameters(text)
    if documented is None:
        pytest.skip(f"{name}({text}) is an example call, not a signature")
    obj = _resolve(name)
    assert obj is not None, f"{doc}: {name} does not exist"
    signature = inspect.signature(obj)
    actual = [p for p in signature.parameters.values() if p.name != "self" and p.kind not in (p.VAR_KEYWORD,)]
    assert [p for p, _ in documented] == [p.name for p in actual][: len(documented)], f"{doc}: {name}{signature}"
    factories = {f.name: f.default_factory for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    for parameter, default in documented:
        if default is not None:
            real = signature.parameters[parameter].default
            if parameter in factories and factories[parameter] is not dataclasses.MISSING:
                real = factories[parameter]()
            assert real == default or (isinstance(real, (tuple, list)) and list(real) == list(default)), (
                f"{doc}: {name}: {parameter}={default!r} documented, {real!r} in the code"
            )
