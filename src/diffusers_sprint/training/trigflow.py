"""Moved to [`diffusers_sprint.trigflow`] (the model uses it too); this module keeps the old import path working."""

from ..trigflow import *  # noqa: F403
from ..trigflow import __all__  # noqa: F401
