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

from ..models.modeling_utils import unwrap_model
from ..models.trigflow_model import TrigFlowInputs, as_trigflow_model
from ..trigflow import add_trigflow_noise, denoise_trigflow, replace_with_max_time, sample_noise, sample_trigflow_time
from .batch import DistillationBatch
from .ladd import (
    ADVERSARIAL_LOSS_TYPES,
    DISCRIMINATOR_P_MEAN,
    DISCRIMINATOR_P_STD,
    SanaDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    misaligned_pairs,
    r1_penalty,
    renoise_for_discriminator,
)
from .scm import SCMLossConfig, sample_guidance_scales, scm_loss
from .settings import PROBABILITY, at_least, check_settings, setting
from .tangent import one_sided_finite_difference


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


class _StudentForwardWithFakeRows:
    """
    [`scm_loss`]'s grad-enabled student forward that also runs the LADD fake's fresh rows `fake`: in the same call
    (one forward and one backward of `B + k` rows), or, with `same_call=False`, in a call of their own right after
    (the one-sided finite difference takes the sCM rows' `F` as its base point, which must come from a call laid out
    like its shifted one: batching changes `F`'s rounding, which `/ h` amplifies). Their `F` (with grad) is kept
    in `fake_velocity`.
    """

    def __init__(self, student, fake: TrigFlowInputs, same_call: bool):
        self.student, self.fake, self.same_call = student, fake, same_call
        self.fake_velocity = None

    def __call__(self, inputs: TrigFlowInputs, **options) -> tuple[torch.Tensor, ...]:
        if not self.same_call:
            out = inputs.call(self.student, **options)
            (self.fake_velocity,) = self.fake.call(self.student)
            return out
        out = inputs.cat(self.fake).call(self.student, **options)
        batch_size = inputs.t.shape[0]
        self.fake_velocity = out[0][batch_size:]
        return tuple(o[:batch_size] for o in out)


def _fresh_fake_rows(batch: DistillationBatch, t, z, w, config: DistillationConfig, generator):
    """
    The rows of the LADD fake that need a student forward of their own, `(rows, x_t, inputs)` (`x_t` in sigma_data
    units), or `(None, None, None)`. The fake starts from `t` replaced by `pi/2` with `max_time_probability`; with
    `fake_from_scm_forward` the rows that keep `t` (and `z`) reuse the sCM forward's `F` and only the `pi/2` rows run
    again, else (official) every row runs from a fresh `t` and `z`.
    """
    reuse_scm_forward = config.scm_lambda > 0 and config.fake_from_scm_forward
    t_fake, z_fake = t, z
    if config.scm_lambda > 0 and not config.fake_from_scm_forward:  # official: fresh t and z for the fake
        t_fake, z_fake, _ = _draw_generator_inputs(batch, config, generator)
    t_fake = replace_with_max_time(t_fake, config.max_time_probability, generator=generator)
    rows = (t_fake != t).nonzero().flatten() if reuse_scm_forward else torch.arange(t.shape[0], device=t.device)
    if rows.numel() == 0:
        return None, None, None
    x_t = add_trigflow_noise(batch.latents[rows], z_fake[rows], t_fake[rows])
    return rows, x_t, batch.model_inputs(x_t / config.scm.sigma_data, t_fake[rows], w[rows], rows)


