"""SanaSprintControlNetPipeline and trigflow_forward(controlnet=...): parity with SanaSprintPipeline (scale 0) and
with diffusers' SanaControlNetPipeline (flow teacher, ODE), JVP through the pair, conventions and argument errors."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaControlNetModel, SanaControlNetPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffusers_sprint import (
    SanaSprintControlNetPipeline,
    SanaSprintPipeline,
    SanaSprintTransformer2DModel,
    TrigFlowScheduler,
)


PARITY_ATOL = 1e-5
PROMPTS = ["a red cat", "a small blue car on the big tree"]
FAST = dict(complex_human_instruction=None, output_type="np", height=32, width=32)


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _control_images(count=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def _ours(reference: torch.nn.Module) -> SanaSprintTransformer2DModel:
    model = SanaSprintTransformer2DModel.from_config(reference.config)
    model.load_state_dict(reference.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def parts(make_controlnet, make_diffusers_transformer, make_text_encoder, make_tokenizer, make_vae):
    return dict(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=_ours(make_diffusers_transformer(student=True)),
        controlnet=make_controlnet(),
        scheduler=TrigFlowScheduler(),
    )


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = SanaSprintControlNetPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def teacher_pipes(parts, make_diffusers_transformer):
    """diffusers' SanaControlNetPipeline on a flow teacher, and ours on the same weights with the ODE sampler."""
    teacher = make_diffusers_transformer(student=False)
    common = {k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "controlnet")}
    reference = SanaControlNetPipeline(
        **common, transformer=teacher, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    ours = SanaSprintControlNetPipeline(
        **common, transformer=_ours(teacher), scheduler=TrigFlowScheduler(sampler="ode")
    )
    for p in (reference, ours):
        p.set_progress_bar_config(disable=True)
    return reference, ours


def _flow_grid(steps):
    """The TrigFlow times (radians) of diffusers' flow Euler grid at `shift=3`."""
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(steps)
    return TrigFlowScheduler.timesteps_from_flow_sigmas(flow.sigmas)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scale_zero_equals_sana_sprint_pipeline(parts, pipe, steps):
    plain = SanaSprintPipeline(**{k: v for k, v in parts.items() if k != "controlnet"})
    plain.set_progress_bar_config(disable=True)
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=steps)
    expected = plain(**kwargs, generator=_seeded()).images
    got = pipe(**kwargs, control_image=_control_images(), controlnet_conditioning_scale=0.0, generator=_seeded())
    assert np.abs(got.images - expected).max() <= PARITY_ATOL
    controlled = pipe(**kwargs, control_image=_control_images(), generator=_seeded()).images
    assert np.abs(controlled - expected).max() > 1e-3  # the ControlNet does act at scale 1


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_ode_sampling_of_flow_teacher_equals_diffusers_sana_controlnet_pipeline(teacher_pipes, scale):
    """No CFG (diffusers skips it at guidance_scale <= 1): the whole pipeline, images compared."""
    reference, ours = teacher_pipes
    steps = 6
    common = dict(FAST, prompt=PROMPTS, control_image=_control_images(), controlnet_conditioning_scale=scale)
    common["use_resolution_binning"] = False
    expected = reference(**common, num_inference_steps=steps, guidance_scale=1.0, generator=_seeded()).images
    got = ours(**common, timesteps=_flow_grid(steps), guidance_scale=None, generator=_seeded()).images
    assert expected.shape == got.shape == (2, 32, 32, 3) and expected.std() > 0.01
    assert np.abs(got - expected).max() <= PARITY_ATOL


def test_teacher_cfg_velocity_with_controlnet_equals_diffusers_cfg_loop(teacher_pipes):
    """The distillation teacher's CFG velocity: trigflow_forward(controlnet=...) mixed in TrigFlow space, sampled with
    the ODE scheduler, equals diffusers' SanaControlNetPipeline at guidance 4.5 (its latents)."""
    reference, ours = teacher_pipes
    steps, guidance, sigma_data = 5, 4.5, 0.5
    images = _control_images()
    expected = reference(
        **dict(FAST, output_type="latent"),
        prompt=PROMPTS,
        control_image=images,
        num_inference_steps=steps,
        guidance_scale=guidance,
        use_resolution_binning=False,
        generator=_seeded(),
    ).images

    embeds, mask, null, null_mask = reference.encode_prompt(PROMPTS, True, complex_human_instruction=None)
    control = ours.prepare_control_latents(images, 32, 32, 1, 2, torch.device("cpu"))
    scheduler = TrigFlowScheduler(sampler="ode", sigma_data=sigma_data)
    scheduler.set_timesteps(timesteps=_flow_grid(steps))
    x = randn_tensor((2, 4, 16, 16), generator=_seeded()) * sigma_data
    model = ours.transformer
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            pair = dict(controlnet=ours.controlnet, controlnet_cond=control)
            cond = model.trigflow_forward(x / sigma_data, t, embeds, mask, **pair).sample
            uncond = model.trigflow_forward(x / sigma_data, t, null, null_mask, **pair).sample
            x = scheduler.step(sigma_data * (uncond + guidance * (cond - uncond)), t, x).prev_sample
    assert (expected - randn_tensor((2, 4, 16, 16), generator=_seeded())).abs().max() > 0.1
    torch.testing.assert_close(x / sigma_data, expected, rtol=0, atol=PARITY_ATOL)


