"""Quantised and low-memory inference with our pipelines: torchao int8 weights, layerwise casting, group offloading
and VAE tiling, each against the plain pipeline (images at a stated tolerance, memory saved measured).

The pipeline is `benchmarks/bench_low_memory.py`'s `--smoke` model (tiny transformer widths, bench_pipeline.py's small
text encoder and 3-stage DC-AE) at 64 px, and `load_with_option` applies each option as the benchmark does.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers import SanaTransformer2DModel

from diffusers_sprint import (
    SanaSprintControlNetPipeline,
    SanaSprintImg2ImgPipeline,
    SanaSprintTransformer2DModel,
)


SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def bench_low_memory(load_module):
    return load_module("benchmarks/bench_low_memory.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bench_low_memory):
    folder = tmp_path_factory.mktemp("low_memory") / "pipeline"
    bench_low_memory.write_pipeline(str(folder), smoke=True, layers=2, size=SIZE)
    return folder


@pytest.fixture(scope="module")
def plain(folder, bench_low_memory):
    pipe = bench_low_memory.load_with_option(str(folder), "plain", SIZE)
    return pipe, bench_low_memory.generate(pipe, SIZE, STEPS)


def _int8_config(**kwargs):
    pytest.importorskip("torchao", reason="torchao is in setup.cfg's test extra")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), **kwargs)


def test_torchao_int8_weights_quarter_the_linear_bytes_and_stay_close(folder, plain, bench_low_memory):
    plain_pipe, plain_images = plain
    _int8_config()
    pipe = bench_low_memory.load_with_option(str(folder), "torchao-int8", SIZE)
    assert type(pipe.transformer) is SanaSprintTransformer2DModel
    assert type(pipe.transformer.transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    assert type(pipe.transformer.time_embed.linear.weight) is torch.nn.Parameter  # modules_to_not_convert
    linear = plain_pipe.transformer.transformer_blocks[0].attn1.to_q
    quantised = pipe.transformer.transformer_blocks[0].attn1.to_q
    # int8 data plus an fp32 scale and an int8 zero point per output row: 0.33 of fp32 at width 16, -> 0.25 wider.
    assert bench_low_memory.parameter_bytes(quantised) == linear.weight.numel() + 5 * linear.out_features
    assert bench_low_memory.parameter_bytes(linear) == 4 * linear.weight.numel()
    ratio = bench_low_memory.parameter_bytes(pipe.transformer) / bench_low_memory.parameter_bytes(
        plain_pipe.transformer
    )
    assert 0.75 < ratio < 0.85, ratio  # at tiny widths the unquantised convolutions, norms and time MLP dominate
    images = bench_low_memory.generate(pipe, SIZE, STEPS)
    assert 0 < np.abs(images - plain_images).max() < 0.05


def test_torchao_int8_matches_stock_diffusers_quantised_the_same_way(folder, bench_low_memory):
    """All linears int8 in both: our TrigFlow transform over the quantised model is diffusers' own."""
    config = _int8_config()
    kwargs = dict(subfolder="transformer", quantization_config=config, torch_dtype=torch.float32)
    ours = bench_low_memory.SanaSprintPipeline.from_pretrained(
        folder, transformer=SanaSprintTransformer2DModel.from_pretrained(folder, **kwargs)
    )
    stock = DiffusersSanaSprintPipeline.from_pretrained(
        folder, transformer=SanaTransformer2DModel.from_pretrained(folder, **kwargs)
    )
    stock.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.transformer.time_embed.linear.weight).__name__ == "Int8Tensor"
    stock_images = stock(
        bench_low_memory.PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=SIZE,
        width=SIZE,
        use_resolution_binning=False,
        complex_human_instruction=None,
    ).images
    assert np.abs(bench_low_memory.generate(ours, SIZE, STEPS) - stock_images).max() <= 1e-5


