from .scheduling_trigflow import PAPER_TIMESTEP_PRESETS, TrigFlowScheduler, TrigFlowSchedulerOutput


__all__ = ["PAPER_TIMESTEP_PRESETS", "TrigFlowScheduler", "TrigFlowSchedulerOutput"]
