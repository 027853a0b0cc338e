from .attention_processor import forward_ad_is_active, jvp_safe_attention
from .transformer_sana_sprint import (
    SanaSprintTransformer2DModel,
    SanaSprintTransformerOutput,
    flow_time_from_trigflow,
    unwrap_controlnet,
)


__all__ = [
    "SanaSprintTransformer2DModel",
    "SanaSprintTransformerOutput",
    "flow_time_from_trigflow",
    "forward_ad_is_active",
    "jvp_safe_attention",
    "unwrap_controlnet",
]
