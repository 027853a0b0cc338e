"""The official SANA-Sprint recipe, switch by switch (docs/training.md, "The official recipe, switch by switch").

Each switch changes what it should and nothing else, checked against an independent computation on tiny models.
"""

import math

import pytest
import torch
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.models import Float32SanaLinearAttnProcessor, TrigFlowModel, set_fp32_linear_attention
from diffusers_sprint.training import DistillationBatch, SCMLossConfig, build_student, default_head_block_ids, scm_loss
from diffusers_sprint.training.recipe import DISTILLATION, distillation_config, parse_recipe
from diffusers_sprint.training.scm import teacher_cfg_velocity


SIGMA_DATA = 0.5


def _script(load_module):
    """The script's own wiring functions (make_student, head_block_ids, ...); its recipe is the library's."""
    return load_module("examples/train_sana_sprint.py", name="train_sana_sprint_for_switches")


@pytest.fixture(scope="module")
def script(load_module):
    return _script(load_module)


def _args(script, *extra):
    return parse_recipe(
        DISTILLATION, ["--pretrained_teacher_model_name_or_path", "teacher", "--dataset_name", "data", *extra]
    )


def _teacher(make_diffusers_transformer, transformer_config, seed: int = 1) -> SanaSprintTransformer2DModel:
    """A tiny flow teacher with dense time (`timestep_scale=0.001`), frozen."""
    model = SanaSprintTransformer2DModel(**transformer_config(student=False), timestep_scale=0.001)
    model.load_state_dict(make_diffusers_transformer(student=False, seed=seed).state_dict())
    return model.eval().requires_grad_(False)


def _inputs(text_conditioning, batch_size: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = SIGMA_DATA * torch.randn(batch_size, 4, 16, 16, generator=generator)
    z = SIGMA_DATA * torch.randn(batch_size, 4, 16, 16, generator=generator)
    t = torch.linspace(0.3, 1.3, batch_size)
    w = torch.tensor([4.0, 5.0, 4.5][:batch_size])
    embeds, mask = text_conditioning(batch_size=batch_size)
    null_embeds, null_mask = text_conditioning(batch_size=1, seed=7, padded=False)
    null_mask[0, 2:] = 0  # an empty prompt: bos + eos, the rest padding
    return x0, z, t, w, embeds, mask, null_embeds, null_mask


class RecordingTeacher(torch.nn.Module):
    """A `TrigFlowModel` teacher that records the inputs and outputs of every call."""

    def __init__(self, teacher):
        super().__init__()
        self.inner = TrigFlowModel(teacher)
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, **kwargs):
        out = self.inner(sample, timestep, encoder_hidden_states, encoder_attention_mask, **kwargs)
        self.calls.append((sample, timestep, encoder_hidden_states, encoder_attention_mask, out[0]))
        return out


def _teacher_calls(
    make_diffusers_transformer, text_conditioning, transformer_config, config: SCMLossConfig, student=None
):
    teacher = _teacher(make_diffusers_transformer, transformer_config)
    recording = RecordingTeacher(teacher)
    student = build_student(teacher, logvar_head=False) if student is None else student
    x0, z, t, w, embeds, mask, null_embeds, null_mask = _inputs(text_conditioning)
    config.adaptive_weight = False
    scm_loss(student, recording, DistillationBatch(x0, embeds, mask, null_embeds, null_mask), z, t, w, 0, config)
    assert len(recording.calls) == 1
    return teacher, recording.calls[0], (x0, z, t, w, embeds, mask, null_embeds, null_mask)


