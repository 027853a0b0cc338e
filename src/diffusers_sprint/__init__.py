"""diffusers-sprint: SANA-Sprint one-step text-to-image as diffusers-native components."""

from .models import SanaSprintTransformer2DModel, SanaSprintTransformerOutput
from .pipelines import (
    SanaSprintControlNetPipeline,
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    TimestepSearchResult,
    tune_timesteps,
)
from .schedulers import TrigFlowScheduler, TrigFlowSchedulerOutput


__version__ = "0.1.0"
__all__ = [
    "SanaSprintControlNetPipeline",
    "SanaSprintImg2ImgPipeline",
    "SanaSprintPipeline",
    "SanaSprintTransformer2DModel",
    "SanaSprintTransformerOutput",
    "TimestepSearchResult",
    "TrigFlowScheduler",
    "TrigFlowSchedulerOutput",
    "tune_timesteps",
]
