"""One SANA-Sprint distillation iteration: the generator (sCM + LADD) step and the discriminator step.

Pure functions over models and a batch; no accelerate inside. The caller (e.g. `examples/train_sana_sprint.py`)
owns devices, mixed precision, distribution, accumulation, EMA and checkpoints. The student is called through a
[`~models.TrigFlowModel`] (pass the accelerate-prepared one: DDP / FSDP2 see every call); a bare transformer is
wrapped on the fly.

Step counting. The official loop increments one `global_step` in both phases, so its `tangent_warmup_steps=4000`
is reached after 2000 generator updates. Here [`DistillationState`] counts generator and discriminator updates
separately and the tangent warm-up reads `generator_steps`: a warm-up of N means N generator updates. To reproduce
the official schedule exactly, halve `SCMLossConfig.tangent_warmup_steps`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..models.trigflow_model import as_trigflow_model
from ..trigflow import add_trigflow_noise, denoise_trigflow, replace_with_max_time, sample_noise, sample_trigflow_time
from .ladd import (
    ADVERSARIAL_LOSS_TYPES,
    DISCRIMINATOR_P_MEAN,
    DISCRIMINATOR_P_STD,
    DiscriminatorInputs,
    SanaDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    misaligned_pairs,
    r1_penalty,
    renoise_for_discriminator,
)
from .scm import SCMLossConfig, sample_guidance_scales, scm_loss
from .settings import PROBABILITY, at_least, check_settings, setting


@dataclass
class DistillationConfig:
    """
    The SANA-Sprint recipe; defaults are the official ones.

    Args:
        scm ([`SCMLossConfig`]): sCM loss options (sigma_data, generator time distribution, tangent warm-up and norm,
            CFG scales, adaptive weight).
        scm_lambda (`float`, defaults to 1.0): weight of the sCM loss; 0 trains LADD only.
        adversarial_lambda (`float`, defaults to 0.5): weight of the generator's adversarial loss; 0 trains sCM only
            (and the discriminator step is not needed).
        adversarial_loss (`str`, defaults to `"hinge"`): `"hinge"` or `"bce"`.
        discriminator_p_mean, discriminator_p_std (`float`, defaults to -0.6, 1.0): re-noising time of the
            discriminator inputs, `t_D = atan(exp(p_mean + p_std n) / sigma_data)`.
        max_time_probability (`float`, defaults to 0.5): the student sample judged by the discriminator comes from
            `t = pi/2` (pure noise) with this probability, in both phases (max-time weighting).
        misaligned_pairs (`bool`, defaults to `True`): real latents with rolled captions as extra fakes (D phase).
        share_discriminator_timesteps (`bool`, defaults to `False`): one `t_D` for the real and fake branches.
        discriminator_shared_norm_groups (`bool`, defaults to `False`): The heads judge real and fake rows in one call,
            interleaved, so every local batch-norm group holds both (the generator phase then also runs the teacher
            on re-noised reals, without graph). `False` (official): separate calls, where each group's statistics
            divide out what tells real from fake; at the toy's 16 tokens the discriminator then stays at chance
            (docs/results.md, "Why the discriminator stayed at chance").
        r1_gamma (`float`, defaults to 0): R1 penalty weight (`loss_D + gamma / 2 * r1`), w.r.t. head features.
        fake_from_scm_forward (`bool`, defaults to `True`): The generator's LADD fake reuses the sCM term's `t`, `z`
            and forward; only the rows moved to `pi/2` run the student again (same expected gradient, about half a
            forward+backward less). `False` is the official choice: fresh `t` and `z` and one student forward on the
            whole batch. Under FSDP2 every rank must run the same forwards (each is a collective), so sharded
            training needs `False`: how many rows move to `pi/2` differs between ranks.
        single_student_forward (`bool`, defaults to `True`): The generator's fresh fake rows (the `pi/2` rows, or the
            whole fresh batch with `fake_from_scm_forward=False`) join the sCM term's grad-enabled student forward as
            extra rows: one call and one backward of `B + k` rows instead of two. The same math up to float rounding;
            `False` runs them in a second call.
    """

    _argument_group_name = "LADD (adversarial); defaults are the official recipe"

    scm: SCMLossConfig = field(default_factory=SCMLossConfig)
    scm_lambda: float = setting(1.0, help="Weight of the sCM loss (0: LADD only).", range=at_least(0))
    adversarial_lambda: float = setting(0.5, help="Weight of the adversarial loss (0: sCM only).", range=at_least(0))
    adversarial_loss: str = setting("hinge", help="Adversarial loss.", choices=ADVERSARIAL_LOSS_TYPES, advanced=True)
    discriminator_p_mean: float = setting(DISCRIMINATOR_P_MEAN, help="Discriminator re-noising mean.", advanced=True)
    discriminator_p_std: float = setting(
        DISCRIMINATOR_P_STD, help="Discriminator re-noising std.", range=at_least(0), advanced=True
    )
    max_time_probability: float = setting(
        0.5,
        help="Max-time weighting: the judged student sample starts from t = pi/2 with this probability.",
        range=PROBABILITY,
        advanced=True,
    )
    misaligned_pairs: bool = setting(
        True,
        help="Real latents with rolled captions as extra fakes for the discriminator (needs batch size >= 2).",
        advanced=True,
    )
    share_discriminator_timesteps: bool = setting(
        False, help="One re-noising time for real and fake (needs --no-misaligned_pairs).", advanced=True
    )
    discriminator_shared_norm_groups: bool = setting(
        False,
        help="Judge real and fake rows in one discriminator call, interleaved, so that every local batch-norm group "
        "of the heads holds both. Off (official): separate calls; then each group's statistics divide out what tells "
        "real from fake, and on small latents (the toy's 16 tokens) the discriminator stays at chance "
        "(docs/results.md).",
        recorded_unless=False,
        advanced=True,
    )
    r1_gamma: float = setting(
        0.0, help="R1 penalty weight on head features (0: off).", range=at_least(0), advanced=True
    )
    fake_from_scm_forward: bool = setting(
        True,
        help="The generator's LADD fake reuses the sCM term's t, noise and forward (only rows moved to pi/2 run the "
        "student again). --no-fake_from_scm_forward: fresh t and noise and a full-batch forward (official; always "
        "used under --fsdp, where every rank must run the same forwards).",
        advanced=True,
    )
    single_student_forward: bool = True

    def __post_init__(self):
        check_settings(self)
        if self.scm_lambda == 0 and self.adversarial_lambda == 0:
            raise ValueError("At least one of `scm_lambda` and `adversarial_lambda` must be > 0.")
        if self.share_discriminator_timesteps and self.misaligned_pairs:
            raise ValueError(
                "`share_discriminator_timesteps=True` needs equal real/fake batches: set `misaligned_pairs=False`."
            )

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_lambda > 0


@dataclass
class DistillationBatch:
    """
    One training batch.

    Args:
        latents (`torch.Tensor` of shape `(batch, C, H, W)`): data `x0` in sigma_data units
            (`vae_latent * scaling_factor * sigma_data`).
        prompt_embeds (`torch.Tensor` of shape `(batch, seq_len, caption_channels)`), prompt_attention_mask
            (`torch.Tensor` of shape `(batch, seq_len)`): the captions.
        null_prompt_embeds, null_prompt_attention_mask: the empty prompt, `(1 or batch, seq_len, ...)`, for the
            teacher's classifier-free guidance.
        control_latents (`torch.Tensor` of shape `(batch, C, H, W)`, *optional*): ControlNet distillation: the VAE
            latents of the control images times `scaling_factor` (unit scale, diffusers' `controlnet_cond`
            convention; not multiplied by sigma_data). They go to every model call of the step: the teacher's CFG
            velocity (both branches), the student's forward and JVP, the LADD fake and the discriminator's teacher
            features (real and fake). Teacher and student must then be [`~models.TrigFlowModel`]s with a ControlNet.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    null_prompt_embeds: torch.Tensor
    null_prompt_attention_mask: torch.Tensor
    control_latents: torch.Tensor | None = None

    def __post_init__(self):
        if self.control_latents is not None and self.control_latents.shape[0] != self.latents.shape[0]:
            raise ValueError(
                f"`control_latents` has {self.control_latents.shape[0]} rows for {self.latents.shape[0]} latents."
            )

    def control(self, rows: torch.Tensor | None = None) -> dict:
        """The model-call keyword for the control latents (of `rows`): `{}` in text-to-image distillation."""
        if self.control_latents is None:
            return {}
        return {"controlnet_cond": self.control_latents if rows is None else self.control_latents[rows]}


