"""SanaSprintPipeline: image parity with diffusers, any step count, custom timesteps, binning, errors, LoRA."""

import json

import numpy as np
import pytest
import torch
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers import SCMScheduler
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.pipelines.resolution_bins import aspect_ratio_bins
from diffusers_sprint.schedulers import PAPER_TIMESTEP_PRESETS


PARITY_ATOL = 1e-5
PROMPTS = ["a red cat", "a small blue car on the big tree"]
FAST = dict(complex_human_instruction=None, output_type="np", height=32, width=32)


@pytest.fixture(scope="module")
def reference(diffusers_dir):
    pipe = DiffusersSanaSprintPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(diffusers_dir):
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_loads_diffusers_folder_with_our_classes(diffusers_dir, pipe):
    index = json.loads((diffusers_dir / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert type(pipe.transformer) is SanaSprintTransformer2DModel
    assert type(pipe.scheduler) is TrigFlowScheduler


@pytest.mark.parametrize("steps", [1, 2])
def test_images_match_diffusers(reference, pipe, steps):
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=steps, use_resolution_binning=False)
    expected = reference(**kwargs, intermediate_timesteps=1.3 if steps == 2 else None, generator=_seeded()).images
    got = pipe(**kwargs, generator=_seeded()).images
    assert expected.shape == got.shape == (2, 32, 32, 3)
    assert expected.std() > 0.01
    assert np.abs(got - expected).max() <= PARITY_ATOL


def test_images_match_diffusers_with_its_default_prompt_instruction_and_per_image_generators(reference, pipe):
    kwargs = dict(height=32, width=32, output_type="np", use_resolution_binning=False)
    # diffusers pairs each image with the mask of another prompt when num_images_per_prompt > 1 (see the next
    # test), so it is called with the prompts written out.
    repeated = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    expected = reference(**kwargs, prompt=repeated, generator=[_seeded(i) for i in range(4)]).images
    got = pipe(**kwargs, prompt=PROMPTS, num_images_per_prompt=2, generator=[_seeded(i) for i in range(4)]).images
    assert got.shape == (4, 32, 32, 3)
    assert np.abs(got - expected).max() <= PARITY_ATOL
    without_instruction = pipe(
        **kwargs,
        prompt=PROMPTS,
        num_images_per_prompt=2,
        complex_human_instruction=None,
        generator=[_seeded(i) for i in range(4)],
    )
    assert np.abs(without_instruction.images - got).max() > 1e-3  # the instruction really is part of the prompt


def test_num_images_per_prompt_keeps_each_prompt_with_its_own_mask(reference, pipe):
    """diffusers repeats embeddings per prompt (p0 p0 p1 p1) but tiles masks (m0 m1 m0 m1); ours repeats both."""
    embeds, mask = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, complex_human_instruction=None)
    single = [pipe.encode_prompt(p, complex_human_instruction=None) for p in PROMPTS]
    for row, index in enumerate([0, 0, 1, 1]):
        assert torch.equal(mask[row], single[index][1][0])
        real = mask[row].bool()
        torch.testing.assert_close(embeds[row][real], single[index][0][0][real], rtol=0, atol=1e-6)
    _, their_mask = reference.encode_prompt(PROMPTS, num_images_per_prompt=2, complex_human_instruction=None)
    assert not torch.equal(their_mask[1], single[0][1][0])  # diffusers: image 2 of prompt 0 gets prompt 1's mask
    kwargs = dict(FAST, num_inference_steps=1, use_resolution_binning=False)
    batch = pipe(**kwargs, prompt=PROMPTS, num_images_per_prompt=2, generator=[_seeded(i) for i in range(4)]).images
    for row, index in enumerate([0, 0, 1, 1]):
        alone = pipe(**kwargs, prompt=PROMPTS[index], generator=_seeded(row)).images[0]
        assert np.abs(alone - batch[row]).max() <= 1e-5


