"""TrigFlowScheduler: SCMScheduler compatibility, any step count, custom grids, consistency and ODE steps."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SCMScheduler

from diffusers_sprint import SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.schedulers import PAPER_TIMESTEP_PRESETS


def test_loads_scm_scheduler_config_and_folder(tmp_path):
    SCMScheduler(sigma_data=0.4).save_pretrained(tmp_path)
    from_folder = TrigFlowScheduler.from_pretrained(tmp_path)
    from_config = TrigFlowScheduler.from_config(SCMScheduler().config)
    assert from_folder.config.sigma_data == 0.4 and from_config.config.sigma_data == 0.5
    assert from_config.config.sampler == "consistency"


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_default_grid_matches_diffusers_where_diffusers_runs(steps):
    ours = TrigFlowScheduler()
    ours.set_timesteps(steps)
    reference = SCMScheduler()
    reference.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    torch.testing.assert_close(ours.timesteps, reference.timesteps, rtol=0, atol=1e-7)
    assert ours.num_inference_steps == steps and ours.timesteps[-1] == 0


def test_intermediate_timesteps_sequence_and_presets():
    scheduler = TrigFlowScheduler()
    scheduler.set_timesteps(3, intermediate_timesteps=[1.2, 0.4])
    assert scheduler.timesteps.tolist() == pytest.approx([1.5708, 1.2, 0.4, 0.0])
    for steps, grid in PAPER_TIMESTEP_PRESETS.items():
        scheduler.set_timesteps(steps, preset="paper")
        assert scheduler.timesteps.tolist() == pytest.approx(list(grid))
    assert PAPER_TIMESTEP_PRESETS[4] == pytest.approx((math.atan(400), 1.3, 1.1, 0.6, 0.0))


@pytest.mark.parametrize(
    "grid, expected",
    [([1.5683, 1.3, 1.1, 0.6], [1.5683, 1.3, 1.1, 0.6, 0.0]), ([1.0, 0.0], [1.0, 0.0]), ([math.pi / 2], [1.5708, 0])],
)
def test_custom_timesteps_with_or_without_final_zero(grid, expected):
    scheduler = TrigFlowScheduler()
    scheduler.set_timesteps(timesteps=grid)
    assert scheduler.timesteps.tolist() == pytest.approx(expected, abs=1e-4)
    assert scheduler.num_inference_steps == len(expected) - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.0), "num_inference_steps"),
        (dict(), "num_inference_steps"),
        (dict(timesteps=[1.0, 1.2]), "descending"),
        (dict(timesteps=[2.0, 1.0]), r"\[0, pi/2\]"),
        (dict(timesteps=[1.0, -0.5]), r"\[0, pi/2\]"),
        (dict(timesteps=[]), "empty"),
        (dict(num_inference_steps=3, preset="paper"), "preset"),
        (dict(num_inference_steps=2, preset="fast"), "preset"),
        (dict(num_inference_steps=3, intermediate_timesteps=[1.0]), "intermediate_timesteps"),
        (dict(num_inference_steps=2, max_timesteps=3.0), "max_timesteps"),
    ],
)
def test_set_timesteps_errors_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrigFlowScheduler().set_timesteps(**kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="sampler"):
        TrigFlowScheduler(sampler="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        TrigFlowScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="sigma_data"):
        TrigFlowScheduler(sigma_data=0)


def test_consistency_step_matches_scm_scheduler_and_draws_no_noise_at_the_end():
    ours, reference = TrigFlowScheduler(), SCMScheduler()
    ours.set_timesteps(2)
    reference.set_timesteps(2, intermediate_timesteps=1.3)
    sample = torch.randn(2, 4, 8, 8) * 0.5
    generator_ours, generator_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in ours.timesteps[:-1]:
        model_output = torch.randn(2, 4, 8, 8)
        state_before = generator_ours.get_state()
        prev, x0 = ours.step(model_output, t, sample, generator=generator_ours, return_dict=False)
        prev_ref, x0_ref = reference.step(model_output, t, sample, generator=generator_ref, return_dict=False)
        torch.testing.assert_close(prev, prev_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(x0, x0_ref, rtol=0, atol=1e-6)
        sample = prev
    # The last step (to t = 0) returned x0_hat without touching the generator.
    assert torch.equal(generator_ours.get_state(), state_before)
    torch.testing.assert_close(prev, x0, rtol=0, atol=0)


def test_step_denoises_with_the_trigflow_formula():
    scheduler = TrigFlowScheduler(sampler="ode")
    scheduler.set_timesteps(timesteps=[1.2, 0.5])
    x_t, velocity = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = scheduler.step(velocity, scheduler.timesteps[0], x_t)
    t, t_next = torch.tensor(1.2), torch.tensor(0.5)
    x0 = torch.cos(t) * x_t - torch.sin(t) * velocity
    z = torch.sin(t) * x_t + torch.cos(t) * velocity
    torch.testing.assert_close(out.pred_original_sample, x0)
    torch.testing.assert_close(out.prev_sample, torch.cos(t_next) * x0 + torch.sin(t_next) * z)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler_with_grid().step(velocity, 0.77, x_t)


def scheduler_with_grid():
    scheduler = TrigFlowScheduler()
    scheduler.set_timesteps(2)
    return scheduler


def test_step_errors():
    with pytest.raises(ValueError, match="set_timesteps"):
        TrigFlowScheduler().step(torch.zeros(1), 1.0, torch.zeros(1))
    scheduler = scheduler_with_grid()
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps[:-1]:
        scheduler.step(torch.zeros(1), t, torch.zeros(1))
    with pytest.raises(ValueError, match="all were taken"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))


def test_add_noise():
    scheduler = TrigFlowScheduler(sigma_data=0.5)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0.0, 0.7, math.pi / 2])
    noisy = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[1], math.cos(0.7) * x0[1] + math.sin(0.7) * 0.5 * noise[1])
    torch.testing.assert_close(noisy[2], 0.5 * noise[2], atol=1e-6, rtol=0)


def test_ode_sampling_of_a_flow_teacher_equals_flow_match_euler(
    make_diffusers_transformer, text_conditioning, transformer_config
):
    """Prop. 3.1 + DDIM in TrigFlow on the grid t = atan(s / (1 - s)) is the flow Euler sampler, step for step."""
    reference = make_diffusers_transformer(student=False)
    teacher = SanaSprintTransformer2DModel(**transformer_config(student=False)).eval()
    teacher.load_state_dict(reference.state_dict())
    embeds, mask = text_conditioning()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = 8

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in flow.timesteps:
            velocity = reference(x, embeds, timestep=t.expand(2), encoder_attention_mask=mask).sample
            x = flow.step(velocity, t, x).prev_sample
    flow_result = x

    sigma_data = 0.5
    trig = TrigFlowScheduler(sampler="ode", sigma_data=sigma_data)
    trig.set_timesteps(timesteps=TrigFlowScheduler.timesteps_from_flow_sigmas(flow.sigmas))
    x = noise * sigma_data  # at s = 1 (t = pi/2) x_t = sigma_data * x_s
    with torch.no_grad():
        for t in trig.timesteps[:-1]:
            velocity = teacher.trigflow_forward(x / sigma_data, t.expand(2), embeds, mask).sample
            x = trig.step(velocity * sigma_data, t, x).prev_sample
    trig_result = x / sigma_data  # at t = 0, x_t = x0 = sigma_data * x_0 (flow units)

    assert trig.num_inference_steps == steps
    assert (flow_result - noise).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(trig_result, flow_result, rtol=0, atol=1e-5)


def test_strength_timesteps_scale_the_flow_time():
    grid = [1.57080, 1.3, 0.6, 0.0]
    assert TrigFlowScheduler.strength_timesteps(grid, 1.0) == grid
    for strength in (0.05, 0.3, 0.35, 0.9):
        moved = TrigFlowScheduler.strength_timesteps(grid, strength)
        for before, after in zip(grid, moved):
            flow_before = math.sin(before) / (math.sin(before) + math.cos(before))
            flow_after = math.sin(after) / (math.sin(after) + math.cos(after))
            assert flow_after == pytest.approx(strength * flow_before, abs=1e-12)
        assert moved[-1] == 0.0 and all(a > b for a, b in zip(moved, moved[1:]))
    starts = [TrigFlowScheduler.strength_timesteps(grid, s)[0] for s in (0.1, 0.3, 0.35, 0.6, 1.0)]
    assert all(a < b for a, b in zip(starts, starts[1:]))
    assert TrigFlowScheduler.strength_timesteps(grid, 0.5)[0] == pytest.approx(math.pi / 4, abs=1e-5)


def test_set_timesteps_with_strength_and_bad_strengths():
    scheduler = TrigFlowScheduler()
    scheduler.set_timesteps(2, strength=0.5)
    expected = TrigFlowScheduler.strength_timesteps([1.57080, 1.3, 0.0], 0.5)
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(expected, dtype=torch.float32))
    for bad in (0.0, -0.1, 1.01, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            scheduler.set_timesteps(2, strength=bad)