def test_trigflow_forward_with_controlnet_jvp_matches_finite_differences(
    parts, make_controlnet, make_diffusers_transformer, text_conditioning
):
    """torch.func.jvp through transformer + ControlNet against a central difference in (x, t). The model is float64,
    but diffusers' linear attention computes in float32, so the difference is round-off limited (seen 6e-5 at h=1e-4,
    the same as without a ControlNet; 1e-3 at h=1e-5)."""
    model = _ours(make_diffusers_transformer(student=True)).double()
    controlnet = make_controlnet().double()
    embeds, mask = text_conditioning()
    generator = _seeded(3)
    x = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    cond = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    v_x = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    v_t = torch.tensor([0.7, -0.3], dtype=torch.float64)

    def velocity(x, t):
        return model.trigflow_forward(
            x,
            t,
            embeds.double(),
            mask,
            guidance_scale=4.5,
            controlnet=controlnet,
            controlnet_cond=cond,
            controlnet_conditioning_scale=torch.tensor([1.0, 0.5]),
        ).sample

    with torch.no_grad():
        primal, tangent = torch.func.jvp(velocity, (x, t), (v_x, v_t))
        h = 1e-4
        finite = (velocity(x + h * v_x, t + h * v_t) - velocity(x - h * v_x, t - h * v_t)) / (2 * h)
        without_control = torch.func.jvp(
            lambda x, t: model.trigflow_forward(x, t, embeds.double(), mask, guidance_scale=4.5).sample,
            (x, t),
            (v_x, v_t),
        )[1]
    torch.testing.assert_close(primal, velocity(x, t), rtol=0, atol=1e-12)
    assert ((tangent - finite).norm() / finite.norm()).item() < 5e-4
    assert ((tangent - without_control).norm() / tangent.norm()).item() > 1e-3  # the ControlNet is in the tangent


def test_per_sample_conditioning_scale(parts, text_conditioning):
    model, controlnet = parts["transformer"], parts["controlnet"]
    embeds, mask = text_conditioning()
    x, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([1.0, 0.3])
    with torch.no_grad():
        mixed = model.trigflow_forward(
            x,
            t,
            embeds,
            mask,
            guidance_scale=4.5,
            controlnet=controlnet,
            controlnet_cond=cond,
            controlnet_conditioning_scale=torch.tensor([0.0, 0.8]),
        ).sample
        plain = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5).sample
        scaled = model.trigflow_forward(
            x,
            t,
            embeds,
            mask,
            guidance_scale=4.5,
            controlnet=controlnet,
            controlnet_cond=cond,
            controlnet_conditioning_scale=0.8,
        ).sample
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], scaled[1], rtol=0, atol=1e-6)
    assert (scaled[1] - plain[1]).abs().max() > 1e-3


