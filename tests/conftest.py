import os

import pytest
import torch


# No Hub, ever: pytest-socket (see pyproject addopts) blocks sockets; these make the HF libraries fail fast too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models on a shared 2-core machine: OpenMP spin-waiting across threads costs 10-50x; one thread is fastest.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
