"""The sCM loss: JVP tangent, closed-form toy, teacher as student, gradient reach, config."""

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from torch import nn

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.models import TrigFlowInputs
from diffusers_sprint.models.transformer_sana_sprint import SanaSprintTransformerOutput
from diffusers_sprint.training import DistillationBatch
from diffusers_sprint.training import tangent as tangent_module
from diffusers_sprint.training.scm import (
    SCMLossConfig,
    normalize_tangent,
    pf_ode_tangents,
    sample_guidance_scales,
    scm_loss,
    tangent_warmup,
    teacher_cfg_velocity,
)
from diffusers_sprint.training.tangent import (
    trigflow_velocity_finite_difference,
    trigflow_velocity_jvp,
    velocity_tangent,
)
from diffusers_sprint.trigflow import add_trigflow_noise


SIGMA_DATA = 0.5


# ----------------------------------------------------------------------------------------------------
# 1. JVP tangent vs finite differences along the PF-ODE direction


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded-mask"])
def test_jvp_tangent_matches_finite_differences_along_pf_ode(
    padded, float64_timestep_projection, make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    student, teacher = make_student(), make_teacher()
    x0, z, t, w = scm_batch()
    embeds, mask = text_conditioning(padded=padded)
    null_embeds, null_mask = null_prompt()
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    dxt_dt = teacher_cfg_velocity(teacher, x_t / SIGMA_DATA, t, embeds, mask, null_embeds, null_mask, w)
    v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, SIGMA_DATA)
    with torch.no_grad():
        _, dF = trigflow_velocity_jvp(student, TrigFlowInputs(x_t / SIGMA_DATA, t, embeds, mask, w), v_x, v_t)

    # Central differences of F(x_t / sigma_d + h v_x, t + h v_t) on a float64 copy. Sana's linear attention still
    # casts to fp32, so small steps meet fp32 rounding: measured rel err 3.6e-5 at h = 1e-3, 1.6e-4 at 1e-4, 2.7e-3
    # at 1e-5 (both masks).
    student64 = copy.deepcopy(student).double()
    for module in student64.modules():
        if isinstance(module, Timesteps):
            module.forward = float64_timestep_projection(module)

    def velocity64(x, time):
        return student64.trigflow_forward(x, time, embeds.double(), mask, guidance_scale=w.double()).sample

    x64, t64, vx64, vt64 = (a.double() for a in (x_t / SIGMA_DATA, t, v_x, v_t))
    h = 1e-3
    with torch.no_grad():
        finite_difference = velocity64(x64 + h * vx64, t64 + h * vt64) - velocity64(x64 - h * vx64, t64 - h * vt64)
    finite_difference = finite_difference / (2 * h)
    relative_error = ((dF.double() - finite_difference).norm() / finite_difference.norm()).item()
    assert relative_error <= 1e-3, relative_error
    # The direction matters: the derivative along x alone (v_t = 0) is a different vector.
    with torch.no_grad():
        inputs = TrigFlowInputs(x_t / SIGMA_DATA, t, embeds, mask, w)
        _, dF_x_only = trigflow_velocity_jvp(student, inputs, v_x, torch.zeros_like(t))
    assert ((dF_x_only.double() - finite_difference).norm() / finite_difference.norm()).item() > 1e-2


# ----------------------------------------------------------------------------------------------------
# 2. A toy whose F and dF/dt are known in closed form


