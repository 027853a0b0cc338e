"""The diffusers conventions a user relies on, with our pipeline: dtype dicts, `None` components, layerwise casting,
variants, offloading hooks, `pipe.to(dtype)`, VAE tiling, stock-diffusers layout, LoRA files, argument checks."""

import json

import numpy as np
import pytest
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers.hooks import apply_group_offloading
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler


PROMPTS = ["a red cat", "a small blue car on the big tree"]
FAST = dict(complex_human_instruction=None, output_type="np", height=32, width=32, use_resolution_binning=False)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(diffusers_dir):
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images(pipe):
    return pipe(**FAST, prompt=PROMPTS, num_inference_steps=2, generator=_seeded()).images


def test_torch_dtype_dict_reaches_each_component(diffusers_dir):
    pipe = SanaSprintPipeline.from_pretrained(
        diffusers_dir, torch_dtype={"transformer": torch.bfloat16, "default": torch.float32}
    )
    assert type(pipe.transformer) is SanaSprintTransformer2DModel
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe(**FAST, prompt="a cat", num_inference_steps=1).images).all()


def test_components_may_be_none_for_prompt_encoding_only(diffusers_dir, pipe):
    encoder_only = SanaSprintPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=None, transformer=None, scheduler=None
    )
    expected = pipe.encode_prompt(PROMPTS, complex_human_instruction=None)
    got = encoder_only.encode_prompt(PROMPTS, complex_human_instruction=None)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="without `vae`, `transformer`, `scheduler`"):
        encoder_only(prompt="a cat")

    loaded = SanaSprintPipeline.from_pretrained(diffusers_dir, transformer=None, vae=None)
    assert loaded.transformer is None and loaded.vae is None and loaded.text_encoder is not None
    assert torch.equal(loaded.encode_prompt(PROMPTS, complex_human_instruction=None)[0], expected[0])


def test_layerwise_casting_fp8_storage_keeps_the_time_path_in_its_dtype(diffusers_dir):
    """diffusers' recipe: load in the compute dtype, then store the layers in float8."""
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=2)
    bf16 = pipe(**kwargs, generator=_seeded()).images
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.time_embed.linear.weight.dtype == torch.bfloat16  # skipped: computes in its own dtype
    assert pipe.transformer.compute_dtype == torch.bfloat16 == pipe.transformer.dtype
    got = pipe(**kwargs, generator=_seeded()).images
    assert np.isfinite(got).all()
    # float8 weights (3 mantissa bits) on an untrained tiny model: close to the bf16 images, not equal.
    assert 1e-3 < np.abs(got - bf16).max() < 0.25


def test_variants_round_trip_and_a_missing_variant_raises_diffusers_error(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    again = SanaSprintPipeline.from_pretrained(tmp_path, variant="fp16")
    again.set_progress_bar_config(disable=True)
    assert np.abs(again(**FAST, prompt=PROMPTS, num_inference_steps=2, generator=_seeded()).images - images).max() == 0
    with pytest.raises(ValueError, match="variant=bf16.*no such modeling files are available"):
        SanaSprintPipeline.from_pretrained(tmp_path, variant="bf16")


def test_pipe_to_dtype_and_vae_tiling(diffusers_dir):
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(FAST, prompt="a cat", num_inference_steps=1, height=128, width=128)
    plain = pipe(**kwargs, generator=_seeded()).images
    pipe.vae.enable_tiling(
        tile_sample_min_height=96, tile_sample_min_width=96, tile_sample_stride_height=64, tile_sample_stride_width=64
    )
    tiled = pipe(**kwargs, generator=_seeded()).images
    assert plain.shape == tiled.shape == (1, 128, 128, 3)
    assert 0 < np.abs(tiled - plain).max() < 0.2  # tiles are blended, so close but not equal
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert np.isfinite(pipe(**kwargs, generator=_seeded()).images).all()


def test_execution_device_matches_diffusers_with_offloading_hooks(diffusers_dir):
    """Our one-pass `_execution_device` returns what diffusers' own property does for each kind of hook."""
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir)
    reference = DiffusionPipeline._execution_device.fget
    assert pipe._execution_device == reference(pipe) == torch.device("cpu")
    pipe.text_encoder.to("meta")  # diffusers' `device`: the first non-CPU non-meta component, else the first one
    assert pipe._execution_device == reference(pipe) == pipe.device == torch.device("meta")
    pipe.text_encoder.to_empty(device="cpu")
    # Sequential-offload style: hooks with an execution device on the leaves of the first component.
    add_hook_to_module(pipe.text_encoder, AlignDevicesHook(io_same_device=True))
    add_hook_to_module(pipe.text_encoder.layers[0].mlp.up_proj, AlignDevicesHook(execution_device="meta"))
    assert pipe._execution_device == reference(pipe) == torch.device("meta")
    # Group offloading anywhere wins.
    apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu", 1), offload_type="leaf_level")
    assert pipe._execution_device == reference(pipe) == torch.device("cpu", 1)