def _discriminate(discriminator, inputs: TrigFlowInputs, reference: TrigFlowInputs | None = None) -> torch.Tensor:
    """The discriminator's logits on `inputs` (through its `__call__`, so a DDP wrapper sees the call)."""
    x, t, embeds, mask = inputs.x_t_scaled, inputs.t, inputs.prompt_embeds, inputs.prompt_attention_mask
    return discriminator(x, t, embeds, mask, controlnet_cond=inputs.control, reference=reference)


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

    # 1. The LADD fake's fresh rows come first (scm_loss draws no random numbers, so the draw order is unchanged):
    #    they can then join the sCM term's student forward.
    rows = fresh_x_t = fresh_inputs = None
    if config.uses_discriminator:
        rows, fresh_x_t, fresh_inputs = _fresh_fake_rows(batch, t, z, w, config, generator)
    fresh_velocity = scm_part = None
    if config.scm_lambda > 0:
        forward = None
        if fresh_inputs is not None and config.single_student_forward:
            same_call = not one_sided_finite_difference(config.scm, batch.latents.device.type)
            forward = _StudentForwardWithFakeRows(student, fresh_inputs, same_call)
        # 2. L_sCM.
        scm_out = scm_loss(student, teacher, batch, z, t, w, state.generator_steps, config.scm, forward)
        scm_part, fresh_velocity = scm_out.loss, forward.fake_velocity if forward is not None else None
        logs.update(scm_loss=scm_out.loss.detach(), **scm_out.logs)

    adversarial_part = None
    if config.uses_discriminator:
        # 3. The fake x0_hat: the sCM forward's rows, the fresh rows from their own F.
        if config.scm_lambda > 0 and config.fake_from_scm_forward:
            fake_x0 = denoise_trigflow(add_trigflow_noise(batch.latents, z, t), scm_out.velocity, t, sigma_data)
        else:
            fake_x0 = torch.zeros_like(batch.latents)
        if fresh_inputs is not None:
            if fresh_velocity is None:
                (fresh_velocity,) = fresh_inputs.call(student)
            fresh_x0 = denoise_trigflow(fresh_x_t, fresh_velocity, fresh_inputs.t, sigma_data)
            fake_x0 = fake_x0.index_put((rows,), fresh_x0.to(fake_x0.dtype))
        # 4. L_adv: the discriminator (frozen) judges the re-noised fake; with shared norm groups next to real rows.
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
        fake = batch.model_inputs(renoised.fake_x_t / sigma_data, renoised.fake_t)
        reference = batch.model_inputs(renoised.real_x_t / sigma_data, renoised.real_t) if shared else None
        with frozen(discriminator):
            fake_logits = _discriminate(discriminator, fake, reference)[: fake_x0.shape[0]]
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
        (velocity,) = batch.model_inputs(x_t / sigma_data, t, w).call(student)
        fake_x0 = denoise_trigflow(x_t, velocity, t, sigma_data)
    fake_embeds, fake_mask, fake_control = batch.prompt_embeds, batch.prompt_attention_mask, batch.control_latents
    if config.misaligned_pairs:
        # A misaligned pair keeps its image's own control (only the caption is wrong): the control latents ride
        # along as extra channels through the row selection.
        real = batch.latents
        if fake_control is not None:
            real = torch.cat([real, fake_control.to(real.dtype)], dim=1)
        pairs = misaligned_pairs(real, batch.prompt_embeds, batch.prompt_attention_mask)
        pair_latents, pair_control = pairs.latents.split(
            [batch.latents.shape[1], real.shape[1] - batch.latents.shape[1]], 1
        )
        fake_x0 = torch.cat([fake_x0, pair_latents.to(fake_x0.dtype)])
        fake_embeds = torch.cat([fake_embeds, pairs.encoder_hidden_states])
        fake_mask = torch.cat([fake_mask, pairs.encoder_attention_mask])
        if fake_control is not None:
            fake_control = torch.cat([fake_control, pair_control.to(fake_control.dtype)])
    renoised = renoise_for_discriminator(
        real_x0=batch.latents,
        fake_x0=fake_x0,
        p_mean=config.discriminator_p_mean,
        p_std=config.discriminator_p_std,
        sigma_data=sigma_data,
        share_timesteps=config.share_discriminator_timesteps,
        generator=generator,
    )
    real = batch.model_inputs(renoised.real_x_t / sigma_data, renoised.real_t)
    fake = TrigFlowInputs(renoised.fake_x_t / sigma_data, renoised.fake_t, fake_embeds, fake_mask, None, fake_control)
    if config.discriminator_shared_norm_groups:
        # One call, real rows as the reference: every local batch-norm group of the heads holds real and fake rows.
        logits = _discriminate(discriminator, fake, reference=real)
        fake_logits, real_logits = logits.split([fake.t.shape[0], real.t.shape[0]])
    else:  # official: real and fake judged in separate calls
        real_logits = _discriminate(discriminator, real)
        fake_logits = _discriminate(discriminator, fake)
    loss = discriminator_loss(real_logits, fake_logits, config.adversarial_loss)
    logs = {
        "discriminator_loss": loss.detach(),
        "real_logits_mean": real_logits.detach().mean(),
        "fake_logits_mean": fake_logits.detach().mean(),
        "max_time_fraction": (t == torch.pi / 2).float().mean(),
    }
    if config.r1_gamma > 0:
        # DDP: the heads' graph is armed by the calls above; the penalty's own calls go to the bare module.
        x, t_real, embeds, mask = real.x_t_scaled, real.t, real.prompt_embeds, real.prompt_attention_mask
        r1 = r1_penalty(unwrap_model(discriminator), x, t_real, embeds, mask, controlnet_cond=real.control)
        loss = loss + config.r1_gamma / 2 * r1
        logs["r1"] = r1.detach()
    return DiscriminatorStepOutput(loss=loss, logs=logs)


__all__ = [
    "DistillationBatch",
    "DistillationConfig",
    "DistillationState",
    "DiscriminatorStepOutput",
    "GeneratorStepOutput",
    "discriminator_step",
    "frozen",
    "generator_step",
]
