from .pipeline_sana_sprint import SanaSprintPipeline
from .pipeline_sana_sprint_controlnet import SanaSprintControlNetPipeline
from .pipeline_sana_sprint_img2img import SanaSprintImg2ImgPipeline
from .timestep_search import TimestepSearchResult, tune_timesteps


__all__ = [
    "SanaSprintControlNetPipeline",
    "SanaSprintImg2ImgPipeline",
    "SanaSprintPipeline",
    "TimestepSearchResult",
    "tune_timesteps",
]