class ToyVelocity(nn.Module):
    """
    `F(x, t | y, w) = a x cos t + b sin t + e ybar + k w`, `logvar = c + d t`; `ybar` = masked mean of the prompt.

    Speaks the `trigflow_forward` protocol of `SanaSprintTransformer2DModel`; float64 scalars.
    """

    def __init__(self, a, b, e, k=0.0, c=0.0, d=0.0, guidance_embeds=True, logvar_head=True):
        super().__init__()
        for name, value in dict(a=a, b=b, e=e, k=k, c=c, d=d).items():
            setattr(self, name, nn.Parameter(torch.tensor(float(value), dtype=torch.float64)))
        self.config = SimpleNamespace(guidance_embeds=guidance_embeds, logvar_head=logvar_head)

    @staticmethod
    def prompt_mean(embeds, mask):
        mask = torch.ones(embeds.shape[:2], dtype=embeds.dtype) if mask is None else mask.to(embeds.dtype)
        return (embeds.mean(-1) * mask).sum(-1) / mask.sum(-1)

    def trigflow_forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        encoder_attention_mask=None,
        guidance_scale=None,
        return_logvar=False,
        detach_logvar_input=False,  # the logvar head reads t alone: nothing shared to detach
        return_dict=True,
    ):
        assert (guidance_scale is not None) == self.config.guidance_embeds
        t = timestep.reshape(-1, 1, 1, 1)
        ybar = self.prompt_mean(encoder_hidden_states, encoder_attention_mask).reshape(-1, 1, 1, 1)
        F = self.a * sample * torch.cos(t) + self.b * torch.sin(t) + self.e * ybar
        if guidance_scale is not None:
            F = F + self.k * guidance_scale.reshape(-1, 1, 1, 1)
        logvar = (self.c + self.d * timestep).reshape(-1, 1) if return_logvar else None
        if not return_dict:
            return (F,) if logvar is None else (F, logvar)
        return SanaSprintTransformerOutput(sample=F, logvar=logvar)


def _hand_scm(student, teacher, x0, z, t, cond, cond_mask, null, w, r, norm, adaptive):
    """The sCM loss and its gradients for `ToyVelocity`, written out by hand (float64)."""
    sd = SIGMA_DATA
    cos, sin, tan = (f(t).reshape(-1, 1, 1, 1) for f in (torch.cos, torch.sin, torch.tan))
    w4 = w.reshape(-1, 1, 1, 1)
    yc = ToyVelocity.prompt_mean(cond, cond_mask).reshape(-1, 1, 1, 1)
    yn = ToyVelocity.prompt_mean(null, cond_mask).reshape(-1, 1, 1, 1)  # official: the caption's mask
    a, b, e, k, c, d = (p.detach() for p in (student.a, student.b, student.e, student.k, student.c, student.d))
    aT, bT, eT = (p.detach() for p in (teacher.a, teacher.b, teacher.e))

    x_t = cos * x0 + sin * z
    x = x_t / sd
    teacher_c = aT * x * cos + bT * sin + eT * yc
    teacher_n = aT * x * cos + bT * sin + eT * yn
    dxt_dt = sd * (teacher_n + w4 * (teacher_c - teacher_n))
    F = a * x * cos + b * sin + e * yc + k * w4
    # dF/dt along the ODE: dx/dt = dxt_dt / sd, so dF/dt = a cos t dxt_dt / sd - a x sin t + b cos t.
    dF_dt = a * cos * dxt_dt / sd - a * x * sin + b * cos
    g = -(cos**2) * (sd * F - dxt_dt) - r * (cos * sin * x_t + sd * cos * sin * dF_dt)
    l2 = g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    rms = g.flatten(1).pow(2).mean(dim=1).sqrt().reshape(-1, 1, 1, 1)
    g_hat = g / ((l2 if norm == "l2" else rms) + 0.1)

    weight = 1 / (sd * tan)
    logvar = (c + d * t).reshape(-1, 1, 1, 1) if adaptive else torch.zeros_like(weight)
    scale = torch.exp(-logvar) * weight
    per_element = scale * g_hat**2 + (logvar if adaptive else 0)  # value of the residual F - F_minus - g is -g_hat
    loss = per_element.mean(dim=(1, 2, 3)).mean()
    # d/dtheta (F - stopgrad(F + g_hat))^2 = -2 g_hat dF/dtheta; the logvar terms give (1 - scale g_hat^2).
    residual_grad = -2 * scale * g_hat
    grads = {
        "a": (residual_grad * x * cos).mean(),
        "b": (residual_grad * sin).mean(),
        "e": (residual_grad * yc).mean(),
        "k": (residual_grad * w4).mean(),
    }
    if adaptive:
        grads["c"] = (1 - scale * g_hat**2).mean()
        grads["d"] = ((1 - scale * g_hat**2) * t.reshape(-1, 1, 1, 1)).mean()
    diagnostics = dict(g_norm_mean=l2.mean(), dF_dt_abs_mean=dF_dt.abs().mean())
    return loss, grads, diagnostics


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "plain"])
@pytest.mark.parametrize("norm", ["l2", "rms"])
@pytest.mark.parametrize("step", [0, 50, 100], ids=["r=0", "r=0.5", "r=1"])
def test_toy_loss_and_gradients_match_hand_computation(
    norm, step, adaptive, null_prompt, scm_batch, text_conditioning
):
    """Tolerance 1e-9 (float64; the closed form and the library differ only in rounding)."""
    student = ToyVelocity(a=0.7, b=-0.3, e=0.5, k=0.2, c=0.3, d=-0.4, logvar_head=adaptive)
    teacher = ToyVelocity(a=0.9, b=0.4, e=1.5, guidance_embeds=False, logvar_head=False).requires_grad_(False)
    x0, z, t, w = scm_batch(batch_size=3, dtype=torch.float64)
    cond, cond_mask = text_conditioning(batch_size=3)
    null, _ = null_prompt()
    cond, null = cond.double(), null.double()
    config = SCMLossConfig(tangent_warmup_steps=100, tangent_norm=norm, adaptive_weight=adaptive)

    out = scm_loss(student, teacher, DistillationBatch(x0, cond, cond_mask, null, None), z, t, w, step, config)
    out.loss.backward()
    r = step / 100
    loss, grads, diagnostics = _hand_scm(student, teacher, x0, z, t, cond, cond_mask, null, w, r, norm, adaptive)

    assert out.logs["tangent_warmup_r"] == r
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-9, atol=1e-12)
    for name, expected in grads.items():
        torch.testing.assert_close(getattr(student, name).grad, expected, rtol=1e-9, atol=1e-12, msg=name)
    for name, expected in diagnostics.items():
        torch.testing.assert_close(out.logs[name], expected, rtol=1e-9, atol=1e-12, msg=name)
    if adaptive:
        expected_logvar = (student.c + student.d * t).mean().detach()
        torch.testing.assert_close(out.logs["logvar_mean"], expected_logvar, rtol=1e-12, atol=0)
    else:
        assert "logvar_mean" not in out.logs and student.c.grad is None
    assert out.loss.detach().item() != 0 and grads["a"].abs().item() > 1e-6  # the case tests something


