"""The stock-diffusers folder layout: what our pipelines write loads with diffusers alone.

A released SANA-Sprint student is diffusers' `SanaTransformer2DModel` (same keys, same config) sampled by diffusers'
`SCMScheduler`; our `SanaSprintTransformer2DModel` and `TrigFlowScheduler` are drop-in supersets of the two. So a
pipeline folder names diffusers' classes in `model_index.json` whenever stock diffusers computes the same thing, and
our pipelines map those names back to our classes when loading (through diffusers' own component loader).
"""

import inspect

import torch
from diffusers import SanaTransformer2DModel, SCMScheduler
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

from ..models.transformer_sana_sprint import SanaSprintTransformer2DModel
from ..schedulers.scheduling_trigflow import TrigFlowScheduler


# model_index.json entries: stock diffusers <-> ours.
STOCK_ENTRIES = {
    "transformer": ("diffusers", "SanaTransformer2DModel"),
    "scheduler": ("diffusers", "SCMScheduler"),
}
OUR_ENTRIES = {
    "transformer": _fetch_class_library_tuple(SanaSprintTransformer2DModel),
    "scheduler": _fetch_class_library_tuple(TrigFlowScheduler),
}
_STOCK_TRANSFORMER_ARGS = set(inspect.signature(SanaTransformer2DModel.__init__).parameters) - {"self"}


def stock_layout_blockers(transformer, scheduler) -> list[str]:
    """
    Why stock diffusers' `SanaSprintPipeline` would not give the same images as ours with these components (empty
    when it would): it feeds the flow time `s` to the time embedding as is and always passes a guidance embedding.
    """
    blockers = []
    if isinstance(transformer, SanaSprintTransformer2DModel):
        if not transformer.config.guidance_embeds:
            blockers.append("the transformer has no guidance embedder (`guidance_embeds=False`)")
        if transformer.effective_flow_time_scale != 1.0:
            blockers.append(f"the transformer embeds `{transformer.effective_flow_time_scale} * s`, not `s`")
        if getattr(transformer, "peft_config", None):
            blockers.append("the transformer holds PEFT adapters (fuse and unload them, or use `save_lora_weights`)")
    if isinstance(scheduler, TrigFlowScheduler) and scheduler.config.sampler != "consistency":
        blockers.append(f"the scheduler uses sampler={scheduler.config.sampler!r} (`SCMScheduler` is 'consistency')")
    return blockers


def stock_transformer(transformer: SanaSprintTransformer2DModel) -> SanaTransformer2DModel:
    """
    diffusers' `SanaTransformer2DModel` sharing `transformer`'s weights (no copy), without the training-only logvar
    head; its config holds only the arguments diffusers knows, plus the `quantization_config` of a quantised model
    (torchao, bitsandbytes), which keeps its quantizer so that `save_pretrained` serialises through it.
    """
    config = {key: value for key, value in transformer.config.items() if key in _STOCK_TRANSFORMER_ARGS}
    with torch.device("meta"):
        stock = SanaTransformer2DModel.from_config(config)
    state_dict = {k: v for k, v in transformer.state_dict().items() if not k.startswith("logvar_linear.")}
    stock.load_state_dict(state_dict, strict=True, assign=True)
    quantizer = getattr(transformer, "hf_quantizer", None)
    if quantizer is not None:
        stock.hf_quantizer, stock.is_quantized, stock.quantization_method = (
            quantizer,
            True,
            quantizer.quantization_config.quant_method,
        )
        stock.register_to_config(quantization_config=quantizer.quantization_config)
    return stock.train(transformer.training)


def stock_scheduler(scheduler: TrigFlowScheduler) -> SCMScheduler:
    """diffusers' `SCMScheduler` with the same shared config entries."""
    return SCMScheduler.from_config({k: v for k, v in scheduler.config.items() if k != "sampler"})


def to_our_entries(init_dict: dict) -> dict:
    """Maps the stock `model_index.json` entries of the transformer and scheduler to our classes."""
    for name, stock in STOCK_ENTRIES.items():
        entry = init_dict.get(name)
        if entry is not None and tuple(entry) == stock:
            init_dict[name] = list(OUR_ENTRIES[name])
    return init_dict
