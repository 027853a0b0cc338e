from .pipeline_sana_sprint import SanaSprintPipeline
from .pipeline_sana_sprint_controlnet import SanaSprintControlNetPipeline


__all__ = ["SanaSprintControlNetPipeline", "SanaSprintPipeline"]
