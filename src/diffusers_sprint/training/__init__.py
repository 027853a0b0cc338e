"""Pure training building blocks for SANA-Sprint distillation (no accelerate inside)."""

from .trigflow import MAX_TIME, add_trigflow_noise, denoise_trigflow, replace_with_max_time, sample_trigflow_time


__all__ = ["MAX_TIME", "add_trigflow_noise", "denoise_trigflow", "replace_with_max_time", "sample_trigflow_time"]