def test_torchao_int8_pipeline_saves_in_the_stock_layout_and_reloads_quantised(folder, tmp_path, bench_low_memory):
    """The stock-layout save (diffusers' transformer class) keeps the quantizer: safetensors through torchao."""
    _int8_config()
    pipe = bench_low_memory.load_with_option(str(folder), "torchao-int8", SIZE)
    images = bench_low_memory.generate(pipe, SIZE, STEPS)
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (
        config["_class_name"] == "SanaTransformer2DModel"
        and config["quantization_config"]["quant_method"] == "torchao"
    )
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    for pipeline_class in (bench_low_memory.SanaSprintPipeline, DiffusersSanaSprintPipeline):
        again = pipeline_class.from_pretrained(tmp_path, torch_dtype=torch.float32)
        assert type(again.transformer.transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
        if pipeline_class is bench_low_memory.SanaSprintPipeline:
            again.set_progress_bar_config(disable=True)
            assert np.abs(bench_low_memory.generate(again, SIZE, STEPS) - images).max() == 0


def test_layerwise_fp8_storage_shrinks_the_blocks_and_stays_close(folder, plain, bench_low_memory):
    plain_pipe, plain_images = plain
    pipe = bench_low_memory.load_with_option(str(folder), "layerwise-fp8", SIZE)
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.time_embed.linear.weight.dtype == torch.float32  # the time path is skipped
    block_ratio = bench_low_memory.parameter_bytes(block) / bench_low_memory.parameter_bytes(
        plain_pipe.transformer.transformer_blocks[0]
    )
    assert 0.25 < block_ratio < 0.3, block_ratio  # 1 byte per weight; the skipped `norm` gains keep 4
    ratio = bench_low_memory.parameter_bytes(pipe.transformer) / bench_low_memory.parameter_bytes(
        plain_pipe.transformer
    )
    assert 0.55 < ratio < 0.65, ratio
    assert 0 < np.abs(bench_low_memory.generate(pipe, SIZE, STEPS) - plain_images).max() < 0.1


@pytest.mark.parametrize("option", ["group-offload", "group-offload-disk"])
def test_group_offload_with_the_cpu_as_onload_device_is_exact(folder, plain, option, tmp_path, bench_low_memory):
    """CPU onload runs diffusers' hooks without moving anything; the disk variant writes every weight to disk (one
    subfolder per component) and reads it back for each use (bit-exact up to float reassociation)."""
    pipe = bench_low_memory.load_with_option(str(folder), option, SIZE, offload_dir=str(tmp_path))
    assert np.abs(bench_low_memory.generate(pipe, SIZE, STEPS) - plain[1]).max() <= (
        0 if option == "group-offload" else 1e-6
    )
    if option == "group-offload-disk":
        assert sorted(path.name for path in tmp_path.iterdir()) == ["text_encoder", "transformer", "vae"]
        on_disk = sum(path.stat().st_size for path in tmp_path.rglob("*.safetensors"))
        weights = sum(
            bench_low_memory.parameter_bytes(getattr(pipe, name)) for name in ("transformer", "vae", "text_encoder")
        )
        assert weights < on_disk < 1.1 * weights


def test_block_level_disk_offload_of_the_dc_ae_is_fixed(folder, plain, tmp_path, bench_low_memory):
    """Stock diffusers hooks the whole DC-AE on `forward`, which `decode` bypasses: its disk-offloaded weights are
    never read back (diffusers #12319). Ours offloads the encoder and decoder as blocks."""
    kwargs = dict(offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / "stock"))
    stock = DiffusersSanaSprintPipeline.from_pretrained(folder)
    stock.vae.enable_group_offload(torch.device("cpu"), **kwargs)
    latents = torch.randn(1, 16, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = plain[0].vae.decode(latents).sample
        assert not torch.allclose(stock.vae.decode(latents).sample, reference, atol=1e-3, equal_nan=True)
        ours = bench_low_memory.load_with_option(str(folder), "plain", SIZE)
        ours.enable_group_offload(torch.device("cpu"), **dict(kwargs, offload_to_disk_path=str(tmp_path / "ours")))
        assert torch.equal(ours.vae.decode(latents).sample, reference)


def _largest_decoder_input(bench_low_memory, pipe):
    sides = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: sides.append(args[0].shape[-1]))
    try:
        images = bench_low_memory.generate(pipe, SIZE, STEPS)
    finally:
        handle.remove()
    return images, max(sides)


