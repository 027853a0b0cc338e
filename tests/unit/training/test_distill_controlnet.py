"""ControlNet distillation: the control latents reach every model call of a step, and nothing else changes.

Teacher = a dense-time flow transformer + a (perturbed) `SanaControlNetModel`; student = `build_student(teacher)` +
`init_student_controlnet`. Each place the condition must reach (the teacher's CFG velocity, the student's forward and
JVP tangent, the LADD fake, the discriminator's teacher features) is compared with an independent computation through
`trigflow_forward(..., controlnet=...)` and shown to depend on the condition.
"""

import math

import pytest
import torch
from diffusers import SanaControlNetModel

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.models import TrigFlowInputs, TrigFlowModel, unwrap_trigflow_controlnet
from diffusers_sprint.training import (
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SanaDiscriminator,
    SCMLossConfig,
    build_student,
    discriminator_step,
    generator_step,
    scm_loss,
    teacher_cfg_velocity,
)
from diffusers_sprint.training.controlnet import (
    apply_controlnet_training_mode,
    check_controlnet_matches,
    init_student_controlnet,
)
from diffusers_sprint.training.tangent import trigflow_velocity_jvp


SIGMA_DATA = 0.5
BATCH, SEQ_LEN = 3, 5
TOL = 1e-6


def make_teacher(make_diffusers_transformer, flow_time_scale: float = 1.0) -> SanaSprintTransformer2DModel:
    flow = make_diffusers_transformer(student=False, sample_size=8, num_layers=3)
    teacher = SanaSprintTransformer2DModel.from_config(flow.config, flow_time_scale=flow_time_scale)
    teacher.load_state_dict(flow.state_dict())
    return teacher.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models(make_controlnet, make_diffusers_transformer):
    teacher = make_teacher(make_diffusers_transformer)
    teacher_controlnet = make_controlnet(seed=1, num_layers=2, sample_size=8).requires_grad_(False)
    student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(0))
    student_controlnet = init_student_controlnet(teacher_controlnet, teacher, student)
    return teacher, teacher_controlnet, student, student_controlnet


def make_batch(seed: int = 0, control: bool = True) -> DistillationBatch:
    generator = torch.Generator().manual_seed(seed)
    return DistillationBatch(
        latents=torch.randn(BATCH, 4, 8, 8, generator=generator) * SIGMA_DATA,
        prompt_embeds=torch.randn(BATCH, SEQ_LEN, 16, generator=generator),
        prompt_attention_mask=torch.ones(BATCH, SEQ_LEN, dtype=torch.long),
        null_prompt_embeds=torch.zeros(1, SEQ_LEN, 16),
        null_prompt_attention_mask=torch.ones(1, SEQ_LEN, dtype=torch.long),
        control_latents=torch.randn(BATCH, 4, 8, 8, generator=generator) if control else None,
    )


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator)
    t = torch.tensor([0.3, 0.9, 1.4])
    return x, t


