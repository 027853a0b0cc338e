from .attention_processor import forward_ad_is_active, jvp_safe_attention
from .transformer_sana_sprint import (
    SanaSprintTransformer2DModel,
    SanaSprintTransformerOutput,
    flow_time_from_trigflow,
    unwrap_controlnet,
)
from .trigflow_model import TrigFlowModel, as_trigflow_model, unwrap_transformer, unwrap_trigflow_controlnet


__all__ = [
    "SanaSprintTransformer2DModel",
    "SanaSprintTransformerOutput",
    "TrigFlowModel",
    "as_trigflow_model",
    "flow_time_from_trigflow",
    "forward_ad_is_active",
    "jvp_safe_attention",
    "unwrap_controlnet",
    "unwrap_transformer",
    "unwrap_trigflow_controlnet",
]