def test_vae_tiling_decodes_tiles_smaller_than_the_image(folder, plain, bench_low_memory):
    pipe = bench_low_memory.load_with_option(str(folder), "plain", SIZE)
    plain_images, full = _largest_decoder_input(bench_low_memory, pipe)
    pipe = bench_low_memory.load_with_option(str(folder), "vae-tiling", SIZE)
    tiled_images, tile = _largest_decoder_input(bench_low_memory, pipe)
    assert full == SIZE // 4 and tile == SIZE // 8  # the decoder's activations are a quarter of the plain ones
    assert 0 < np.abs(tiled_images - plain_images).max() < 0.25  # blended seams: close, not equal


@pytest.mark.parametrize("pipeline_class", [SanaSprintImg2ImgPipeline, SanaSprintControlNetPipeline])
def test_img2img_and_controlnet_pipelines_take_the_same_options(folder, pipeline_class, tmp_path, bench_low_memory):
    """Group offloading (exact, disk), VAE tiling (encode and decode tiled), layerwise casting (transformer and
    ControlNet) and torchao int8 through `image` / `control_image`; a ControlNet built from the transformer's config
    is offloaded, cast, with the rest."""
    from diffusers import SanaControlNetModel

    config = SanaControlNetModel.extract_init_dict(
        SanaSprintTransformer2DModel.load_config(folder, subfolder="transformer")
    )[0]

    def load(**kwargs):
        """A fresh pipeline (and ControlNet: hooks stay on a model) from `folder`."""
        if pipeline_class is SanaSprintControlNetPipeline:
            torch.manual_seed(0)
            kwargs["controlnet"] = SanaControlNetModel(**dict(config, num_layers=1)).eval()
        return pipeline_class.from_pretrained(folder, **kwargs)

    image = np.random.default_rng(0).random((SIZE, SIZE, 3)).astype(np.float32)
    call = dict(image=image, strength=0.8) if pipeline_class is SanaSprintImg2ImgPipeline else {"control_image": image}

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(height=SIZE, width=SIZE, use_resolution_binning=False, complex_human_instruction=None)
        generator = torch.Generator().manual_seed(0)
        return pipe(bench_low_memory.PROMPT, num_inference_steps=STEPS, generator=generator, output_type="np",
                    **kwargs, **call).images  # fmt: skip

    plain = run(load())
    offloaded = load()
    offloaded.enable_group_offload(
        torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=str(tmp_path)
    )
    assert np.abs(run(offloaded) - plain).max() <= 1e-6
    tiled = load()
    tiled.vae.enable_tiling(32, 32, 16, 16)
    assert 0 < np.abs(run(tiled) - plain).max() < 0.25
    cast = load()
    for model in (cast.transformer, getattr(cast, "controlnet", None)):
        if model is not None:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert 0 < np.abs(run(cast) - plain).max() < 0.1
    kwargs = dict(subfolder="transformer", quantization_config=_int8_config(), torch_dtype=torch.float32)
    int8 = load(transformer=SanaSprintTransformer2DModel.from_pretrained(folder, **kwargs))
    assert 0 < np.abs(run(int8) - plain).max() < 0.05


def test_benchmark_reports_every_option_against_plain(bench_low_memory):
    rows = bench_low_memory.main(["--smoke", "--size", "64", "--repeats", "1", "--in_process"])
    by_option = {row["option"]: row for row in rows}
    assert list(by_option) == list(bench_low_memory.OPTIONS)
    plain_bytes = by_option["plain"]["transformer_parameter_bytes"]
    assert by_option["layerwise-fp8"]["transformer_parameter_bytes"] < 0.75 * plain_bytes
    assert by_option["torchao-int8"]["transformer_parameter_bytes"] < 0.85 * plain_bytes
    assert by_option["group-offload"]["max_abs_diff_vs_plain"] <= 1e-6
    assert by_option["group-offload-disk"]["max_abs_diff_vs_plain"] <= 1e-6
    assert all(row["median_seconds"] > 0 for row in rows)