def test_paper_four_step_timesteps_match_diffusers_loop(reference, pipe):
    """diffusers' SCMScheduler raises TypeError on custom timesteps (defect); its pipeline loop runs with ours."""
    grid = list(PAPER_TIMESTEP_PRESETS[4])
    with pytest.raises(TypeError):
        SCMScheduler().set_timesteps(timesteps=grid)
    components = dict(reference.components, scheduler=TrigFlowScheduler())
    diffusers_loop = DiffusersSanaSprintPipeline(**components)
    diffusers_loop.set_progress_bar_config(disable=True)
    expected = diffusers_loop(
        **FAST,
        prompt=PROMPTS,
        num_inference_steps=4,
        timesteps=grid,
        max_timesteps=None,
        intermediate_timesteps=None,
        use_resolution_binning=False,
        generator=_seeded(),
    ).images
    got = pipe(**FAST, prompt=PROMPTS, timesteps=grid[:-1], use_resolution_binning=False, generator=_seeded()).images
    assert np.abs(got - expected).max() <= PARITY_ATOL


def test_any_step_count_runs_with_default_arguments(pipe):
    images = {
        steps: pipe(**FAST, prompt="a cat", num_inference_steps=steps, generator=_seeded()).images
        for steps in (1, 3, 4)
    }
    for steps, image in images.items():
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all(), steps
    assert np.abs(images[1] - images[3]).max() > 1e-3 and np.abs(images[3] - images[4]).max() > 1e-3


def test_save_pretrained_writes_the_stock_diffusers_layout_and_round_trips(reference, pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline"
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "SCMScheduler"]
    transformer_config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert transformer_config["_class_name"] == "SanaTransformer2DModel"
    assert type(pipe.transformer) is SanaSprintTransformer2DModel and type(pipe.scheduler) is TrigFlowScheduler
    assert pipe.config.transformer[1] == "SanaSprintTransformer2DModel"  # restored after saving
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=2, use_resolution_binning=False)
    ours = pipe(**kwargs, generator=_seeded()).images

    again = SanaSprintPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert type(again.transformer) is SanaSprintTransformer2DModel and type(again.scheduler) is TrigFlowScheduler
    assert np.abs(again(**kwargs, generator=_seeded()).images - ours).max() == 0

    stock = DiffusersSanaSprintPipeline.from_pretrained(tmp_path)  # diffusers alone
    stock.set_progress_bar_config(disable=True)
    assert type(stock.transformer).__name__ == "SanaTransformer2DModel" and type(stock.scheduler) is SCMScheduler
    assert np.abs(stock(**kwargs, generator=_seeded()).images - ours).max() <= PARITY_ATOL


def test_output_types(pipe):
    kwargs = dict(complex_human_instruction=None, prompt=PROMPTS, num_inference_steps=1, height=32, width=32)
    pil = pipe(**kwargs, output_type="pil", generator=_seeded()).images
    pt = pipe(**kwargs, output_type="pt", generator=_seeded()).images
    latent = pipe(**kwargs, output_type="latent", generator=_seeded()).images
    array = pipe(**kwargs, output_type="np", generator=_seeded()).images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert pt.shape == (2, 3, 32, 32) and latent.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    image, *_ = pipe(**kwargs, output_type="np", return_dict=False, generator=_seeded())
    np.testing.assert_array_equal(image, array)


