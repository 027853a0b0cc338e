from .pipeline_sana_sprint import SanaSprintPipeline
from .pipeline_sana_sprint_img2img import SanaSprintImg2ImgPipeline


__all__ = ["SanaSprintImg2ImgPipeline", "SanaSprintPipeline"]
