"""Incomplete LoRA files raise a ValueError naming the file and the missing keys at every LoRA entry point (peft
raised an IndexError before): the pipelines' `load_lora_weights` / `lora_state_dict` and the transformer's
`load_lora_adapter`, from a folder, a file or a state dict."""

import re

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusers_sprint import SanaSprintControlNetPipeline, SanaSprintImg2ImgPipeline, SanaSprintPipeline
from diffusers_sprint.lora_checks import check_lora_state_dict


FILE = "adapter.safetensors"


@pytest.fixture(scope="module")
def lora_weights(make_sprint_transformer):
    """A complete LoRA state dict in diffusers' layout (`transformer.` prefix), rank 4 on `to_q`."""
    model = make_sprint_transformer()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    return {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _without(weights, pattern):
    return {k: v for k, v in weights.items() if not re.search(pattern, k)}


BROKEN = {
    "no lora_B": (lambda w: _without(w, "lora_B"), "missing keys: transformer.transformer_blocks.0.attn1.to_q.lora_B"),
    "no lora_A": (lambda w: _without(w, "lora_A"), "missing keys: transformer.transformer_blocks.0.attn1.to_q.lora_A"),
    "one lora_B": (
        lambda w: _without(w, r"blocks\.1\.attn2\.to_q\.lora_B"),
        r"1 LoRA weight\(s\) lack their partner; missing keys: "
        r"transformer.transformer_blocks.1.attn2.to_q.lora_B.weight\.",
    ),
    "rank": (
        lambda w: {k: v[:2] if k.endswith("blocks.0.attn1.to_q.lora_A.weight") else v for k, v in w.items()},
        r"ranks differ .*blocks.0.attn1.to_q.lora_A.weight \(2, 16\) / .*lora_B.weight \(16, 4\)",
    ),
}

ENTRY_POINTS = {
    "pipeline folder": lambda pipe, folder: pipe.load_lora_weights(folder, weight_name=FILE),
    "pipeline file": lambda pipe, folder: pipe.load_lora_weights(folder / FILE),
    "img2img lora_state_dict": lambda pipe, folder: SanaSprintImg2ImgPipeline.lora_state_dict(folder / FILE),
    "controlnet lora_state_dict": lambda pipe, folder: SanaSprintControlNetPipeline.lora_state_dict(folder / FILE),
    "transformer folder": lambda pipe, folder: pipe.transformer.load_lora_adapter(folder, weight_name=FILE),
    "transformer file": lambda pipe, folder: pipe.transformer.load_lora_adapter(folder / FILE),
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_incomplete_lora_files_name_the_file_and_the_missing_keys(
    lora_weights, tmp_path, case, entry_point, make_sprint_transformer
):
    breakage, match = BROKEN[case]
    save_file(breakage(lora_weights), tmp_path / FILE)
    pipe = SanaSprintPipeline(None, None, None, make_sprint_transformer(), None)
    with pytest.raises(ValueError, match=rf"^The LoRA file {re.escape(str(tmp_path / FILE))} .*{match}"):
        ENTRY_POINTS[entry_point](pipe, tmp_path)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was injected


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_incomplete_lora_state_dicts_are_named_as_such(lora_weights, case, make_sprint_transformer):
    breakage, match = BROKEN[case]
    pipe = SanaSprintPipeline(None, None, None, make_sprint_transformer(), None)
    for load in (pipe.load_lora_weights, pipe.transformer.load_lora_adapter):
        with pytest.raises(ValueError, match=rf"^The LoRA state dict passed in .*{match}"):
            load(breakage(lora_weights))


def test_complete_files_still_load_and_other_layouts_are_checked(lora_weights, tmp_path, make_sprint_transformer):
    save_file(lora_weights, tmp_path / FILE)
    pipe = SanaSprintPipeline(None, None, None, make_sprint_transformer(), None)
    pipe.load_lora_weights(tmp_path, weight_name=FILE)
    assert list(pipe.transformer.peft_config) == ["default_0"]
    save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"empty.safetensors holds no LoRA weights .*transformer.proj_out.weight"):
        SanaSprintPipeline.lora_state_dict(tmp_path / "empty.safetensors")
    kohya = {"lora_unet_block.lora_down.weight": torch.zeros(4, 8), "lora_unet_block.alpha": torch.tensor(4.0)}
    with pytest.raises(ValueError, match=r"^Here is incomplete.*missing keys: lora_unet_block.lora_up.weight\."):
        check_lora_state_dict(kohya, "here")
    processor = {"attn.processor.to_q_lora.up.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match=r"missing keys: attn.processor.to_q_lora.down.weight\."):
        check_lora_state_dict(processor, "here")
    bias_only_b = dict(lora_weights, **{"transformer.transformer_blocks.0.attn1.to_q.lora_B.bias": torch.zeros(16)})
    check_lora_state_dict(bias_only_b, "here")  # peft's lora_bias: a lora_B bias has no lora_A partner