def relative(a, b) -> float:
    """Max absolute difference over `max(1, max |b|)`: float32 batching moves these O(1) outputs by ~1e-7."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def test_teacher_cfg_velocity_gets_the_condition_in_both_branches(models):
    teacher, teacher_controlnet, _, _ = models
    model = TrigFlowModel(teacher, controlnet=teacher_controlnet)
    batch, (x, t) = make_batch(), inputs()
    w = torch.tensor([4.0, 4.5, 5.0])

    def target(scale, control=batch.control_latents, model=model):
        kwargs = {} if control is None else {"controlnet_cond": control}
        return teacher_cfg_velocity(
            model, x, t, batch.prompt_embeds, batch.prompt_attention_mask, batch.null_prompt_embeds,
            batch.null_prompt_attention_mask, scale, SIGMA_DATA, **kwargs,
        )  # fmt: skip

    def branch(embeds, mask):
        return teacher.trigflow_forward(
            x, t, embeds, mask, controlnet=teacher_controlnet, controlnet_cond=batch.control_latents
        ).sample

    null = branch(batch.null_prompt_embeds.expand(BATCH, -1, -1), batch.null_prompt_attention_mask.expand(BATCH, -1))
    cond = branch(batch.prompt_embeds, batch.prompt_attention_mask)
    # each branch to 1e-6 (w = 0: the unconditional one, w = 1: the conditional one); the CFG mix amplifies the
    # batching round-off of the branches by up to 2w + 1
    assert relative(target(0.0), SIGMA_DATA * null) < TOL
    assert relative(target(1.0), SIGMA_DATA * cond) < TOL
    dxt_dt = target(w)
    assert relative(dxt_dt, SIGMA_DATA * (null + w.view(-1, 1, 1, 1) * (cond - null))) < 11 * TOL
    assert relative(target(w, make_batch(seed=5).control_latents), dxt_dt) > 1e-2
    # the plain teacher (no ControlNet) gives another target: the condition really goes through the ControlNet
    assert relative(target(w, None, teacher), dxt_dt) > 1e-2


def test_student_forward_and_jvp_tangent_get_the_condition_as_a_constant(models):
    _, _, student, student_controlnet = models
    model = TrigFlowModel(student, controlnet=student_controlnet)
    batch, (x, t) = make_batch(), inputs()
    w = torch.tensor([4.0, 4.5, 5.0])
    generator = torch.Generator().manual_seed(3)
    v_x, v_t = torch.randn(x.shape, generator=generator), torch.cos(t) * torch.sin(t)
    point = TrigFlowInputs(x, t, batch.prompt_embeds, batch.prompt_attention_mask, w, batch.control_latents)
    with torch.no_grad():
        F, dF = trigflow_velocity_jvp(model, point, v_x, v_t)
        F_other, dF_other = trigflow_velocity_jvp(
            model, point.replace(control=make_batch(seed=5).control_latents), v_x, v_t
        )

    def independent(x_in, t_in, control):
        return student.trigflow_forward(
            x_in, t_in, batch.prompt_embeds, batch.prompt_attention_mask, guidance_scale=w,
            controlnet=student_controlnet, controlnet_cond=control,
        ).sample  # fmt: skip

    with torch.no_grad():
        # the tangent of the condition is zero: the derivative is w.r.t. x_t and t only
        expected_F, expected_dF = torch.func.jvp(
            independent, (x, t, batch.control_latents), (v_x, v_t, torch.zeros_like(batch.control_latents))
        )
    assert relative(F, expected_F) < TOL
    assert relative(dF, expected_dF) < TOL
    assert relative(F_other, F) > 1e-2 and relative(dF_other, dF) > 1e-2
    # the sCM loss's grad forward is the same function: its F is the JVP primal
    teacher, teacher_controlnet = models[0], models[1]
    out = scm_loss(
        model, TrigFlowModel(teacher, controlnet=teacher_controlnet), batch, x * SIGMA_DATA, t, w, 0,
        SCMLossConfig(adaptive_weight=False),
    )  # fmt: skip
    x_t = torch.cos(t).view(-1, 1, 1, 1) * batch.latents + torch.sin(t).view(-1, 1, 1, 1) * x * SIGMA_DATA
    with torch.no_grad():
        assert relative(out.velocity, independent(x_t / SIGMA_DATA, t, batch.control_latents)) < TOL


def _hooked_features(teacher, controlnet, block_ids, x, t, embeds, mask, control):
    captured = {}
    handles = [
        teacher.transformer_blocks[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
        for i in block_ids
    ]
    try:
        with torch.no_grad():
            teacher.trigflow_forward(x, t, embeds, mask, controlnet=controlnet, controlnet_cond=control)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i].transpose(1, 2) for i in block_ids]


def test_discriminator_logits_see_teacher_plus_controlnet_features(models):
    teacher, teacher_controlnet, _, _ = models
    discriminator = SanaDiscriminator(TrigFlowModel(teacher, controlnet=teacher_controlnet), head_block_ids=[1, 2])
    discriminator.eval()  # spectral norm frozen: repeated calls see the same heads
    batch, (x, t) = make_batch(), inputs()
    with torch.no_grad():
        logits = discriminator(
            x, t, batch.prompt_embeds, batch.prompt_attention_mask, controlnet_cond=batch.control_latents
        )
        other = discriminator(
            x, t, batch.prompt_embeds, batch.prompt_attention_mask, controlnet_cond=make_batch(5).control_latents
        )
        features = _hooked_features(
            teacher, teacher_controlnet, [1, 2], x, t, batch.prompt_embeds, batch.prompt_attention_mask,
            batch.control_latents,
        )  # fmt: skip
        expected = discriminator.forward_heads(features)
    assert relative(logits, expected) < TOL
    assert relative(other, logits) > 1e-3


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(student_model, teacher_model, discriminator, batch, seed=0):
    config = DistillationConfig(scm=SCMLossConfig(tangent_warmup_steps=0))
    student_model.zero_grad(set_to_none=True)
    out = generator_step(
        student_model, teacher_model, discriminator, batch, DistillationState(), config,
        torch.Generator().manual_seed(seed),
    )  # fmt: skip
    out.loss.backward()
    d_out = discriminator_step(student_model, discriminator, batch, config, torch.Generator().manual_seed(seed + 1))
    return out, d_out


@pytest.mark.parametrize("how", ["zero_init", "scale_0"])
def test_a_controlnet_that_adds_nothing_gives_the_text_to_image_step(models, how, make_controlnet):
    teacher, teacher_controlnet, student, _ = models
    if how == "zero_init":  # diffusers' init: zero input block and output projections
        torch.manual_seed(0)
        config = teacher_controlnet.config
        teacher_cn = SanaControlNetModel.from_config(config).eval().requires_grad_(False)
        student_cn = SanaControlNetModel.from_config(config)
        scale = 1.0
    else:
        teacher_cn, student_cn, scale = teacher_controlnet, make_controlnet(seed=2, num_layers=2, sample_size=8), 0.0
    teacher_model = TrigFlowModel(teacher, controlnet=teacher_cn, controlnet_conditioning_scale=scale)
    student_model = TrigFlowModel(student, controlnet=student_cn, controlnet_conditioning_scale=scale)
    controlled_disc = SanaDiscriminator(teacher_model, head_block_ids=[1, 2])
    plain_disc = SanaDiscriminator(TrigFlowModel(teacher), head_block_ids=[1, 2])
    plain_disc.load_state_dict(controlled_disc.state_dict())

    g, d = _step(student_model, teacher_model, controlled_disc, make_batch())
    grads = _grads(student_model.transformer)
    g_plain, d_plain = _step(TrigFlowModel(student), TrigFlowModel(teacher), plain_disc, make_batch(control=False))
    grads_plain = _grads(student)
    for key in ("generator_loss", "scm_loss", "adversarial_loss"):
        assert abs(float(g.logs[key]) - float(g_plain.logs[key])) <= TOL * max(1.0, abs(float(g_plain.logs[key])))
    assert abs(float(d.loss.detach()) - float(d_plain.loss.detach())) <= TOL
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        assert relative(grads[name], grads_plain[name]) < 1e-5, name


def test_the_condition_changes_the_generator_step(models):
    teacher, teacher_controlnet, student, student_controlnet = models
    teacher_model = TrigFlowModel(teacher, controlnet=teacher_controlnet)
    student_model = TrigFlowModel(student, controlnet=student_controlnet)
    discriminator = SanaDiscriminator(teacher_model, head_block_ids=[1, 2])
    config = DistillationConfig(scm=SCMLossConfig(tangent_warmup_steps=0))
    losses = []
    for seed in (0, 5):
        batch = make_batch()
        batch.control_latents = make_batch(seed).control_latents
        out = generator_step(
            student_model, teacher_model, discriminator, batch, DistillationState(), config,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
        losses.append((float(out.logs["scm_loss"]), float(out.logs["adversarial_loss"])))
    assert abs(losses[0][0] - losses[1][0]) > 1e-4 * losses[0][0]
    assert abs(losses[0][1] - losses[1][1]) > 1e-4 * abs(losses[0][1])


class RecordingDiscriminator(SanaDiscriminator):
    def forward(self, *args, **kwargs):
        self.calls.append((args[0].shape[0], kwargs.get("controlnet_cond")))
        return super().forward(*args, **kwargs)


def test_discriminator_step_conditions_real_fake_and_misaligned_pairs(models):
    teacher, teacher_controlnet, student, student_controlnet = models
    discriminator = RecordingDiscriminator(TrigFlowModel(teacher, controlnet=teacher_controlnet), head_block_ids=[1])
    discriminator.calls = []
    batch = make_batch()
    student_model = TrigFlowModel(student, controlnet=student_controlnet)
    discriminator_step(student_model, discriminator, batch, DistillationConfig(), torch.Generator().manual_seed(0))
    (real_rows, real_control), (fake_rows, fake_control) = discriminator.calls
    assert real_rows == BATCH and torch.equal(real_control, batch.control_latents)
    # fakes = the student's samples + the misaligned pairs (real latents, rolled captions, their own control)
    assert fake_rows == 2 * BATCH
    assert torch.equal(fake_control, torch.cat([batch.control_latents, batch.control_latents]))


def test_controlnet_only_mode_leaves_the_transformer_bitwise_unchanged(models):
    teacher, teacher_controlnet, _, _ = models
    results = {}
    for mode in ("controlnet_only", "joint"):
        student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(0))
        controlnet = init_student_controlnet(teacher_controlnet, teacher, student)
        apply_controlnet_training_mode(student, controlnet, mode)
        model = TrigFlowModel(student, controlnet=controlnet).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        teacher_model = TrigFlowModel(teacher, controlnet=teacher_controlnet)
        out = generator_step(
            model, teacher_model, SanaDiscriminator(teacher_model, head_block_ids=[1, 2]), make_batch(),
            DistillationState(), DistillationConfig(scm=SCMLossConfig(tangent_warmup_steps=0)),
            torch.Generator().manual_seed(0),
        )  # fmt: skip
        out.loss.backward()
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        results[mode] = moved
    frozen = {n for n in results["controlnet_only"] if n.startswith("transformer.") and "logvar" not in n}
    assert frozen == set()
    assert any(n.startswith("controlnet.") for n in results["controlnet_only"])
    assert any(n.startswith("transformer.transformer_blocks") for n in results["joint"])
    assert any(n.startswith("controlnet.") for n in results["joint"])


def test_init_student_controlnet_copies_and_remaps_time(models, make_diffusers_transformer):
    teacher, teacher_controlnet, student, student_controlnet = models
    for (name, a), b in zip(teacher_controlnet.state_dict().items(), student_controlnet.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr()
    # A 1000 s teacher, a dense-time student: the copy's time MLP is remapped (teacher.remap_time_embedding). Where the
    # teacher's time MLP does not read the frequencies above 1 (absent from the dense features), the remap is exact:
    # the student ControlNet at s embeds what the teacher's does at 1000 s.
    slow = make_teacher(make_diffusers_transformer, flow_time_scale=1000.0)
    source = init_student_controlnet(teacher_controlnet, teacher, student)
    emb = source.time_embed.emb
    half = emb.time_proj.num_channels // 2
    shift = round(half * math.log(1000.0) / math.log(10000.0))
    with torch.no_grad():
        emb.timestep_embedder.linear_1.weight[:, :shift] = 0
        emb.timestep_embedder.linear_1.weight[:, half : half + shift] = 0
    remapped = init_student_controlnet(source, slow, student)
    s = torch.linspace(0.05, 0.95, 7)

    def embed(controlnet, time):
        emb = controlnet.time_embed.emb
        return emb.timestep_embedder(emb.time_proj(time))

    with torch.no_grad():
        reference, new, copied = embed(source, 1000 * s), embed(remapped, s), embed(source, s)
    assert relative(new, reference) < 1e-5
    assert relative(copied, reference) > 1e-2


def test_bad_controlnet_inputs_are_refused(models, make_controlnet):
    teacher, teacher_controlnet, student, _ = models
    model = TrigFlowModel(teacher, controlnet=teacher_controlnet)
    x, t = inputs()
    batch = make_batch()
    with pytest.raises(ValueError, match="`controlnet_cond` .* must be given exactly when"):
        model(x, t, batch.prompt_embeds, batch.prompt_attention_mask)
    with pytest.raises(ValueError, match="must be given exactly when"):
        TrigFlowModel(teacher)(x, t, batch.prompt_embeds, batch.prompt_attention_mask, controlnet_cond=x)
    with pytest.raises(TypeError, match="SanaControlNetModel"):
        TrigFlowModel(teacher, controlnet=torch.nn.Linear(2, 2))
    wide = make_controlnet(num_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"`--controlnet_model_name_or_path` does not match .*inner width"):
        check_controlnet_matches(wide, teacher, "--controlnet_model_name_or_path")
    deep = make_controlnet(num_layers=3)
    with pytest.raises(ValueError, match="num_layers 3"):
        check_controlnet_matches(deep, teacher)
    check_controlnet_matches(teacher_controlnet, student)
    with pytest.raises(ValueError, match="`control_latents` has 2 rows for 3"):
        DistillationBatch(**{**make_batch().__dict__, "control_latents": torch.zeros(2, 4, 8, 8)})
    with pytest.raises(ValueError, match="`controlnet_training_mode` must be one of"):
        apply_controlnet_training_mode(student, teacher_controlnet, "both")
    assert unwrap_trigflow_controlnet(model) is teacher_controlnet
    assert unwrap_trigflow_controlnet(TrigFlowModel(teacher)) is None
    assert math.isfinite(float(model(x, t, batch.prompt_embeds, None, controlnet_cond=batch.control_latents)[0].sum()))


def test_control_images_get_the_crop_and_flip_of_their_image(make_vae):
    import numpy as np
    from PIL import Image

    from diffusers_sprint.training.data import ImageCaptionDataset, build_latent_cache

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4):
        image = Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))
        rows.append({"image": image, "text": "a cat", "edges": image.copy()})
    dataset = ImageCaptionDataset(
        rows, "image", "text", 16, random_flip=True, seed=3, conditioning_image_column="edges"
    )
    flips = set()
    for epoch in range(3):
        for index in range(4):
            sample = dataset[(epoch, index)]
            assert torch.equal(sample["conditioning_pixel_values"], sample["pixel_values"])
            flips.add(bool(torch.equal(sample["pixel_values"], dataset.load(index, epoch, flip=True)["pixel_values"])))
    assert flips == {True, False}  # both flips were drawn, and the control followed each
    plain = ImageCaptionDataset(rows, "image", "text", 16, random_flip=True, seed=3)
    assert "conditioning_pixel_values" not in plain[(0, 0)]
    assert torch.equal(plain[(1, 2)]["pixel_values"], dataset[(1, 2)]["pixel_values"])  # text-to-image unchanged

    class Encoder:  # prompt encoding is not under test here
        def __call__(self, prompts, device=None):
            return torch.zeros(len(prompts), 2, 16), torch.ones(len(prompts), 2, dtype=torch.long)

    cache = build_latent_cache(dataset, make_vae(), Encoder(), batch_size=3)
    for key in range(4):
        sample = cache[(0, key)]
        assert torch.allclose(sample["control_latents"], sample["latents"] / SIGMA_DATA, atol=1e-6)