def test_compiled_and_wrapped_controlnets_are_called_through_their_wrapper(parts, text_conditioning):
    """`torch.compile` and DDP-style (`.module`) wrappers: config and dtype come from the inner SanaControlNetModel,
    the call goes through the wrapper (so its hooks run)."""
    model, controlnet = parts["transformer"], parts["controlnet"]
    embeds, mask = text_conditioning()
    x, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapper = Wrapper(torch.compile(controlnet, backend="eager"))
    with torch.no_grad():
        expected = model.trigflow_forward(
            x, 0.9, embeds, mask, guidance_scale=4.5, controlnet=controlnet, controlnet_cond=cond
        ).sample
        got = model.trigflow_forward(
            x, 0.9, embeds, mask, guidance_scale=4.5, controlnet=wrapper, controlnet_cond=cond
        ).sample
    assert wrapper.calls == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="SanaControlNetModel"):
        model.trigflow_forward(
            x, 0.9, embeds, mask, guidance_scale=4.5, controlnet=Wrapper(model), controlnet_cond=cond
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(controlnet_cond=torch.zeros(2, 4, 16, 16)), ValueError, "need a `controlnet`"),
        (dict(controlnet_conditioning_scale=1.0), ValueError, "need a `controlnet`"),
        (dict(controlnet="controlnet"), TypeError, "SanaControlNetModel"),
        (dict(controlnet=True), TypeError, "controlnet"),
        (dict(use_controlnet=True), ValueError, "controlnet_cond"),
        (dict(use_controlnet=True, controlnet_cond=torch.zeros(2, 4, 8, 8)), ValueError, "shape"),
        (
            dict(use_controlnet=True, controlnet_cond=torch.zeros(2, 4, 16, 16), controlnet_conditioning_scale="1"),
            TypeError,
            "controlnet_conditioning_scale",
        ),
        (
            dict(
                use_controlnet=True,
                controlnet_cond=torch.zeros(2, 4, 16, 16),
                controlnet_conditioning_scale=torch.ones(3),
            ),
            ValueError,
            "controlnet_conditioning_scale",
        ),
    ],
)
def test_trigflow_forward_controlnet_argument_errors(parts, kwargs, error, match, text_conditioning):
    if kwargs.pop("use_controlnet", False):
        kwargs["controlnet"] = parts["controlnet"]
    embeds, mask = text_conditioning()
    with pytest.raises(error, match=match):
        parts["transformer"].trigflow_forward(
            torch.zeros(2, 4, 16, 16), 1.0, embeds, mask, guidance_scale=4.5, **kwargs
        )


def test_control_image_types_and_broadcast(pipe):
    image = _control_images(1)[0]
    array = np.asarray(image).astype(np.float32)[None] / 255.0
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=1)
    results = [
        pipe(**kwargs, control_image=control, generator=_seeded()).images
        for control in (image, array, tensor, [image, image])
    ]
    for other in results[1:]:
        assert np.abs(other - results[0]).max() <= 1e-5
    different = pipe(**kwargs, control_image=_control_images(2, seed=5), generator=_seeded()).images
    assert np.abs(different - results[0]).max() > 1e-3


def test_num_images_per_prompt_repeats_each_prompts_control_image(pipe):
    # Prompts of equal token length: diffusers' Sana `encode_prompt` (inherited) tiles the attention mask
    # ([p0, p1, p0, p1]) but interleaves the embeddings ([p0, p0, p1, p1]) when num_images_per_prompt > 1, so prompts
    # of different lengths get each other's masks. That defect is the text path's, not the control image's.
    prompts = ["a red cat", "a blue dog"]
    images = _control_images(2)
    kwargs = dict(FAST, num_inference_steps=1)
    batch = pipe(
        **kwargs,
        prompt=prompts,
        control_image=images,
        num_images_per_prompt=2,
        generator=[_seeded(i) for i in range(4)],
    ).images
    second = pipe(
        **kwargs,
        prompt=prompts[1],
        control_image=images[1],
        num_images_per_prompt=2,
        generator=[_seeded(i) for i in (2, 3)],
    ).images
    assert batch.shape == (4, 32, 32, 3)
    assert np.abs(batch[2:] - second).max() <= 1e-5