def test_normalize_tangent_norms():
    g = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    l2 = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(normalize_tangent(g, "l2", 0.1), g / (l2 + 0.1).view(-1, 1, 1, 1))
    torch.testing.assert_close(normalize_tangent(g, "rms", 0.1), g / (l2 / 16 + 0.1).view(-1, 1, 1, 1))  # sqrt(256)
    # "rms" is invariant to the latent size: tiling a sample 4x leaves its normalised entries unchanged.
    tiled = g.repeat(1, 1, 2, 2)
    torch.testing.assert_close(normalize_tangent(tiled, "rms")[..., :8, :8], normalize_tangent(g, "rms"))
    with pytest.raises(ValueError, match="norm"):
        normalize_tangent(g, "max")


def test_sample_guidance_scales_draws_from_the_set_reproducibly():
    draw = sample_guidance_scales(600, (4.0, 4.5, 5.0), generator=torch.Generator().manual_seed(0))
    again = sample_guidance_scales(600, (4.0, 4.5, 5.0), generator=torch.Generator().manual_seed(0))
    assert draw.shape == (600,) and draw.dtype == torch.float32 and torch.equal(draw, again)
    counts = [(draw == w).sum().item() for w in (4.0, 4.5, 5.0)]
    assert sum(counts) == 600 and min(counts) > 150  # uniform: 200 each, 150 is > 4 standard deviations away


