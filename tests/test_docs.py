"""The docs that are generated from the code stay equal to it: the flag tables of docs/training.md."""

from pathlib import Path

from diffusers_sprint.training.recipe import FLAG_REFERENCE_MARKERS, flag_reference


DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_flag_tables_match_the_settings():
    text = (DOCS / "training.md").read_text()
    start, end = (text.index(marker) for marker in FLAG_REFERENCE_MARKERS)
    documented = text[start : end + len(FLAG_REFERENCE_MARKERS[1])]
    assert documented == flag_reference(), (
        "docs/training.md's flag tables differ from the settings: run "
        "`python -m diffusers_sprint.training.recipe docs/training.md`"
    )
