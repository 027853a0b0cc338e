"""training.teacher fine-tune helpers: caption dropout, QK-norm calibration inputs, SanaPipeline time units."""

import math

import pytest
import torch

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.training import prepare_sprint_teacher
from diffusers_sprint.training.teacher import (
    drop_captions,
    sample_finetune_time,
    teacher_calibration_inputs,
    use_sana_pipeline_time_convention,
)


def test_drop_captions_replaces_rows_by_the_empty_prompt(text_conditioning):
    embeds, mask = text_conditioning(64, seq_len=5)
    null, null_mask = torch.zeros(1, 5, 16), torch.tensor([[1, 0, 0, 0, 0]])
    same = drop_captions(embeds, mask, null, null_mask, 0.0)
    assert torch.equal(same[0], embeds) and torch.equal(same[1], mask) and not same[2].any()
    dropped_embeds, dropped_mask, dropped = drop_captions(
        embeds, mask, null, null_mask, 0.5, generator=torch.Generator().manual_seed(0)
    )
    assert 16 < int(dropped.sum()) < 48
    assert torch.equal(dropped_embeds[dropped], null.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(dropped_mask[dropped], null_mask.expand(int(dropped.sum()), -1))
    assert torch.equal(dropped_embeds[~dropped], embeds[~dropped])
    assert drop_captions(embeds, mask, null, null_mask, 1.0)[2].all()
    with pytest.raises(ValueError, match="probability"):
        drop_captions(embeds, mask, null, null_mask, 1.5)


def test_calibration_inputs_are_the_flow_models_view_of_the_trigflow_sample(
    make_diffusers_transformer, text_conditioning
):
    """Prop. 3.1: trigflow_forward(x_t / sigma_d, t) = ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)."""
    flow = SanaSprintTransformer2DModel.from_config(make_diffusers_transformer(student=False, sample_size=8).config)
    flow.load_state_dict(make_diffusers_transformer(student=False, sample_size=8).state_dict())
    x0 = torch.randn(3, 4, 8, 8) * 0.5
    embeds, mask = text_conditioning(3, seq_len=6)
    inputs = teacher_calibration_inputs(flow, x0, embeds, mask, 0.5, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # the same draws: t, then z
    t = sample_finetune_time(3, generator=generator)
    z = torch.randn(x0.shape, generator=generator) * 0.5
    x_t = torch.cos(t)[:, None, None, None] * x0 + torch.sin(t)[:, None, None, None] * z
    s = (torch.sin(t) / (torch.sin(t) + torch.cos(t)))[:, None, None, None]
    torch.testing.assert_close(inputs["timestep"], s.flatten() * 1000)
    with torch.no_grad():
        v = flow(**inputs).sample
        expected = ((1 - 2 * s) * inputs["hidden_states"] + (1 - 2 * s + 2 * s**2) * v) / torch.sqrt(
            s**2 + (1 - s) ** 2
        )
        torch.testing.assert_close(flow.trigflow_forward(x_t / 0.5, t, embeds, mask).sample, expected)
    teacher = prepare_sprint_teacher(flow, calibration_inputs=inputs)
    gains = torch.stack([block.attn2.norm_q.weight.mean() for block in teacher.transformer_blocks])
    assert not torch.allclose(gains, torch.ones_like(gains))


def test_sana_pipeline_time_convention_keeps_trigflow_and_fixes_sana_pipeline_units(
    make_diffusers_transformer, text_conditioning
):
    teacher = prepare_sprint_teacher(make_diffusers_transformer(student=False, sample_size=8))
    assert teacher.config.flow_time_scale == 1.0 and teacher.config.timestep_scale == 1.0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 1.1])
    embeds, mask = text_conditioning(2, seq_len=6)
    with torch.no_grad():
        before = teacher.trigflow_forward(x, t, embeds, mask).sample
        use_sana_pipeline_time_convention(teacher)
        after = teacher.trigflow_forward(x, t, embeds, mask).sample
    assert teacher.config.flow_time_scale is None and math.isclose(teacher.config.timestep_scale, 1e-3)
    assert teacher.effective_flow_time_scale == 1.0
    assert torch.equal(before, after)
    # diffusers' SanaPipeline feeds `1000 s * timestep_scale`: now the dense `s` the teacher was tuned with.
    s = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        via_pipeline = teacher(x, embeds, 1000 * s * teacher.config.timestep_scale, encoder_attention_mask=mask).sample
        dense = teacher(x, embeds, s, encoder_attention_mask=mask).sample
    torch.testing.assert_close(via_pipeline, dense)
    with pytest.raises(ValueError, match="teachers"):
        use_sana_pipeline_time_convention(SanaSprintTransformer2DModel(**make_diffusers_transformer().config))
