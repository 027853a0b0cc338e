"""LADD: frozen-teacher discriminator, heads, local batch norm, losses, R1, re-noising and misaligned pairs."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.models import TrigFlowInputs
from diffusers_sprint.training.ladd import (
    BatchNormLocal,
    DiscriminatorHead,
    SanaDiscriminator,
    bce_discriminator_loss,
    bce_generator_loss,
    default_head_block_ids,
    discriminator_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    interleave_order,
    misaligned_pairs,
    r1_penalty,
    renoise_for_discriminator,
)
from diffusers_sprint.trigflow import add_trigflow_noise


SIGMA_DATA = 0.5
NUM_LAYERS = 4
INNER_DIM = 16
LATENT = 4  # 4x4 latents, patch 1 -> 16 tokens per head


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waiting (10x faster on a loaded 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_teacher(transformer_config, seed: int = 0, dtype=torch.float32) -> SanaSprintTransformer2DModel:
    torch.manual_seed(seed)
    teacher = SanaSprintTransformer2DModel(**transformer_config(student=False, num_layers=NUM_LAYERS))
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return (teacher.double() if dtype == torch.float64 else teacher).eval()


def inputs(text_conditioning, batch_size: int, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 4, LATENT, LATENT, generator=generator, dtype=dtype)
    t = (0.1 + 1.4 * torch.rand(batch_size, generator=generator)).to(dtype)
    embeds, mask = text_conditioning(batch_size=batch_size, seed=seed)
    return x, t, embeds.to(dtype), mask


def teacher_params(teacher):
    return {name: parameter.detach().clone() for name, parameter in teacher.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------------
# Gradients: only heads train; the generator gets gradients through the frozen teacher
# ---------------------------------------------------------------------------------------------------------------------


def test_only_heads_are_parameters_and_train_teacher_untouched(text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    before = teacher_params(teacher)
    discriminator = SanaDiscriminator(teacher, head_block_ids=(0, 2, 3)).train()

    teacher_ids = {id(parameter) for parameter in teacher.parameters()}
    assert not teacher_ids & {id(parameter) for parameter in discriminator.parameters()}
    assert all(key.startswith("heads.") for key in discriminator.state_dict())
    assert "teacher" not in dict(discriminator.named_modules()) and "_teacher" not in discriminator._modules
    assert not teacher.training and not any(parameter.requires_grad for parameter in teacher.parameters())

    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=1e-2, weight_decay=0.1)
    heads_before = [parameter.detach().clone() for parameter in discriminator.parameters()]
    real, t, embeds, mask = inputs(text_conditioning, 4)
    fake = torch.randn_like(real)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = hinge_discriminator_loss(discriminator(real, t, embeds, mask), discriminator(fake, t, embeds, mask))
        loss.backward()
        assert all(parameter.grad is not None for parameter in discriminator.parameters())
        assert sum(parameter.grad.abs().sum().item() for parameter in discriminator.parameters()) > 0
        optimizer.step()

    assert all(parameter.grad is None for parameter in teacher.parameters())
    for name, parameter in teacher.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, discriminator.parameters()))
    # discriminator.train()/.eval() never touch the teacher's mode.
    assert not teacher.training


def test_generator_side_gradient_reaches_fake_input_not_teacher(text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    discriminator = SanaDiscriminator(teacher, head_block_ids=(1, 3)).eval()
    _, t, embeds, mask = inputs(text_conditioning, 3)
    fake = torch.randn(3, 4, LATENT, LATENT, requires_grad=True)

    loss = hinge_generator_loss(discriminator(fake, t, embeds, mask))
    loss.backward()

    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert torch.isfinite(fake.grad).all()
    assert all(parameter.grad is None for parameter in teacher.parameters())

    # Same gradient with the teacher's (non-reentrant, diffusers default) gradient checkpointing: the hooks fire once.
    teacher.enable_gradient_checkpointing()
    fake_checkpointed = fake.detach().clone().requires_grad_(True)
    hinge_generator_loss(discriminator(fake_checkpointed, t, embeds, mask)).backward()
    torch.testing.assert_close(fake_checkpointed.grad, fake.grad, rtol=1e-5, atol=1e-6)
    assert all(len(block._forward_hooks) == 0 for block in teacher.transformer_blocks)

    # No graph through the teacher when nothing upstream requires grad (discriminator phase).
    features = discriminator.extract_features(fake.detach(), t, embeds, mask)
    assert not any(feature.requires_grad for feature in features)


def test_unfrozen_teacher_is_an_error(text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    discriminator = SanaDiscriminator(teacher, head_block_ids=(0,))
    teacher.proj_out.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        discriminator(*inputs(text_conditioning, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def _hand_mean(values):
    return sum(values) / len(values)


def test_losses_match_hand_computation():
    real = torch.tensor([[1.5, -0.25, 0.5], [2.0, 0.0, -3.0]], dtype=torch.float64)
    fake = torch.tensor([[-2.0, 0.75], [0.1, -0.5]], dtype=torch.float64)
    real_list, fake_list = real.flatten().tolist(), fake.flatten().tolist()

    hinge_d = 0.5 * (
        _hand_mean([max(0.0, 1 - r) for r in real_list]) + _hand_mean([max(0.0, 1 + f) for f in fake_list])
    )
    hinge_g = -_hand_mean(fake_list)
    bce_d = _hand_mean([math.log(1 + math.exp(-r)) for r in real_list]) + _hand_mean(
        [math.log(1 + math.exp(f)) for f in fake_list]
    )
    bce_g = _hand_mean([math.log(1 + math.exp(-f)) for f in fake_list])

    assert abs(hinge_discriminator_loss(real, fake).item() - hinge_d) < 1e-6
    assert abs(hinge_generator_loss(fake).item() - hinge_g) < 1e-6
    assert abs(bce_discriminator_loss(real, fake).item() - bce_d) < 1e-6
    assert abs(bce_generator_loss(fake).item() - bce_g) < 1e-6
    # BCE forms agree with torch's own BCE-with-logits.
    bce_ref = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )
    assert abs(bce_d - bce_ref.item()) < 1e-6

    assert discriminator_loss(real, fake, "hinge").item() == hinge_discriminator_loss(real, fake).item()
    assert discriminator_loss(real, fake, "bce").item() == bce_discriminator_loss(real, fake).item()
    assert generator_adversarial_loss(fake, "hinge").item() == hinge_g
    assert generator_adversarial_loss(fake, "bce").item() == bce_generator_loss(fake).item()
    with pytest.raises(ValueError, match="loss_type.*hinge.*bce"):
        discriminator_loss(real, fake, "wasserstein")
    with pytest.raises(ValueError, match="loss_type"):
        generator_adversarial_loss(fake, "cross entropy")


# ---------------------------------------------------------------------------------------------------------------------
# Heads, hooks, block ids
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_block_ids", [(3,), (1, 3), (3, 0, 2), (0, 1, 2, 3), None])
def test_logit_shapes_and_per_head_layout(head_block_ids, text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    discriminator = SanaDiscriminator(teacher, head_block_ids=head_block_ids).eval()
    expected_ids = tuple(head_block_ids) if head_block_ids is not None else tuple(default_head_block_ids(NUM_LAYERS))
    assert discriminator.head_block_ids == expected_ids and len(discriminator.heads) == len(expected_ids)

    batch_size, num_tokens = 3, LATENT * LATENT
    x, t, embeds, mask = inputs(text_conditioning, batch_size)
    logits = discriminator(x, t, embeds, mask)
    assert logits.shape == (batch_size, len(expected_ids) * num_tokens)

    # Independent capture with our own hooks: head k reads block head_block_ids[k], columns k*N:(k+1)*N.
    captured = {}
    handles = [
        teacher.transformer_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in expected_ids
    ]
    with torch.no_grad():
        teacher.trigflow_forward(x, t, embeds, mask)
    for handle in handles:
        handle.remove()
    for k, block_id in enumerate(expected_ids):
        assert captured[block_id].shape == (batch_size, num_tokens, INNER_DIM)
        expected = discriminator.heads[k](captured[block_id].transpose(1, 2))
        torch.testing.assert_close(logits[:, k * num_tokens : (k + 1) * num_tokens], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_block_ids", [(0, 1), (2,), (1, 3)])
def test_teacher_stops_after_the_last_hooked_block(head_block_ids, text_conditioning, transformer_config):
    """Blocks after the last hooked one do not run; features, logits and the input gradient are those of the full
    teacher forward (the later blocks only feed the discarded output)."""
    teacher = make_teacher(transformer_config)
    discriminator = SanaDiscriminator(teacher, head_block_ids=head_block_ids).eval()
    x, t, embeds, mask = inputs(text_conditioning, 3)

    calls = dict.fromkeys(range(NUM_LAYERS), 0)
    counters = [
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(teacher.transformer_blocks)
    ]
    fake = x.clone().requires_grad_(True)
    features = discriminator.extract_features(fake, t, embeds, mask)
    logits = discriminator.forward_heads(features)
    (gradient,) = torch.autograd.grad(logits.square().mean(), fake)
    for handle in counters:
        handle.remove()
    last = max(head_block_ids)
    assert calls == {i: int(i <= last) for i in range(NUM_LAYERS)}
    assert len(teacher.transformer_blocks) == NUM_LAYERS  # the full block list is back

    # Reference: the full teacher forward, features read with our own hooks.
    captured = {}
    handles = [
        teacher.transformer_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in head_block_ids
    ]
    fake_reference = x.clone().requires_grad_(True)
    full_output = teacher.trigflow_forward(fake_reference, t, embeds, mask).sample
    for handle in handles:
        handle.remove()
    reference_features = [captured[i].transpose(1, 2) for i in head_block_ids]
    reference_logits = discriminator.forward_heads(reference_features)
    (reference_gradient,) = torch.autograd.grad(reference_logits.square().mean(), fake_reference)
    assert full_output.shape == x.shape
    for feature, reference in zip(features, reference_features):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)
    torch.testing.assert_close(gradient, reference_gradient, rtol=0, atol=1e-7)

    # The block list is restored when the teacher forward fails, too.
    with pytest.raises(RuntimeError):
        discriminator(x, t, embeds[:, :, :3], mask)
    assert len(teacher.transformer_blocks) == NUM_LAYERS


def test_head_shapes_and_spectral_norm():
    head = DiscriminatorHead(INNER_DIM, hidden_channels=8).train()
    out = head(torch.randn(5, INNER_DIM, 12))
    assert out.shape == (5, 12)
    for _ in range(30):  # power iterations converge: the normalised weights have spectral norm ~1
        head(torch.randn(5, INNER_DIM, 12))
    head.eval()
    for conv in (head.conv_in, head.conv_res, head.conv_out):
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 1e-2
    with pytest.raises(ValueError, match="kernel_size"):
        DiscriminatorHead(INNER_DIM, kernel_size=8)


def test_hooks_are_removed_and_teacher_is_unaffected(text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    x, t, embeds, mask = inputs(text_conditioning, 2)
    with torch.no_grad():
        reference = teacher.trigflow_forward(x, t, embeds, mask).sample

    discriminator = SanaDiscriminator(teacher, head_block_ids=(0, 1, 2, 3))
    discriminator(x, t, embeds, mask).sum().backward()
    assert all(len(block._forward_hooks) == 0 for block in teacher.transformer_blocks)

    # Hooks are removed even when the teacher forward fails.
    with pytest.raises(RuntimeError):
        discriminator(x, t, embeds[:, :, :3], mask)
    assert all(len(block._forward_hooks) == 0 for block in teacher.transformer_blocks)

    with torch.no_grad():
        after = teacher.trigflow_forward(x, t, embeds, mask).sample
    assert torch.equal(after, reference)


def test_invalid_head_block_ids(transformer_config):
    teacher = make_teacher(transformer_config)
    with pytest.raises(ValueError, match=r"head_block_ids.*depth 4.*0\.\.3"):
        SanaDiscriminator(teacher)  # official (2, 8, 14, 19) on a 4-block teacher
    for bad in [(0, 4), (-1,), (), (1, 1), (0.5,)]:
        with pytest.raises(ValueError, match="head_block_ids"):
            SanaDiscriminator(teacher, head_block_ids=bad)
    with pytest.raises(TypeError, match="teacher"):
        SanaDiscriminator(torch.nn.Linear(2, 2), head_block_ids=(0,))


def test_default_head_block_ids():
    """The documented examples; for every depth, the blocks nearest to the official (2, 8, 14, 19) / 19 fractions of
    the last block (no ties occur), without repeats."""
    documented = {20: [2, 8, 14, 19], 28: [3, 11, 20, 27], 4: [0, 1, 2, 3], 2: [0, 1], 1: [0]}
    assert {n: default_head_block_ids(n, "spread") for n in documented} == documented
    for num_layers in range(1, 40):
        last = num_layers - 1
        nearest = {min(range(num_layers), key=lambda b: abs(b - f * last)) for f in (2 / 19, 8 / 19, 14 / 19, 1)}
        assert default_head_block_ids(num_layers, "spread") == sorted(nearest), num_layers


# ---------------------------------------------------------------------------------------------------------------------
# Misaligned pairs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_misaligned_pairs_roll_captions_and_run_through_discriminator(
    batch_size, text_conditioning, transformer_config
):
    discriminator = SanaDiscriminator(make_teacher(transformer_config), head_block_ids=(1, 3))
    x, t, embeds, mask = inputs(text_conditioning, batch_size)
    pairs = misaligned_pairs(x, embeds, mask)

    expected = 0 if batch_size == 1 else batch_size
    assert pairs.latents.shape == (expected, *x.shape[1:])
    assert pairs.encoder_hidden_states.shape == (expected, *embeds.shape[1:])
    assert pairs.encoder_attention_mask.shape == (expected, mask.shape[1])
    for i in range(expected):
        assert torch.equal(pairs.latents[i], x[i])
        assert torch.equal(pairs.encoder_hidden_states[i], embeds[(i - 1) % batch_size])
        assert torch.equal(pairs.encoder_attention_mask[i], mask[(i - 1) % batch_size])

    noisy = renoise_for_discriminator(real_x0=pairs.latents).real_x_t
    logits = discriminator(noisy / SIGMA_DATA, t[:expected], pairs.encoder_hidden_states, pairs.encoder_attention_mask)
    assert logits.shape == (expected, 2 * LATENT * LATENT)
    # Concatenated to the fake branch (a no-op at batch size 1) the loss stays finite.
    fake_logits = torch.cat([discriminator(x, t, embeds, mask), logits])
    assert fake_logits.shape[0] == batch_size + expected
    assert torch.isfinite(hinge_discriminator_loss(fake_logits, fake_logits))


def test_misaligned_pairs_drop_duplicate_captions(text_conditioning):
    x = torch.randn(4, 4, LATENT, LATENT)
    embeds, mask = text_conditioning(batch_size=4, padded=False)
    embeds[1] = embeds[0]  # samples 0 and 1 share a prompt: sample 1's rolled caption is its own
    pairs = misaligned_pairs(x, embeds, mask)
    assert pairs.latents.shape[0] == 3
    assert torch.equal(pairs.latents, x[[0, 2, 3]])
    assert torch.equal(pairs.encoder_hidden_states, embeds[[3, 1, 2]])
    assert misaligned_pairs(x, embeds).encoder_attention_mask is None


# ---------------------------------------------------------------------------------------------------------------------
# BatchNormLocal
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, group_sizes", [(16, [8, 8]), (12, [6, 6]), (9, [5, 4]), (3, [3])])
def test_batch_norm_local_uses_per_group_statistics(batch_size, group_sizes):
    torch.manual_seed(0)
    norm = BatchNormLocal(5, virtual_batch_size=8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
    # Groups with very different statistics, so one global batch norm would not match.
    x = torch.randn(batch_size, 5, 7, dtype=torch.float64) * torch.arange(1, batch_size + 1).view(-1, 1, 1) + 3.0
    out = norm.double()(x)

    expected = torch.empty_like(x)
    start = 0
    for size in group_sizes:
        for c in range(5):
            values = x[start : start + size, c, :]
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
            expected[start : start + size, c, :] = (values - mean) / math.sqrt(var + 1e-5) * norm.weight[
                c
            ] + norm.bias[c]
        start += size
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    if len(group_sizes) > 1:
        global_norm = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=1e-5)
        assert (out - global_norm).abs().max() > 1e-2
    # Train and eval modes agree (no running statistics).
    torch.testing.assert_close(norm.eval()(x), out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# R1
# ---------------------------------------------------------------------------------------------------------------------


def test_r1_penalty_on_features_matches_manual_autograd(text_conditioning, transformer_config):
    teacher = make_teacher(transformer_config)
    discriminator = SanaDiscriminator(teacher, head_block_ids=(0, 2)).eval()
    real, t, embeds, mask = inputs(text_conditioning, 3)
    penalty = r1_penalty(discriminator, real, t, embeds, mask)

    with torch.no_grad():
        features = discriminator.extract_features(real, t, embeds, mask)
    per_sample = torch.zeros(3)
    for head, feature in zip(discriminator.heads, features):
        feature = feature.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(head(feature).sum(), feature)
        per_sample += (gradient**2).sum(dim=(1, 2))
    assert penalty.item() > 1e-6
    torch.testing.assert_close(penalty, per_sample.mean() / 2, rtol=1e-6, atol=0)

    # Differentiable w.r.t. the heads' weights (a bias added last cannot change a feature gradient), never the teacher.
    penalty.backward()
    for name, parameter in discriminator.named_parameters():
        if "weight" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in teacher.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Re-noising
# ---------------------------------------------------------------------------------------------------------------------


def test_renoise_for_discriminator_independent_and_shared_times():
    real = torch.randn(4096, 1, 1, 1)
    fake = torch.randn(4096, 1, 1, 1, requires_grad=True)
    out = renoise_for_discriminator(real, fake, generator=torch.Generator().manual_seed(0))
    assert out.real_t.shape == out.fake_t.shape == (4096,)
    assert not torch.equal(out.real_t, out.fake_t)
    for t in (out.real_t, out.fake_t):
        log_sigma = torch.log(torch.tan(t) * SIGMA_DATA)
        assert abs(log_sigma.mean().item() - (-0.6)) < 0.06 and abs(log_sigma.std().item() - 1.0) < 0.05
        assert (t > 0).all() and (t < math.pi / 2).all()

    # Same draws re-done by hand: real t, real z, fake t, fake z.
    generator = torch.Generator().manual_seed(0)
    n_real = torch.randn(4096, generator=generator)
    z_real = torch.randn(real.shape, generator=generator) * SIGMA_DATA
    n_fake = torch.randn(4096, generator=generator)
    z_fake = torch.randn(fake.shape, generator=generator) * SIGMA_DATA
    t_real = torch.atan(torch.exp(-0.6 + n_real) / SIGMA_DATA)
    t_fake = torch.atan(torch.exp(-0.6 + n_fake) / SIGMA_DATA)
    torch.testing.assert_close(out.real_t, t_real)
    torch.testing.assert_close(out.real_x_t, add_trigflow_noise(real, z_real, t_real))
    torch.testing.assert_close(out.fake_x_t, add_trigflow_noise(fake, z_fake, t_fake))

    out.fake_x_t.sum().backward()  # gradient reaches the student sample
    torch.testing.assert_close(fake.grad.flatten(), torch.cos(out.fake_t))

    shared = renoise_for_discriminator(real, fake.detach(), share_timesteps=True)
    assert torch.equal(shared.real_t, shared.fake_t)
    assert not torch.equal(shared.real_x_t - real * torch.cos(shared.real_t).view(-1, 1, 1, 1), shared.fake_x_t)

    only_fake = renoise_for_discriminator(fake_x0=fake.detach())
    assert only_fake.real_x_t is None and only_fake.fake_x_t.shape == fake.shape
    with pytest.raises(ValueError):
        renoise_for_discriminator()
    with pytest.raises(ValueError, match="share_timesteps"):
        renoise_for_discriminator(real, fake[:3], share_timesteps=True)


@pytest.mark.parametrize("num_real, num_fake", [(4, 4), (3, 6), (16, 32), (0, 3)])
def test_interleave_order_spreads_both_sets_over_every_batch_norm_group(num_real, num_fake):
    order = interleave_order(num_real, num_fake)
    assert sorted(order.tolist()) == list(range(num_real + num_fake))
    if num_real == num_fake:
        assert order.tolist() == [i + k * num_real for i in range(num_real) for k in (0, 1)]
    is_real = (order < num_real).float()
    for group in is_real.split(8):  # BatchNormLocal's default virtual batch
        expected = len(group) * num_real / (num_real + num_fake)
        assert abs(group.sum().item() - expected) <= 1.0


def test_discriminator_judges_fakes_with_the_real_reference_in_shared_batch_norm_groups(
    text_conditioning, transformer_config
):
    """
    Judged alone, a batch's mean logit is (nearly) fixed by the heads' local batch norm: shifting every fake input by
    the same amount barely moves it. With the real rows as `reference` the heads normalise both together: the
    logits are those of one head pass over the interleaved features, and the shift shows.
    """
    discriminator = SanaDiscriminator(make_teacher(transformer_config), head_block_ids=(1, 3))
    real, t, embeds, mask = inputs(text_conditioning, 8, seed=1)
    fake, t_fake, _, _ = inputs(text_conditioning, 8, seed=2)
    reference = TrigFlowInputs(real, t, embeds, mask)
    with torch.no_grad():
        logits = discriminator(fake, t_fake, embeds, mask, reference=reference)
        assert logits.shape == (16, 2 * LATENT * LATENT)
        features = [
            torch.cat([f, r])[interleave_order(8, 8)]
            for f, r in zip(
                discriminator.extract_features(fake, t_fake, embeds, mask),
                discriminator.extract_features(real, t, embeds, mask),
            )
        ]
        by_hand = discriminator.forward_heads(features)[torch.argsort(interleave_order(8, 8))]
        torch.testing.assert_close(logits, by_hand)

        shifted = fake + 2.0
        alone = discriminator(fake, t_fake, embeds, mask).mean() - discriminator(shifted, t_fake, embeds, mask).mean()
        joint = logits[:8].mean() - discriminator(shifted, t_fake, embeds, mask, reference=reference)[:8].mean()
    assert abs(joint.item()) > 5 * abs(alone.item()), (joint, alone)
