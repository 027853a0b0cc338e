import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


# No Hub, ever: pytest-socket (see pyproject addopts) blocks sockets; these make the HF libraries fail fast too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models on a shared 2-core machine: OpenMP spin-waiting across threads costs 10-50x; one thread is fastest.
torch.set_num_threads(1)

# tests/fixtures/: the tiny models, the stand-in Hub and the training-script runs as fixtures, and plain helpers that
# several test files share (imported from there: `from fixtures.script_runs import run_script`).
pytest_plugins = [
    "fixtures.tiny_models",
    "fixtures.hub_stand_in",
    "fixtures.script_runs",
    "fixtures.parameter_counts",
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load_module(path: str, name: str | None = None, siblings: tuple[str, ...] = ()):
    """`REPO/path` imported as module `name` (default: the file's stem), once, like `import`: it is registered in
    `sys.modules`, and a second load of the same file under the same name returns it. `siblings` are modules the file
    imports from beside it (examples/toy/toy_common.py), loaded first the same way."""
    file = REPO / path
    for sibling in siblings:
        _load_module(str(file.parent.relative_to(REPO) / f"{sibling}.py"))
    name = name or file.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == file:
        return loaded
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="session")
def load_module():
    """Imports a repository script that is in no package (benchmarks/, examples/), by its path from the repository:
    `load_module("benchmarks/gpu_check.py")`, `load_module("examples/train_sana_sprint.py", name="train_for_x")`,
    `load_module("examples/toy/train_toy_controlnet.py", siblings=("toy_common",))`."""
    return _load_module
