from .pipeline_sana_sprint import SanaSprintPipeline


__all__ = ["SanaSprintPipeline"]