# ---------------------------------------------------------------------------------------------------------------------
# CFG null branch: the caption's mask (official) or the empty prompt's own
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("null_branch_mask", ["conditional", "null"])
def test_null_branch_mask(null_branch_mask, make_diffusers_transformer, text_conditioning, transformer_config):
    """The teacher's unconditional half equals the transformer on the empty embedding under the caption's mask
    (official) or its own mask; the conditional half is the same either way; the two choices differ (the first row's
    caption is half padded, so the masks differ)."""
    teacher, (sample, time, embeds_in, mask_in, velocity), inputs = _teacher_calls(
        make_diffusers_transformer,
        text_conditioning,
        transformer_config,
        SCMLossConfig(null_branch_mask=null_branch_mask),
    )
    x0, z, t, w, embeds, mask, null_embeds, null_mask = inputs
    batch = x0.shape[0]
    x_scaled = (torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z) / SIGMA_DATA
    with torch.no_grad():
        expected_mask = mask if null_branch_mask == "conditional" else null_mask.expand(batch, -1)
        uncond = teacher.trigflow_forward(x_scaled, t, null_embeds.expand(batch, -1, -1), expected_mask).sample
        other_mask = null_mask.expand(batch, -1) if null_branch_mask == "conditional" else mask
        other = teacher.trigflow_forward(x_scaled, t, null_embeds.expand(batch, -1, -1), other_mask).sample
        cond = teacher.trigflow_forward(x_scaled, t, embeds, mask).sample
    torch.testing.assert_close(mask_in[:batch], expected_mask.to(mask_in.dtype), rtol=0, atol=0)
    torch.testing.assert_close(velocity[:batch], uncond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(velocity[batch:], cond, rtol=1e-5, atol=1e-6)
    assert (velocity[:batch] - other).abs().max() > 1e-3
    torch.testing.assert_close(embeds_in[batch:], embeds, rtol=0, atol=0)


def test_null_branch_mask_is_validated():
    with pytest.raises(ValueError, match="`null_branch_mask` must be one of"):
        SCMLossConfig(null_branch_mask="empty")


# ---------------------------------------------------------------------------------------------------------------------
# Students without a guidance embedder: the unguided conditional teacher (official) or CFG
# ---------------------------------------------------------------------------------------------------------------------


def test_unguided_teacher_target_is_the_conditional_velocity(
    make_diffusers_transformer, text_conditioning, transformer_config
):
    """`guide_teacher=False`: one teacher forward, on the captions alone, and the loss equals the one whose teacher
    target is `sigma_d F_T(x_t | c)` computed independently; with CFG the loss differs."""
    student = build_student(
        _teacher(make_diffusers_transformer, transformer_config, seed=2), logvar_head=False, guidance_embeds=False
    )  # not the teacher itself
    teacher, (sample, time, embeds_in, mask_in, velocity), inputs = _teacher_calls(
        make_diffusers_transformer, text_conditioning, transformer_config, SCMLossConfig(guide_teacher=False), student
    )
    x0, z, t, w, embeds, mask, null_embeds, null_mask = inputs
    assert embeds_in.shape[0] == x0.shape[0]  # no null branch
    torch.testing.assert_close(embeds_in, embeds, rtol=0, atol=0)
    x_scaled = (torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z) / SIGMA_DATA
    with torch.no_grad():
        expected = teacher.trigflow_forward(x_scaled, t, embeds, mask).sample
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)

    # The loss: the same as a CFG teacher at w = 1 (null + 1 (c - null) = c), unlike the CFG teacher at w.
    config = SCMLossConfig(guide_teacher=False, adaptive_weight=False)
    args = (DistillationBatch(x0, embeds, mask, null_embeds, null_mask), z, t)
    unguided = scm_loss(student, teacher, *args, w, 0, config).loss
    at_one = scm_loss(student, teacher, *args, torch.ones_like(w), 0, SCMLossConfig(adaptive_weight=False)).loss
    guided = scm_loss(student, teacher, *args, w, 0, SCMLossConfig(adaptive_weight=False)).loss
    torch.testing.assert_close(unguided, at_one, rtol=1e-5, atol=0)
    assert abs(unguided.item() - guided.item()) > 1e-3 * abs(guided.item())


def test_script_guides_the_teacher_of_students_without_embedder_by_default(script):
    """Default (ours, measured better): CFG for every student; --no-teacher_cfg_without_guidance_embeds (official):
    the conditional teacher for a student without embedder, CFG still for one with it."""
    args = _args(script)
    assert distillation_config(args, False, student_has_guidance_embedder=True).scm.guide_teacher
    assert distillation_config(args, False, student_has_guidance_embedder=False).scm.guide_teacher
    args = _args(script, "--no-teacher_cfg_without_guidance_embeds")
    assert not distillation_config(args, False, student_has_guidance_embedder=False).scm.guide_teacher
    assert distillation_config(args, False, student_has_guidance_embedder=True).scm.guide_teacher
    assert distillation_config(_args(script), False).scm.null_branch_mask == "conditional"
    assert distillation_config(_args(script, "--cfg_null_mask", "null"), False).scm.null_branch_mask == "null"


# ---------------------------------------------------------------------------------------------------------------------
# fp32 linear attention with autocast off
# ---------------------------------------------------------------------------------------------------------------------


def _linear_attention_capture(attn, hidden_states):
    """Run `attn` on `hidden_states` under bf16 autocast; return the q/k/v it computed (after the norms) and the
    attention product handed to its output projection."""
    captured = {}
    hooks = [
        attn.norm_q.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        attn.norm_k.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
        attn.to_v.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o)),
        attn.to_out[0].register_forward_pre_hook(lambda m, i: captured.__setitem__("product", i[0])),
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            attn(hidden_states)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _linear_attention_float64(q, k, v, heads):
    """Sana's linear attention in float64: `out_i = sum_j (v_j k_j^T) relu(q_i) / sum_j k_j^T relu(q_i)` per head."""
    q, k, v = (x.double().unflatten(-1, (heads, -1)) for x in (q, k, v))  # (batch, tokens, heads, dim)
    q, k = q.relu(), k.relu()
    numerator = torch.einsum("bjhd,bjhe,bihe->bihd", v, k, q)
    denominator = torch.einsum("bjhe,bihe->bih", k, q)[..., None]
    return (numerator / (denominator + 1e-15)).flatten(2)