def test_tangent_warmup_schedule():
    assert [tangent_warmup(s, 4000) for s in (0, 1000, 4000, 9000)] == [0.0, 0.25, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0


# ----------------------------------------------------------------------------------------------------
# 3. The teacher as the student


def _teacher_as_student(make_teacher, teacher: SanaSprintTransformer2DModel) -> SanaSprintTransformer2DModel:
    """A guidance-free copy of the teacher with a (random) logvar head: its F is exactly the teacher's."""
    student = make_teacher(logvar_head=True).requires_grad_(True)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        student.logvar_linear.weight.normal_(std=0.5)
        student.logvar_linear.bias.fill_(-0.3)
    return student


def test_teacher_as_student_without_guidance_loss_is_logvar_only(
    make_teacher, null_prompt, scm_batch, text_conditioning
):
    r"""
    Student = teacher (guidance-free copy), w = 1, r = 0.

    CFG with w = 1 is the identity, so `dxt_dt = sigma_d F_T(c) = sigma_d F_minus` and
    `g = -cos^2 t (sigma_d F_minus - dxt_dt) - 0 = 0`; normalised, `g / (0 + c) = 0`. The residual
    `F - F_minus - g` is then 0, so

        loss = mean_b mean_elements( exp(-logvar_b) / (sigma_d tan t_b) * 0 + logvar_b ) = mean_b logvar_b,

    and its gradient reaches only the logvar path: the transformer body (everything but the logvar head and the time
    embedding feeding it) gets zero gradient. Float error: the batched CFG (2B forward, null + (c - null)) and the
    single student forward differ by ~1e-7, giving g ~ 1e-6 after normalisation and loss terms ~1e-12.
    """
    teacher = make_teacher()
    student = _teacher_as_student(make_teacher, teacher)
    x0, z, t, _ = scm_batch(batch_size=3)
    embeds, mask = text_conditioning(batch_size=3)
    null_embeds, null_mask = null_prompt()
    out = scm_loss(student, teacher, DistillationBatch(x0, embeds, mask, null_embeds, null_mask), z, t, 1.0, 0)
    out.loss.backward()

    with torch.no_grad():
        logvar = student.trigflow_forward(
            (torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z) / SIGMA_DATA,
            t,
            embeds,
            mask,
            return_logvar=True,
        ).logvar
    assert logvar.std() > 0.05  # the head makes logvar depend on t, so the mean is a real check
    torch.testing.assert_close(out.loss.detach(), logvar.mean(), rtol=0, atol=1e-7)
    assert out.logs["g_norm_mean"].item() < 1e-4
    body = [p.grad for n, p in student.named_parameters() if not n.startswith(("logvar_linear", "time_embed"))]
    assert max(grad.abs().max().item() for grad in body) < 1e-6
    # d mean(logvar) / d bias = 1 exactly.
    torch.testing.assert_close(student.logvar_linear.bias.grad, torch.ones(1), rtol=0, atol=1e-6)


def test_teacher_as_student_with_guidance_closed_form(make_teacher, null_prompt, scm_batch, text_conditioning):
    r"""
    Student = teacher (guidance-free copy), w > 1, r = 0.

    Now `dxt_dt = sigma_d (F_n + w (F_c - F_n))` and the student's `F_minus = F_c`, so

        g = -cos^2 t (sigma_d F_c - dxt_dt) = sigma_d (w - 1) cos^2 t (F_c - F_n),

    the guidance direction. With `g_hat = g / (||g|| + 0.1)` and the residual's value `-g_hat`:

        loss = mean_b [ exp(-logvar_b) / (sigma_d tan t_b) mean_elements(g_hat^2) + logvar_b ].

    `F_c`, `F_n` come from two separate (un-batched) teacher forwards, which also checks the batched CFG. Tolerance:
    rel 1e-5 (fp32).
    """
    teacher = make_teacher()
    student = _teacher_as_student(make_teacher, teacher)
    x0, z, t, w = scm_batch(batch_size=3)
    embeds, mask = text_conditioning(batch_size=3)
    null_embeds, null_mask = null_prompt()
    batch = DistillationBatch(x0, embeds, mask, null_embeds, null_mask)
    out = scm_loss(student, teacher, batch, z, t, w, 0, SCMLossConfig())

    cos, tan = torch.cos(t).view(-1, 1, 1, 1), torch.tan(t).view(-1, 1, 1, 1)
    x_scaled = (cos * x0 + torch.sin(t).view(-1, 1, 1, 1) * z) / SIGMA_DATA
    with torch.no_grad():
        F_c = teacher.trigflow_forward(x_scaled, t, embeds, mask).sample
        F_n = teacher.trigflow_forward(x_scaled, t, null_embeds.expand(3, -1, -1), mask).sample  # caption's mask
        logvar = student.trigflow_forward(x_scaled, t, embeds, mask, return_logvar=True).logvar.view(-1, 1, 1, 1)
    g = SIGMA_DATA * (w.view(-1, 1, 1, 1) - 1) * cos**2 * (F_c - F_n)
    g_hat = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    expected = (torch.exp(-logvar) / (SIGMA_DATA * tan) * g_hat**2 + logvar).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logs["g_norm_mean"], g.flatten(1).norm(dim=1).mean(), rtol=1e-5, atol=0)
    assert (out.loss.detach() - logvar.mean()).abs() > 1e-3  # the guidance term is really there