def test_model_dtype_matches_diffusers(diffusers_dir):
    from diffusers_sprint.pipelines.pipeline_sana_sprint import _model_dtype

    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir)
    assert _model_dtype(pipe.vae) == pipe.vae.dtype == torch.float32
    pipe.vae.to(torch.bfloat16)
    assert _model_dtype(pipe.vae) == pipe.vae.dtype == torch.bfloat16
    pipe.vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float16)
    assert _model_dtype(pipe.vae) == pipe.vae.dtype == torch.float16
    assert _model_dtype(pipe.transformer) == pipe.transformer.dtype == pipe.transformer.compute_dtype


def test_stock_layout_drops_the_logvar_head_and_checkpoints_keep_it(pipe, tmp_path):
    transformer = SanaSprintTransformer2DModel.from_config(pipe.transformer.config, logvar_head=True)
    transformer.load_state_dict(pipe.transformer.state_dict(), strict=False)
    with torch.no_grad():
        transformer.logvar_linear.weight.fill_(0.5)
    student = SanaSprintPipeline(**dict(pipe.components, transformer=transformer))
    student.save_pretrained(tmp_path / "release")
    config = json.loads((tmp_path / "release" / "transformer" / "config.json").read_text())
    assert "logvar_head" not in config and "flow_time_scale" not in config
    stock = DiffusersSanaSprintPipeline.from_pretrained(tmp_path / "release")
    assert not any(key.startswith("logvar") for key in stock.transformer.state_dict())
    assert transformer.logvar_linear.weight.data_ptr() != 0  # ours untouched

    student.save_pretrained(tmp_path / "checkpoint", stock_diffusers_layout=False)
    index = json.loads((tmp_path / "checkpoint" / "model_index.json").read_text())
    assert index["transformer"][1] == "SanaSprintTransformer2DModel"
    again = SanaSprintPipeline.from_pretrained(tmp_path / "checkpoint")
    assert torch.equal(again.transformer.logvar_linear.weight, transformer.logvar_linear.weight)


def test_components_stock_diffusers_cannot_sample_keep_our_names(pipe, tmp_path, caplog, make_diffusers_transformer):
    teacher = make_diffusers_transformer(student=False)
    components = dict(pipe.components, transformer=SanaSprintTransformer2DModel.from_config(teacher.config))
    SanaSprintPipeline(**components).save_pretrained(tmp_path / "no_guidance")
    index = json.loads((tmp_path / "no_guidance" / "model_index.json").read_text())
    assert index["transformer"][1] == "SanaSprintTransformer2DModel"

    ode = SanaSprintPipeline(**dict(pipe.components, scheduler=TrigFlowScheduler(sampler="ode")))
    ode.save_pretrained(tmp_path / "ode")
    index = json.loads((tmp_path / "ode" / "model_index.json").read_text())
    assert index["scheduler"][1] == "TrigFlowScheduler"
    assert SanaSprintPipeline.from_pretrained(tmp_path / "ode").scheduler.config.sampler == "ode"


def test_our_lora_file_loads_in_stock_diffusers_with_the_same_images(pipe, diffusers_dir, tmp_path):
    transformer = SanaSprintTransformer2DModel.from_config(pipe.transformer.config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2, generator=_seeded(1))
    SanaSprintPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer))

    ours = SanaSprintPipeline.from_pretrained(diffusers_dir)
    stock = DiffusersSanaSprintPipeline.from_pretrained(diffusers_dir)
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
        p.load_lora_weights(tmp_path)
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=1)
    got = ours(**kwargs, generator=_seeded()).images
    expected = stock(**kwargs, intermediate_timesteps=None, generator=_seeded()).images
    assert np.abs(got - pipe(**kwargs, generator=_seeded()).images).max() > 1e-3  # the adapter is active
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "guidance_scale, error",
    [(float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError), ("4", TypeError)],
)
def test_guidance_scale_must_be_finite_and_non_negative(pipe, guidance_scale, error):
    with pytest.raises(error, match="`guidance_scale` must be a"):
        pipe(**FAST, prompt="a cat", guidance_scale=guidance_scale)