@dataclass
class DistillationState:
    """Update counters; checkpointable by `state_dict`/`load_state_dict` (`accelerator.register_for_checkpointing`)."""

    generator_steps: int = 0
    discriminator_steps: int = 0
    skipped_generator_updates: int = 0
    skipped_discriminator_updates: int = 0

    def record(self, phase: str, skipped: bool) -> None:
        """Count one `"generator"` or `"discriminator"` update; a skipped one (NaN/Inf) counts as skipped only."""
        if phase not in ("generator", "discriminator"):
            raise ValueError(f"`phase` must be 'generator' or 'discriminator', got {phase!r}.")
        counter = f"skipped_{phase}_updates" if skipped else f"{phase}_steps"
        setattr(self, counter, getattr(self, counter) + 1)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class GeneratorStepOutput:
    """`loss = scm_lambda * scm_loss + adversarial_lambda * adversarial_loss` (with grad) and detached parts."""

    loss: torch.Tensor
    scm_loss: torch.Tensor | None
    adversarial_loss: torch.Tensor | None
    logs: dict


@dataclass
class DiscriminatorStepOutput:
    """The discriminator loss (with grad w.r.t. the heads) and detached logit statistics."""

    loss: torch.Tensor
    logs: dict


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """
    Parameters of `module` do not require grad inside the block (restored after): a graph built there carries
    gradients through `module` to its inputs but never into its parameters.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def _student_x0(student, x_t, t, prompt_embeds, prompt_attention_mask, guidance_scale, sigma_data, control=None):
    """`x0_hat = cos t x_t - sin t sigma_data F(x_t / sigma_data, t)` (`w` used by a student with an embedder)."""
    (velocity,) = student(
        x_t / sigma_data, t, prompt_embeds, prompt_attention_mask, guidance_scale=guidance_scale, **(control or {})
    )
    return denoise_trigflow(x_t, velocity, t, sigma_data)


def _draw_generator_inputs(batch: DistillationBatch, config: DistillationConfig, generator):
    x0 = batch.latents
    device = x0.device
    scm_config = config.scm
    t = sample_trigflow_time(
        x0.shape[0], scm_config.p_mean, scm_config.p_std, scm_config.sigma_data, device=device, generator=generator
    )
    z = sample_noise(x0, scm_config.sigma_data, generator)
    w = sample_guidance_scales(x0.shape[0], scm_config.guidance_scales, device=device, generator=generator)
    return t, z, w


def generator_step(
    student,
    teacher,
    discriminator: SanaDiscriminator | None,
    batch: DistillationBatch,
    state: DistillationState,
    config: DistillationConfig,
    generator: torch.Generator | None = None,
) -> GeneratorStepOutput:
    r"""
    The generator loss of one iteration: `scm_lambda * L_sCM + adversarial_lambda * L_adv`.

    `t ~ atan(exp(N(P_mean, P_std)) / sigma_data)`, `z ~ N(0, sigma_data^2)`, `w` uniform over the CFG scales.
    L_sCM: [`scm_loss`] at `(x0, z, t)`. L_adv: the student's `x0_hat` from `t'` (`t` replaced by `pi/2` with
    `max_time_probability`, same `z`), re-noised at `t_D`, judged by the discriminator with its caption. Rows whose
    time was not replaced reuse the sCM forward's `F` (the same function at the same input, so the same loss and
    gradients as a fresh forward); only the `pi/2` rows run the student again, by default as extra rows of the sCM
    term's student call (`single_student_forward`).

    The discriminator is judged [`frozen`]: its heads get no gradient from this loss (the adversarial gradient
    reaches the student through heads and teacher), so nothing leaks into the discriminator's next update. Pass the
    bare [`SanaDiscriminator`], not a DDP-wrapped one (it is not trained here).
    """
    if config.uses_discriminator and discriminator is None:
        raise ValueError("`discriminator` is required when `config.adversarial_lambda > 0`.")
    student = as_trigflow_model(student)
    sigma_data = config.scm.sigma_data
    t, z, w = _draw_generator_inputs(batch, config, generator)
    logs = {"t_mean": t.mean().detach()}

    # The LADD fake's inputs come first (scm_loss draws no random numbers, so the draw order is unchanged): its rows
    # that need a fresh student forward can then join the sCM forward.
    reuse_scm_forward = config.scm_lambda > 0 and config.fake_from_scm_forward
    fresh_inputs = None
    if config.uses_discriminator:
        t_fake, z_fake = t, z
        if config.scm_lambda > 0 and not config.fake_from_scm_forward:  # official: fresh t and z for the fake
            t_fake, z_fake, _ = _draw_generator_inputs(batch, config, generator)
        t_fake = replace_with_max_time(t_fake, config.max_time_probability, generator=generator)
        if reuse_scm_forward:  # rows that keep t reuse the sCM forward's F (same input, same graph)
            rows = (t_fake != t).nonzero().flatten()
        else:  # every fake needs its own forward
            rows = torch.arange(t.shape[0], device=t.device)
        if rows.numel() > 0:
            fresh_x_t = add_trigflow_noise(batch.latents[rows], z_fake[rows], t_fake[rows])
            mask = batch.prompt_attention_mask
            fresh_inputs = (
                fresh_x_t / sigma_data,
                t_fake[rows],
                batch.prompt_embeds[rows],
                None if mask is None else mask[rows],
                w[rows],
                batch.control(rows).get("controlnet_cond"),
            )
    one_call = fresh_inputs is not None and config.scm_lambda > 0 and config.single_student_forward

    scm_part = None
    velocity = None
    fresh_velocity = None
    if config.scm_lambda > 0:
        scm_out = scm_loss(
            student,
            teacher,
            batch.latents,
            z,
            t,
            batch.prompt_embeds,
            batch.prompt_attention_mask,
            batch.null_prompt_embeds,
            batch.null_prompt_attention_mask,
            w,
            state.generator_steps,
            config.scm,
            extra_inputs=fresh_inputs if one_call else None,
            **batch.control(),
        )
        scm_part, velocity, fresh_velocity = scm_out.loss, scm_out.velocity, scm_out.extra_velocity
        logs.update(scm_loss=scm_out.loss.detach(), **scm_out.logs)

    adversarial_part = None
    if config.uses_discriminator:
        if reuse_scm_forward:
            fake_x0 = denoise_trigflow(add_trigflow_noise(batch.latents, z, t), velocity, t, sigma_data)
        else:
            fake_x0 = torch.zeros_like(batch.latents)
        if fresh_inputs is not None:
            if fresh_velocity is None:
                (fresh_velocity,) = student(*fresh_inputs[:4], guidance_scale=fresh_inputs[4], **batch.control(rows))
            fresh = denoise_trigflow(fresh_x_t, fresh_velocity, t_fake[rows], sigma_data)
            fake_x0 = fake_x0.index_put((rows,), fresh.to(fake_x0.dtype))
        shared = config.discriminator_shared_norm_groups
        renoised = renoise_for_discriminator(
            real_x0=batch.latents if shared else None,
            fake_x0=fake_x0,
            p_mean=config.discriminator_p_mean,
            p_std=config.discriminator_p_std,
            sigma_data=sigma_data,
            share_timesteps=shared and config.share_discriminator_timesteps,
            generator=generator,
        )
        fake = (renoised.fake_x_t / sigma_data, renoised.fake_t, batch.prompt_embeds, batch.prompt_attention_mask)
        reference = None
        if shared:  # the real rows share the heads' batch-norm groups with the fakes (no graph through them)
            control = batch.control().get("controlnet_cond")
            reference = DiscriminatorInputs(renoised.real_x_t / sigma_data, renoised.real_t, *fake[2:], control)
        with frozen(discriminator):
            fake_logits = discriminator(*fake, **batch.control(), reference=reference)[: fake_x0.shape[0]]
        adversarial_part = generator_adversarial_loss(fake_logits, config.adversarial_loss)
        logs.update(adversarial_loss=adversarial_part.detach(), fake_logits_mean_g=fake_logits.detach().mean())

    loss = 0.0
    if scm_part is not None:
        loss = loss + config.scm_lambda * scm_part
    if adversarial_part is not None:
        loss = loss + config.adversarial_lambda * adversarial_part
    logs["generator_loss"] = loss.detach()
    return GeneratorStepOutput(loss=loss, scm_loss=scm_part, adversarial_loss=adversarial_part, logs=logs)


def discriminator_step(
    student,
    discriminator: SanaDiscriminator,
    batch: DistillationBatch,
    config: DistillationConfig,
    generator: torch.Generator | None = None,
) -> DiscriminatorStepOutput:
    r"""
    The discriminator loss of one iteration: real `x0` vs the student's `x0_hat` (no grad to the student), both
    re-noised at independent `t_D`; the fake is generated from `t = pi/2` with `max_time_probability` (the same
    max-time weighting as the generator phase, at pi/2 itself); misaligned pairs (real latents with rolled
    captions) join the fakes. `loss = L_D (+ r1_gamma / 2 * R1)`. `discriminator` may be the prepared (DDP) one.
    """
    student = as_trigflow_model(student)
    sigma_data = config.scm.sigma_data
    t, z, w = _draw_generator_inputs(batch, config, generator)
    t = replace_with_max_time(t, config.max_time_probability, generator=generator)
    with torch.no_grad():
        x_t = add_trigflow_noise(batch.latents, z, t)
        fake_x0 = _student_x0(
            student, x_t, t, batch.prompt_embeds, batch.prompt_attention_mask, w, sigma_data, batch.control()
        )
    fake_embeds, fake_mask = batch.prompt_embeds, batch.prompt_attention_mask
    real_control, fake_control = batch.control(), batch.control()
    if config.misaligned_pairs:
        # A misaligned pair keeps its image's own control (only the caption is wrong): the control latents ride
        # along as extra channels through the row selection.
        real = batch.latents
        if fake_control:
            real = torch.cat([real, batch.control_latents.to(real.dtype)], dim=1)
        pairs = misaligned_pairs(real, batch.prompt_embeds, batch.prompt_attention_mask)
        pair_latents, pair_control = pairs.latents.split(
            [batch.latents.shape[1], real.shape[1] - batch.latents.shape[1]], 1
        )
        fake_x0 = torch.cat([fake_x0, pair_latents.to(fake_x0.dtype)])
        fake_embeds = torch.cat([fake_embeds, pairs.encoder_hidden_states])
        fake_mask = torch.cat([fake_mask, pairs.encoder_attention_mask])
        if fake_control:
            control = batch.control_latents
            fake_control = {"controlnet_cond": torch.cat([control, pair_control.to(control.dtype)])}
    renoised = renoise_for_discriminator(
        real_x0=batch.latents,
        fake_x0=fake_x0,
        p_mean=config.discriminator_p_mean,
        p_std=config.discriminator_p_std,
        sigma_data=sigma_data,
        share_timesteps=config.share_discriminator_timesteps,
        generator=generator,
    )
    real_inputs = renoised.real_x_t / sigma_data
    real_control, fake_control = real_control.get("controlnet_cond"), fake_control.get("controlnet_cond")
    real = DiscriminatorInputs(
        real_inputs, renoised.real_t, batch.prompt_embeds, batch.prompt_attention_mask, real_control
    )
    fake = DiscriminatorInputs(renoised.fake_x_t / sigma_data, renoised.fake_t, fake_embeds, fake_mask, fake_control)
    if config.discriminator_shared_norm_groups:
        # One call, real rows as the reference: every local batch-norm group of the heads holds real and fake rows.
        logits = discriminator(*fake[:4], controlnet_cond=fake_control, reference=real)
        fake_logits, real_logits = logits.split([fake.x_t_scaled.shape[0], real_inputs.shape[0]])
    else:  # official: real and fake judged in separate calls
        real_logits = discriminator(*real[:4], controlnet_cond=real_control)
        fake_logits = discriminator(*fake[:4], controlnet_cond=fake_control)
    loss = discriminator_loss(real_logits, fake_logits, config.adversarial_loss)
    logs = {
        "discriminator_loss": loss.detach(),
        "real_logits_mean": real_logits.detach().mean(),
        "fake_logits_mean": fake_logits.detach().mean(),
        "max_time_fraction": (t == torch.pi / 2).float().mean(),
    }
    if config.r1_gamma > 0:
        r1 = r1_penalty(
            getattr(discriminator, "module", discriminator),  # DDP: the heads' graph is armed by the calls above
            real_inputs,
            renoised.real_t,
            batch.prompt_embeds,
            batch.prompt_attention_mask,
            controlnet_cond=real_control,
        )
        loss = loss + config.r1_gamma / 2 * r1
        logs["r1"] = r1.detach()
    return DiscriminatorStepOutput(loss=loss, logs=logs)


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor | float) -> bool:
    """
    `optimizer.step()` unless `grad_norm` (e.g. from `accelerator.clip_grad_norm_`) is NaN/Inf, then zero the
    gradients either way. Returns `True` when the update was skipped. Under DDP / FSDP2 the clipped norm is the
    global one, so every process takes the same decision.
    """
    grad_norm = torch.as_tensor(grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm
        grad_norm = grad_norm.full_tensor()
    skipped = not bool(torch.isfinite(grad_norm).all())
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


__all__ = [
    "DistillationBatch",
    "DistillationConfig",
    "DistillationState",
    "DiscriminatorStepOutput",
    "GeneratorStepOutput",
    "discriminator_step",
    "frozen",
    "generator_step",
    "step_if_finite",
]