def test_resolution_binning_resizes_the_control_image(pipe):
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        seen.append((tuple(callback_kwargs["latents"].shape), tuple(callback_kwargs["control_image"].shape)))
        return {}

    image = pipe(
        prompt="a cat",
        height=48,
        width=32,
        control_image=_control_images(1),
        complex_human_instruction=None,
        output_type="np",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "control_image"],
    ).images
    bin_height, bin_width = pipe.image_processor.classify_height_width_bin(48, 32, pipe.resolution_bins())
    assert image.shape == (1, 48, 32, 3)
    assert seen == [((1, 4, bin_height // 2, bin_width // 2),) * 2] * 2


def test_save_pretrained_round_trip_and_controlnet_from_a_plain_sprint_folder(pipe, parts, tmp_path):
    pipe.save_pretrained(tmp_path / "full")
    index = json.loads((tmp_path / "full" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "SanaControlNetModel"]
    # the transformer and scheduler in the stock-diffusers layout (SanaSprintPipeline.save_pretrained's default)
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    kwargs = dict(FAST, prompt=PROMPTS, num_inference_steps=2, control_image=_control_images())
    expected = pipe(**kwargs, generator=_seeded()).images
    again = SanaSprintControlNetPipeline.from_pretrained(tmp_path / "full")
    again.set_progress_bar_config(disable=True)
    assert type(again.controlnet) is SanaControlNetModel
    assert np.abs(again(**kwargs, generator=_seeded()).images - expected).max() == 0

    SanaSprintPipeline(**{k: v for k, v in parts.items() if k != "controlnet"}).save_pretrained(tmp_path / "plain")
    pipe.controlnet.save_pretrained(tmp_path / "controlnet")
    combined = SanaSprintControlNetPipeline.from_pretrained(
        tmp_path / "plain", controlnet=SanaControlNetModel.from_pretrained(tmp_path / "controlnet")
    )
    combined.set_progress_bar_config(disable=True)
    assert np.abs(combined(**kwargs, generator=_seeded()).images - expected).max() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(control_image=None), ValueError, "control_image"),
        (dict(controlnet_conditioning_scale="strong"), TypeError, "controlnet_conditioning_scale"),
        (dict(controlnet_conditioning_scale=True), TypeError, "controlnet_conditioning_scale"),
        (dict(controlnet_conditioning_scale=[1.0]), TypeError, "controlnet_conditioning_scale"),
        (dict(controlnet_conditioning_scale=math.inf), ValueError, "controlnet_conditioning_scale"),
        (dict(control_image=_control_images(3)), ValueError, "control_image"),
        (dict(height=33), ValueError, "height"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(timesteps=[1.0, 1.3]), ValueError, "descending"),
        (dict(guidance_scale=None), ValueError, "guidance_scale"),
        (dict(prompt=None), ValueError, "prompt_embeds"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(pipe, kwargs, error, match):
    call = dict(prompt=PROMPTS, height=32, width=32, complex_human_instruction=None, control_image=_control_images())
    call.update(kwargs)
    with pytest.raises(error, match=match):
        pipe(**call)


@pytest.mark.parametrize("missing", ["controlnet", "transformer", "vae"])
def test_a_pipeline_built_without_a_component_names_it(parts, missing):
    """Like the text-to-image and img2img pipelines: a clear ValueError, not an AttributeError from deep inside."""
    pipe = SanaSprintControlNetPipeline(**dict(parts, **{missing: None}))
    with pytest.raises(ValueError, match=f"built without `{missing}`, which generating images needs"):
        pipe(PROMPTS, height=32, width=32, complex_human_instruction=None, control_image=_control_images())


def test_constructor_rejects_a_non_sana_controlnet(parts, make_diffusers_transformer):
    with pytest.raises(TypeError, match="controlnet"):
        SanaSprintControlNetPipeline(**dict(parts, controlnet=parts["transformer"]))
    with pytest.raises(TypeError, match="transformer"):
        SanaSprintControlNetPipeline(**dict(parts, transformer=make_diffusers_transformer(student=True)))


def test_dense_time_teacher_honours_timestep_scale_where_diffusers_controlnet_pipeline_does_not(
    parts, make_diffusers_transformer
):
    """A dense-time flow teacher (`timestep_scale=0.001`, as the toy teacher and SANA-Sprint teachers): at ControlNet
    scale 0 ours equals diffusers' SanaPipeline, which applies `timestep_scale`; diffusers' SanaControlNetPipeline
    feeds `1000 s` unscaled (it never reads `timestep_scale`), so its images differ."""
    from diffusers import SanaPipeline

    teacher = make_diffusers_transformer(student=False, timestep_scale=0.001)
    common = {k: parts[k] for k in ("tokenizer", "text_encoder", "vae")}
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = SanaPipeline(**common, transformer=teacher, scheduler=flow)
    theirs = SanaControlNetPipeline(**common, transformer=teacher, controlnet=parts["controlnet"], scheduler=flow)
    ours = SanaSprintControlNetPipeline(
        **common,
        transformer=_ours(teacher),
        controlnet=parts["controlnet"],
        scheduler=TrigFlowScheduler(sampler="ode"),
    )
    for p in (plain, theirs, ours):
        p.set_progress_bar_config(disable=True)
    steps, kwargs = 4, dict(FAST, prompt=PROMPTS, use_resolution_binning=False)
    control = dict(control_image=_control_images(), controlnet_conditioning_scale=0.0)
    expected = plain(**kwargs, num_inference_steps=steps, guidance_scale=1.0, generator=_seeded()).images
    got = ours(**kwargs, **control, timesteps=_flow_grid(steps), guidance_scale=None, generator=_seeded()).images
    unscaled = theirs(**kwargs, **control, num_inference_steps=steps, guidance_scale=1.0, generator=_seeded()).images
    assert np.abs(got - expected).max() <= PARITY_ATOL
    assert np.abs(unscaled - expected).max() > 1e-2