def test_resolution_binning_at_the_models_own_base_size(pipe):
    seen_shapes = []

    def record(pipeline, step, timestep, callback_kwargs):
        seen_shapes.append(tuple(callback_kwargs["latents"].shape))
        return {}

    # Base size 32 px (sample_size 16 x VAE scale 2): a 48 x 32 request is generated at the nearest bin.
    image = pipe(
        prompt="a cat",
        height=48,
        width=32,
        complex_human_instruction=None,
        output_type="np",
        callback_on_step_end=record,
    ).images
    assert image.shape == (1, 48, 32, 3)
    bins = pipe.resolution_bins()
    bin_height, bin_width = pipe.image_processor.classify_height_width_bin(48, 32, bins)
    assert seen_shapes == [(1, 4, bin_height // 2, bin_width // 2)] * 2
    assert abs(bin_height * bin_width - 32 * 32) / (32 * 32) < 0.35 and bin_height > bin_width


def test_aspect_ratio_bins():
    assert aspect_ratio_bins(1024, 32) is ASPECT_RATIO_1024_BIN  # released models bin exactly as in diffusers
    bins = aspect_ratio_bins(64, 4)
    assert set(bins) == set(ASPECT_RATIO_1024_BIN)
    for height, width in bins.values():
        assert height % 4 == 0 and width % 4 == 0 and height >= 4 and width >= 4
    assert bins["1.0"] == [64.0, 64.0]


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    timesteps = []

    def zero_latents(pipeline, step, timestep, callback_kwargs):
        timesteps.append(float(timestep))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    pipe(**FAST, prompt="a cat", num_inference_steps=3, callback_on_step_end=zero_latents)
    assert timesteps == pytest.approx(pipe.scheduler.timesteps[:-1].tolist())
    assert len(timesteps) == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(height=33), ValueError, "height"),
        (dict(width=31), ValueError, "width"),
        (dict(height=32.0), TypeError, "height"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=1.5), TypeError, "num_inference_steps"),
        (dict(timesteps=[1.0, 1.3]), ValueError, "descending"),
        (dict(timesteps=[1.9, 1.0]), ValueError, "timesteps"),
        (dict(guidance_scale=None), ValueError, "guidance_scale"),
        (dict(prompt=None), ValueError, "prompt_embeds"),
        (dict(prompt=3), TypeError, "prompt"),
        (dict(prompt=[]), ValueError, "prompt"),
        (dict(prompt_embeds=torch.zeros(1, 4, 16)), ValueError, "prompt"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 16)), ValueError, "prompt_attention_mask"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "generator"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "latents"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
        (dict(intermediate_timesteps=[1.0, 0.5]), ValueError, "intermediate_timesteps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(pipe, kwargs, error, match):
    call = dict(prompt="a cat", height=32, width=32, complex_human_instruction=None)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        pipe(**call)


def test_constructor_rejects_diffusers_transformer_and_converts_scm_scheduler(reference):
    with pytest.raises(TypeError, match="transformer"):
        SanaSprintPipeline(**reference.components)
    components = dict(reference.components)
    transformer = SanaSprintTransformer2DModel.from_config(reference.transformer.config)
    components["transformer"] = transformer
    assert isinstance(SanaSprintPipeline(**components).scheduler, TrigFlowScheduler)


def test_model_without_guidance_embedder_needs_guidance_scale_none(reference, make_diffusers_transformer):
    components = dict(reference.components)
    teacher = make_diffusers_transformer(student=False)
    components["transformer"] = SanaSprintTransformer2DModel.from_config(teacher.config)
    components["transformer"].load_state_dict(teacher.state_dict())
    pipe = SanaSprintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(**FAST, prompt="a cat")
    assert pipe(**FAST, prompt="a cat", guidance_scale=None).images.shape == (1, 32, 32, 3)


def _save_random_lora(base, folder, seed=1):
    """A LoRA of `base` (a transformer) with random `lora_B`, saved in diffusers' format to `folder`."""
    transformer = SanaSprintTransformer2DModel.from_config(base.config)
    transformer.load_state_dict(base.state_dict())
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2, generator=_seeded(seed))
    SanaSprintPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder


