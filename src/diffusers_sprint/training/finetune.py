"""Moved to [`diffusers_sprint.training.teacher`] (one module for the teacher stage); kept for old imports."""

from .teacher import (  # noqa: F401
    drop_captions,
    teacher_calibration_inputs,
    teacher_finetune_step,
    use_sana_pipeline_time_convention,
)


__all__ = ["drop_captions", "teacher_calibration_inputs", "teacher_finetune_step", "use_sana_pipeline_time_convention"]