def test_fp32_linear_attention_under_bf16_autocast(make_diffusers_transformer, transformer_config):
    """Under bf16 autocast the fp32 processor's attention product equals the float64 computation on the same
    (bf16) q, k, v to ~1e-6; diffusers' processor, whose matmuls autocast lowers to bf16, is off by ~1e-3."""
    model = SanaSprintTransformer2DModel(**transformer_config(student=True, num_attention_heads=2))
    model.load_state_dict(make_diffusers_transformer(student=True).state_dict())
    attn = model.transformer_blocks[0].attn1
    hidden_states = torch.randn(2, 256, 16, generator=torch.Generator().manual_seed(0))

    errors = {}
    for name, processor in (("fp32", Float32SanaLinearAttnProcessor()), ("stock", SanaLinearAttnProcessor2_0())):
        attn.set_processor(processor)
        captured = _linear_attention_capture(attn, hidden_states)
        assert captured["v"].dtype == torch.bfloat16  # autocast ran the projections in bf16
        reference = _linear_attention_float64(captured["q"], captured["k"], captured["v"], attn.heads)
        errors[name] = ((captured["product"].double() - reference).abs().max() / reference.abs().max()).item()
    assert errors["fp32"] < 1e-6, errors
    assert errors["stock"] > 1e-3, errors


def test_set_fp32_linear_attention_switches_self_attention_only(
    make_diffusers_transformer, text_conditioning, transformer_config
):
    """Only each block's linear self-attention changes processor (the cross-attention keeps softmax); in fp32
    without autocast the model output is unchanged; `enabled=False` restores diffusers' processor; the JVP works."""
    model = SanaSprintTransformer2DModel(**transformer_config(student=True))
    model.load_state_dict(make_diffusers_transformer(student=True).state_dict())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4, 1.1])
    embeds, mask = text_conditioning(batch_size=2)
    guidance = torch.tensor([4.0, 5.0])

    def velocity(sample, time):
        return model.trigflow_forward(sample, time, embeds, mask, guidance_scale=guidance).sample

    with torch.no_grad():
        reference = velocity(x, t)
        _, reference_tangent = torch.func.jvp(velocity, (x, t), (torch.ones_like(x), torch.ones_like(t)))
    assert set_fp32_linear_attention(model) == len(model.transformer_blocks)
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, Float32SanaLinearAttnProcessor)
        assert isinstance(block.attn2.processor, SanaAttnProcessor2_0)
    with torch.no_grad():
        torch.testing.assert_close(velocity(x, t), reference, rtol=1e-6, atol=1e-7)
        _, tangent = torch.func.jvp(velocity, (x, t), (torch.ones_like(x), torch.ones_like(t)))
    torch.testing.assert_close(tangent, reference_tangent, rtol=1e-5, atol=1e-6)
    assert set_fp32_linear_attention(model, enabled=False) == len(model.transformer_blocks)
    assert all(type(block.attn1.processor) is SanaLinearAttnProcessor2_0 for block in model.transformer_blocks)