def test_lora_load_scale_and_fuse(pipe, tmp_path):
    _save_random_lora(pipe.transformer, tmp_path)

    lora_pipe = SanaSprintPipeline(**pipe.components)
    lora_pipe.transformer = SanaSprintTransformer2DModel.from_config(pipe.transformer.config)
    lora_pipe.transformer.load_state_dict(pipe.transformer.state_dict())
    lora_pipe.set_progress_bar_config(disable=True)
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=1)
    base = lora_pipe(**kwargs, generator=_seeded()).images
    lora_pipe.load_lora_weights(tmp_path)
    with_lora = lora_pipe(**kwargs, generator=_seeded()).images
    scale_zero = lora_pipe(**kwargs, attention_kwargs={"scale": 0.0}, generator=_seeded()).images
    assert np.abs(with_lora - base).max() > 1e-3
    assert np.abs(scale_zero - base).max() <= 1e-6
    lora_pipe.fuse_lora()
    lora_pipe.unload_lora_weights()
    fused = lora_pipe(**kwargs, generator=_seeded()).images
    assert np.abs(fused - with_lora).max() <= 1e-5


@pytest.mark.parametrize("fuse", [False, True])
def test_two_adapters_compose_as_in_diffusers(diffusers_dir, pipe, tmp_path, fuse):
    """A style LoRA + a Sprint LoRA (docs/lora.md): `load_lora_weights` twice, `set_adapters` with weights, and
    optionally `fuse_lora` + `unload_lora_weights`, give the images of diffusers' own pipeline doing the same."""
    style = _save_random_lora(pipe.transformer, tmp_path / "style", seed=1)
    sprint = _save_random_lora(pipe.transformer, tmp_path / "sprint", seed=2)
    kwargs = dict(
        FAST, prompt=PROMPTS, num_inference_steps=2, intermediate_timesteps=1.3, use_resolution_binning=False
    )
    images = {}
    for name, cls in (("diffusers", DiffusersSanaSprintPipeline), ("ours", SanaSprintPipeline)):
        composed = cls.from_pretrained(diffusers_dir)
        composed.set_progress_bar_config(disable=True)
        composed.load_lora_weights(style, adapter_name="style")
        composed.load_lora_weights(sprint, adapter_name="sprint")
        composed.set_adapters(["sprint"])
        images[f"{name}, sprint only"] = composed(**kwargs, generator=_seeded()).images
        composed.set_adapters(["style", "sprint"], [0.7, 1.0])
        if fuse:
            composed.fuse_lora(adapter_names=["style", "sprint"])
            composed.unload_lora_weights()
        images[name] = composed(**kwargs, generator=_seeded()).images
    assert np.abs(images["ours"] - images["diffusers"]).max() <= PARITY_ATOL
    assert np.abs(images["ours, sprint only"] - images["diffusers, sprint only"]).max() <= PARITY_ATOL
    assert np.abs(images["ours"] - images["ours, sprint only"]).max() > 1e-3


def test_prompt_encoding_skips_trailing_padding_but_matches_diffusers(reference, pipe):
    seen_lengths = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen_lengths.append(args[0].shape[1]))
    try:
        ours, our_mask = pipe.encode_prompt(PROMPTS, complex_human_instruction=None, max_sequence_length=300)
    finally:
        hook.remove()
    theirs, their_mask = reference.encode_prompt(PROMPTS, complex_human_instruction=None, max_sequence_length=300)
    assert seen_lengths == [int(their_mask.sum(dim=1).max())] and seen_lengths[0] < 20
    assert torch.equal(our_mask, their_mask) and ours.shape == theirs.shape == (2, 300, 16)
    real = their_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-6)
    assert ours[:, seen_lengths[0] :].abs().max() == 0  # never encoded


@pytest.mark.parametrize("dtype_argument", ["torch_dtype", "dtype"])
def test_from_pretrained_dtype_reaches_the_transformer(diffusers_dir, dtype_argument):
    pipe = SanaSprintPipeline.from_pretrained(diffusers_dir, **{dtype_argument: torch.bfloat16})
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("missing", ["transformer", "vae", "scheduler"])
def test_a_pipeline_built_without_a_component_names_it(pipe, missing):
    """A clear ValueError naming the component, not an AttributeError from deep inside the call."""
    components = dict(pipe.components, **{missing: None})
    partial = SanaSprintPipeline(**components)
    with pytest.raises(ValueError, match=f"built without `{missing}`, which generating images needs"):
        partial(PROMPTS, **FAST)
