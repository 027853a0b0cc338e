from ..trigflow import flow_time_from_trigflow
from .attention_processor import (
    Float32SanaLinearAttnProcessor,
    forward_ad_is_active,
    jvp_safe_attention,
    set_fp32_linear_attention,
)
from .modeling_utils import unwrap_model
from .transformer_sana_sprint import (
    SanaSprintTransformer2DModel,
    SanaSprintTransformerOutput,
    checkpoint_block,
    unwrap_controlnet,
)
from .trigflow_model import (
    TrigFlowInputs,
    TrigFlowModel,
    as_trigflow_model,
    unwrap_transformer,
    unwrap_trigflow_controlnet,
)


__all__ = [
    "Float32SanaLinearAttnProcessor",
    "SanaSprintTransformer2DModel",
    "SanaSprintTransformerOutput",
    "TrigFlowInputs",
    "TrigFlowModel",
    "as_trigflow_model",
    "checkpoint_block",
    "flow_time_from_trigflow",
    "forward_ad_is_active",
    "jvp_safe_attention",
    "set_fp32_linear_attention",
    "unwrap_controlnet",
    "unwrap_model",
    "unwrap_transformer",
    "unwrap_trigflow_controlnet",
]