# ----------------------------------------------------------------------------------------------------
# 4./5. Gradients reach every student parameter


def _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, config, seed=0):
    x0, z, t, w = scm_batch(seed=seed)
    embeds, mask = text_conditioning()
    null_embeds, null_mask = null_prompt()
    student.zero_grad(set_to_none=True)
    batch = DistillationBatch(x0, embeds, mask, null_embeds, null_mask)
    out = scm_loss(student, teacher, batch, z, t, w, 2000, config)
    out.loss.backward()
    return out, {name: p.grad for name, p in student.named_parameters()}


def test_gradients_reach_every_student_parameter_including_guidance_embedder_and_logvar_head(
    make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    student, teacher = make_student(), make_teacher()
    out, grads = _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig())
    assert torch.isfinite(out.loss) and out.logs["tangent_warmup_r"] == 0.5
    dead = [name for name, grad in grads.items() if grad is None or not torch.any(grad != 0)]
    assert dead == []
    guidance = [name for name in grads if name.startswith("time_embed.guidance_embedder.")]
    assert len(guidance) == 4  # linear_1 / linear_2, weight and bias
    assert {"logvar_linear.weight", "logvar_linear.bias"} <= set(grads)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert not any(p.grad is not None for p in teacher.parameters())


def test_detach_logvar_embedding_cuts_only_the_logvar_path_into_the_embedders(
    make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    """Same loss; same gradients outside the time/guidance embedders (the velocity path does not change); in the
    embedders (not the modulation `time_embed.linear`, which the head does not read), the official gradient minus the
    detached one is exactly the gradient of the logvar terms alone."""
    student, teacher = make_student(), make_teacher()
    official, grads = _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig())
    config = SCMLossConfig(detach_logvar_embedding=True)
    detached, detached_grads = _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, config)
    torch.testing.assert_close(detached.loss, official.loss, rtol=1e-6, atol=0)

    # The logvar terms by themselves: d loss / d logvar_i = (1 - exp(-logvar_i) e_i) / batch with e_i the sample's
    # mean weighted squared error (each sample's scm_loss without adaptive weight), back-propagated through
    # the head into the embedders only.
    x0, z, t, w = scm_batch()
    embeds, mask = text_conditioning()
    null_embeds, null_mask = null_prompt()
    errors = []
    for i in range(x0.shape[0]):
        one = slice(i, i + 1)
        batch = DistillationBatch(x0[one], embeds[one], mask[one], null_embeds, null_mask)
        out = scm_loss(student, teacher, batch, z[one], t[one], w[one], 2000, SCMLossConfig(adaptive_weight=False))
        errors.append(out.loss.detach())
    student.zero_grad(set_to_none=True)
    logvar = student.trigflow_forward(
        add_trigflow_noise(x0, z, t) / SIGMA_DATA, t, embeds, mask, guidance_scale=w, return_logvar=True
    ).logvar.reshape(-1)
    d_loss_d_logvar = (1 - torch.exp(-logvar.detach()) * torch.stack(errors)) / logvar.numel()
    (logvar * d_loss_d_logvar).sum().backward()
    logvar_only = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    embedders = {"time_embed.timestep_embedder.", "time_embed.guidance_embedder."}
    assert {name for name in logvar_only if not name.startswith("logvar_linear.")} == {
        name for name in grads if name.startswith(tuple(embedders))
    }
    for name, grad in grads.items():
        if name.startswith(tuple(embedders)):
            assert logvar_only[name].abs().max() > 0, name
            torch.testing.assert_close(grad - detached_grads[name], logvar_only[name], rtol=1e-4, atol=1e-9, msg=name)
        else:
            torch.testing.assert_close(detached_grads[name], grad, rtol=1e-5, atol=1e-9, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(
    make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    """The JVP runs under no_grad, so checkpointing the grad forward is fine."""
    student, teacher = make_student(), make_teacher()
    _, grads = _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig())
    student.enable_gradient_checkpointing()
    _, checkpointed = _loss_and_grads(null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig())
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------------------------------
# 5b. The finite-difference tangent (`jvp="finite_difference"`)


def _pf_ode_point(make_teacher, null_prompt, text_conditioning, batch_size=6, seed=3):
    """A batch at t = 0.05 ... 1.5 rad with the sCM direction (teacher CFG velocity), padded captions."""
    generator = torch.Generator().manual_seed(seed)
    x0 = SIGMA_DATA * torch.randn(batch_size, 4, 16, 16, generator=generator)
    z = SIGMA_DATA * torch.randn(batch_size, 4, 16, 16, generator=generator)
    t, w = torch.linspace(0.05, 1.5, batch_size), torch.full((batch_size,), 4.5)
    embeds, mask = text_conditioning(batch_size=batch_size, padded=True)
    x_t = add_trigflow_noise(x0, z, t)
    dxt_dt = teacher_cfg_velocity(make_teacher(), x_t / SIGMA_DATA, t, embeds, mask, *null_prompt(), w)
    v_x, v_t = pf_ode_tangents(x_t, t, dxt_dt, SIGMA_DATA)
    return x_t / SIGMA_DATA, t, v_x, v_t, (embeds, mask, w)


def _per_sample_relative_error(estimate, exact):
    return (estimate - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)


def test_finite_difference_tangent_matches_the_exact_jvp_across_t(
    make_student, make_teacher, null_prompt, text_conditioning
):
    """fp32, default step 3e-5 rad: per-sample relative error vs `torch.func.jvp` <= 1e-2 one-sided (seen 2.7e-3 to
    5.5e-3 at t = 0.05 ... 1.5), <= 5e-3 central (seen 1.2e-3 to 2.2e-3); a 10x larger step is more accurate on this
    smooth tiny model (seen <= 1.4e-3 one-sided) but not on the trained toy teacher (docs/performance.md)."""
    student = make_student()
    x, t, v_x, v_t, conditioning = _pf_ode_point(make_teacher, null_prompt, text_conditioning)
    with torch.no_grad():
        base, exact = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
    one_sided = trigflow_velocity_finite_difference(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t, base=base)
    central = trigflow_velocity_finite_difference(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
    assert one_sided.dtype == central.dtype == torch.float32 and not one_sided.requires_grad
    assert _per_sample_relative_error(one_sided, exact).max() <= 1e-2
    assert _per_sample_relative_error(central, exact).max() <= 5e-3
    # Not trivially close: the derivative along x alone is another vector, and a bf16 base point is useless.
    with torch.no_grad():
        _, x_only = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, torch.zeros_like(t))
    assert _per_sample_relative_error(one_sided, x_only).min() > 1e-2
    noisy = trigflow_velocity_finite_difference(
        student, TrigFlowInputs(x, t, *conditioning), v_x, v_t, base=base.bfloat16()
    )
    assert _per_sample_relative_error(noisy, exact).min() > 1.0


def test_finite_difference_runs_in_fp32_under_bf16_autocast(
    make_student, make_teacher, null_prompt, text_conditioning
):
    """Under autocast the forwards are fp32 anyway: the tangent equals the fp32 one to 1e-6 (seen 0), where the exact
    JVP under bf16 autocast is off by ~1e-2 on this model."""
    student = make_student()
    x, t, v_x, v_t, conditioning = _pf_ode_point(make_teacher, null_prompt, text_conditioning)
    reference = trigflow_velocity_finite_difference(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = trigflow_velocity_finite_difference(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
        with torch.no_grad():
            _, exact_bf16 = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
    torch.testing.assert_close(under_autocast, reference, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        _, exact = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
    assert _per_sample_relative_error(reference, exact).max() < _per_sample_relative_error(exact_bf16, exact).max()


def test_velocity_tangent_dispatches_on_the_config(make_student, make_teacher, null_prompt, text_conditioning):
    """`velocity_tangent` is exactly the building block `config.jvp` names: the JVP's dF; the one-sided difference
    from the base point it is given (fp32); the central difference under autocast, which ignores that base point."""
    student = make_student()
    x, t, v_x, v_t, conditioning = _pf_ode_point(make_teacher, null_prompt, text_conditioning)
    inputs = TrigFlowInputs(x, t, *conditioning)
    with torch.no_grad():
        base, exact = trigflow_velocity_jvp(student, inputs, v_x, v_t)
    assert torch.equal(velocity_tangent(student, inputs, v_x, v_t, SCMLossConfig())(base), exact)
    config = SCMLossConfig(jvp="finite_difference")
    one_sided = trigflow_velocity_finite_difference(student, inputs, v_x, v_t, base=base)
    assert torch.equal(velocity_tangent(student, inputs, v_x, v_t, config)(base), one_sided)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        central = velocity_tangent(student, inputs, v_x, v_t, config)(base.bfloat16())
    assert torch.equal(central, trigflow_velocity_finite_difference(student, inputs, v_x, v_t))
    assert not torch.equal(central, one_sided)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32_one_sided", "bf16_autocast_central"])
def test_scm_loss_and_gradients_with_finite_difference_are_close_to_exact(
    autocast, monkeypatch, make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    """The finite-difference gradient differs from the exact one by much less than a 5 % error of the exact tangent
    makes it differ: `||grad_fd - grad|| <= k ||grad(dF + 0.05 roll(dF)) - grad||` over all student parameters
    (`roll`: shifted by one pixel, an error in another direction; a scaled `dF` would be normalised away). fp32:
    k = 0.2 (seen 0.057). Under bf16 autocast the reference itself is a bf16 JVP (off by ~1e-2): k = 0.6 (seen 0.42).
    The loss value barely depends on the tangent (the normalised `g` has norm ~1): equal to 1e-5 relative."""
    student, teacher = make_student(), make_teacher()
    x0, z, _, w = scm_batch(batch_size=4)
    t = torch.tensor([0.05, 0.1, 0.2, 0.4])  # small t: there the dF term is a large part of g
    embeds, mask = text_conditioning(batch_size=4)

    def loss_and_grads(config):
        config.null_branch_mask = "null"  # the thresholds were measured with the empty prompt's own mask
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            batch = DistillationBatch(x0, embeds, mask, *null_prompt())
            out = scm_loss(student, teacher, batch, z, t, w, 10**6, config)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in student.named_parameters()}

    exact, exact_grads = loss_and_grads(SCMLossConfig())
    fd, fd_grads = loss_and_grads(SCMLossConfig(jvp="finite_difference"))
    jvp = tangent_module.trigflow_velocity_jvp

    def scaled_jvp(*args, **kwargs):
        outputs = jvp(*args, **kwargs)
        return (*outputs[:-1], outputs[-1] + 0.05 * outputs[-1].roll(1, dims=-1))

    monkeypatch.setattr(tangent_module, "trigflow_velocity_jvp", scaled_jvp)
    _, scaled_grads = loss_and_grads(SCMLossConfig())

    def distance(grads):
        return torch.cat([(grads[name] - grad).flatten() for name, grad in exact_grads.items()]).norm()

    assert distance(scaled_grads) > 0
    assert distance(fd_grads) <= (0.6 if autocast else 0.2) * distance(scaled_grads)
    torch.testing.assert_close(fd.loss, exact.loss, rtol=1e-5, atol=0)


def test_compiled_jvp_equals_the_eager_jvp_and_gives_the_same_step(
    monkeypatch, make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    """`compile_jvp=True` traces `torch.func.jvp` through the student with dynamo + AOTAutograd (`aot_eager`: the
    graph Inductor would compile, without code generation): tangent equal to the eager one to 1e-5 relative (seen
    ~1e-7), loss and gradients equal to 1e-5 (seen 0 for the loss: the primal forward is not the JVP's), and the
    whole JVP is one graph (no graph break, no eager fallback). benchmarks/bench_train_step.py checks the Inductor
    build against eager and times it."""
    graphs = []

    def counting_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    monkeypatch.setattr(tangent_module, "JVP_COMPILE_BACKEND", counting_aot_eager)
    student, teacher = make_student(), make_teacher()
    x, t, v_x, v_t, conditioning = _pf_ode_point(make_teacher, null_prompt, text_conditioning)  # padded captions
    with torch.no_grad():
        base, exact = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t)
        base_c, compiled = trigflow_velocity_jvp(student, TrigFlowInputs(x, t, *conditioning), v_x, v_t, compile=True)
    torch.testing.assert_close(base_c, base, rtol=1e-5, atol=1e-6)
    assert _per_sample_relative_error(compiled, exact).max() <= 1e-5
    assert len(graphs) == 1
    eager_out, eager_grads = _loss_and_grads(
        null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig()
    )
    compiled_out, compiled_grads = _loss_and_grads(
        null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig(compile_jvp=True)
    )
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-5, atol=0)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compile_jvp_is_refused_with_the_finite_difference():
    with pytest.raises(ValueError, match="`compile_jvp` must be a bool, and True only with jvp='exact'"):
        SCMLossConfig(jvp="finite_difference", compile_jvp=True)


def test_finite_difference_refuses_low_precision_weights(
    make_student, make_teacher, null_prompt, scm_batch, text_conditioning
):
    student, teacher = make_student().bfloat16(), make_teacher()
    with pytest.raises(ValueError, match="fp32 \\(master\\) weights"):
        _loss_and_grads(
            null_prompt, scm_batch, text_conditioning, student, teacher, SCMLossConfig(jvp="finite_difference")
        )


# ----------------------------------------------------------------------------------------------------
# 6. Config and argument errors


@pytest.mark.parametrize(
    "field, value",
    [
        ("sigma_data", 0.0),
        ("p_std", -1.0),
        ("p_mean", float("nan")),
        ("tangent_warmup_steps", -1),
        ("tangent_warmup_steps", 10.5),
        ("tangent_norm", "l1"),
        ("tangent_norm_eps", 0.0),
        ("guidance_scales", ()),
        ("guidance_scales", (4.0, float("inf"))),
        ("adaptive_weight", "yes"),
        ("detach_logvar_embedding", None),
        ("jvp", "forward"),
        ("jvp", None),
        ("finite_difference_step", 0.0),
        ("finite_difference_step", -1e-4),
        ("finite_difference_step", 0.5),
        ("finite_difference_step", float("nan")),
        ("finite_difference_step", True),
        ("compile_jvp", "yes"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SCMLossConfig(**{field: value})


def test_unknown_jvp_method_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"`jvp` must be one of \('exact', 'finite_difference'\), got 'fd'"):
        SCMLossConfig(jvp="fd")


def test_config_defaults_are_the_official_recipe():
    config = SCMLossConfig(guidance_scales=[4.0, 4.5, 5.0])
    assert (config.sigma_data, config.p_mean, config.p_std, config.tangent_warmup_steps) == (0.5, 0.2, 1.6, 4000)
    assert (config.tangent_norm, config.tangent_norm_eps, config.guidance_scales) == ("l2", 0.1, (4.0, 4.5, 5.0))
    assert config.adaptive_weight and not config.detach_logvar_embedding
    assert config.jvp == "exact" and config.finite_difference_step == 3e-5


def test_argument_errors(make_student, make_teacher, null_prompt, scm_batch, text_conditioning):
    x0, z, t, w = scm_batch()
    embeds, mask = text_conditioning()
    null_embeds, null_mask = null_prompt()
    teacher = make_teacher()
    with pytest.raises(ValueError, match="logvar_head"):
        batch = DistillationBatch(x0, embeds, mask, null_embeds, null_mask)
        scm_loss(make_student(logvar_head=False), teacher, batch, z, t, w, 0)
    with pytest.raises(ValueError, match="guidance embedder"):
        teacher_cfg_velocity(make_student(), x0, t, embeds, mask, null_embeds, null_mask, w)
    with pytest.raises(ValueError, match="max_length"):
        teacher_cfg_velocity(teacher, x0, t, embeds, mask, null_embeds[:, :4], null_mask[:, :4], w)