def test_script_sets_fp32_linear_attention_on_the_student_only(script, make_diffusers_transformer, transformer_config):
    teacher = _teacher(make_diffusers_transformer, transformer_config)
    for flag, expected in (([], Float32SanaLinearAttnProcessor), (["--no-fp32_linear_attention"], None)):
        student = script.make_student(_args(script, *flag), teacher, seed=0)
        processors = {type(block.attn1.processor) for block in student.transformer_blocks}
        assert processors == {expected or SanaLinearAttnProcessor2_0}
        assert all(type(block.attn1.processor) is SanaLinearAttnProcessor2_0 for block in teacher.transformer_blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator learning rate: constant from step 0 (official) or the generator's schedule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "generator"])
def test_discriminator_lr_schedule(script, schedule):
    """With a 10-step generator warm-up: the heads' lr is the set lr at step 0 and never moves (official), or
    follows the generator's warm-up exactly; the generator's schedule is the same either way."""
    args = _args(
        script,
        *("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10"),
        *("--learning_rate", "2e-6", "--discriminator_learning_rate", "1e-5"),
        *("--discriminator_lr_schedule", schedule),
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    optimizer_d = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.discriminator_learning_rate)
    lr_scheduler, lr_scheduler_d = script.make_lr_schedulers(args, optimizer, optimizer_d)
    g_lrs, d_lrs = [], []
    for _ in range(15):
        g_lrs.append(optimizer.param_groups[0]["lr"])
        d_lrs.append(optimizer_d.param_groups[0]["lr"])
        optimizer.step(), optimizer_d.step()
        lr_scheduler.step(), lr_scheduler_d.step()
    expected_g = [2e-6 * min(1.0, step / 10) for step in range(15)]
    assert g_lrs == pytest.approx(expected_g, rel=1e-12, abs=0)
    if schedule == "constant":
        assert d_lrs == [1e-5] * 15
    else:
        assert d_lrs == pytest.approx([1e-5 * min(1.0, step / 10) for step in range(15)], rel=1e-12, abs=0)
    assert script.make_lr_schedulers(args, optimizer, None)[1] is None


# ---------------------------------------------------------------------------------------------------------------------
# Head blocks
# ---------------------------------------------------------------------------------------------------------------------


def test_default_head_blocks_official_and_spread():
    """Official: (2, 8, 14, 19) for 20 blocks (1.6B) and for 28 blocks (0.6B: the official config keeps them);
    spread: the same fractions of the depth. Below 20 blocks both spread."""
    assert default_head_block_ids(20) == [2, 8, 14, 19]
    assert default_head_block_ids(28) == [2, 8, 14, 19]
    assert default_head_block_ids(60) == [2, 8, 14, 19]
    assert default_head_block_ids(28, "spread") == [3, 11, 20, 27]
    assert default_head_block_ids(20, "spread") == [2, 8, 14, 19]
    for depth in (1, 2, 6, 19):
        assert default_head_block_ids(depth) == default_head_block_ids(depth, "spread")
    with pytest.raises(ValueError, match="`layout` must be one of"):
        default_head_block_ids(28, "even")


def test_script_head_blocks_for_a_28_block_teacher(script, transformer_config):
    teacher = SanaSprintTransformer2DModel(**transformer_config(student=False, num_layers=28), logvar_head=False)
    assert script.head_block_ids(_args(script), teacher) == [2, 8, 14, 19]
    assert script.head_block_ids(_args(script, "--head_block_layout", "spread"), teacher) == [3, 11, 20, 27]
    explicit = _args(script, "--head_block_ids", "1", "5", "--head_block_layout", "spread")
    assert script.head_block_ids(explicit, teacher) == [1, 5]


# ---------------------------------------------------------------------------------------------------------------------
# Teacher precision: fp32 under autocast (official) or cast to the autocast dtype
# ---------------------------------------------------------------------------------------------------------------------


def test_teacher_precision(script, make_diffusers_transformer, text_conditioning, transformer_config):
    """--teacher_fp32 keeps fp32 weights: under bf16 autocast the teacher CFG velocity (the sCM target) equals an
    independent fp32 copy run under autocast exactly; --no-teacher_fp32 casts the weights to bf16 and the target
    moves (by bf16 rounding of the weights the autocast leaves alone: norms, biases, time path)."""
    x0, z, t, w, embeds, mask, null_embeds, null_mask = _inputs(text_conditioning)
    x_scaled = (torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z) / SIGMA_DATA
    cfg = (x_scaled, t, embeds, mask, null_embeds, mask, w)
    reference = TrigFlowModel(_teacher(make_diffusers_transformer, transformer_config))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = teacher_cfg_velocity(reference, *cfg)
        targets = {}
        for flag in ("--teacher_fp32", "--no-teacher_fp32"):
            model = script.frozen_teacher_model(
                _args(script, flag),
                _teacher(make_diffusers_transformer, transformer_config),
                None,
                "cpu",
                torch.bfloat16,
            )
            dtypes = {p.dtype for p in model.parameters()}
            assert dtypes == ({torch.float32} if flag == "--teacher_fp32" else {torch.bfloat16}), flag
            targets[flag] = teacher_cfg_velocity(model, *cfg)
    torch.testing.assert_close(targets["--teacher_fp32"], expected, rtol=0, atol=0)
    difference = (targets["--no-teacher_fp32"] - expected).abs().max() / expected.abs().max()
    assert difference > 1e-4, difference.item()
    assert math.isfinite(difference.item())


def test_fake_from_scm_forward_flag(script):
    """The LADD fake: ours reuses the sCM term's t/z (default), official draws fresh ones; sharded runs always take
    the official draw (every rank must run the same forwards)."""
    assert distillation_config(_args(script), False).fake_from_scm_forward
    assert not distillation_config(_args(script, "--no-fake_from_scm_forward"), False).fake_from_scm_forward
    assert not distillation_config(_args(script), True).fake_from_scm_forward
