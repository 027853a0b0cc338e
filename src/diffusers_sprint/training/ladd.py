"""LADD: latent adversarial distillation on frozen-teacher features (SANA-Sprint section 4, LADD arXiv 2403.12015).

The discriminator is the frozen teacher plus small trainable heads. Forward hooks on a few teacher transformer blocks
capture their token features `[B, N, C]`; each goes (as `[B, C, N]`) through its own StyleGAN-T style 1D head that
returns one logit per token. The logits of all heads are concatenated along the token axis. Only the heads train; the
generator gets its adversarial gradient through the (frozen) teacher, w.r.t. the teacher's input.

Both branches are re-noised before the discriminator: `x_t = cos(t_D) x0 + sin(t_D) z`, with
`t_D = atan(exp(N(-0.6, 1.0)) / sigma_data)` drawn independently per branch by default. The discriminator is called on
`x_t / sigma_data`, like every TrigFlow network here.

Real and fake rows share the heads' local batch norm. Each head normalises its features over groups of a few samples
(`BatchNormLocal`). A group that holds only fakes (or only reals) loses what sets it apart: its per-channel mean and
variance are divided out, so the mean logit of the group is nearly a constant of the head, whatever the inputs. Judged
in separate calls, real and fake get the same mean logit, the hinge loss sits at 1 and the generator's adversarial
gradient is mostly cancelled (docs/results.md, "Why the discriminator stayed at chance"). So the discriminator judges
fakes together with real `reference` rows: both run through the teacher (separately: the real rows build no graph),
and the heads see them interleaved, every group holding both in proportion ([`interleave_order`]).

Losses (logits are `[B, tokens]`; means run over every logit):

- hinge: `L_D = 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))`, `L_G = -mean D(fake)`
- bce:   `L_D = mean softplus(-D(real)) + mean softplus(D(fake))`, `L_G = mean softplus(-D(fake))` (non-saturating)
- R1:    `E_b || d(sum_tokens D(x)_b) / dx_b ||^2` at real inputs (optional).
"""

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..models.trigflow_model import TrigFlowInputs, TrigFlowModel, as_trigflow_model
from ..trigflow import add_trigflow_noise, sample_noise, sample_trigflow_time


# The block ids of the official SANA-Sprint recipes: the 1.6B (20 blocks) and the 0.6B (28 blocks) configs alike.
DEFAULT_HEAD_BLOCK_IDS = (2, 8, 14, 19)
HEAD_BLOCK_LAYOUTS = ("official", "spread")
DISCRIMINATOR_P_MEAN = -0.6
DISCRIMINATOR_P_STD = 1.0
ADVERSARIAL_LOSS_TYPES = ("hinge", "bce")


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class BatchNormLocal(nn.Module):
    r"""
    Batch normalisation over small "virtual" batches (StyleGAN-T): statistics per channel over groups of up to
    `virtual_batch_size` consecutive samples and all their tokens, never accumulated (train and eval act the same).

    A batch of `B` samples is split into `G = ceil(B / virtual_batch_size)` consecutive groups whose sizes differ by at
    most one (`torch.tensor_split`). When `G` divides `B` this is exactly StyleGAN-T's `x.view(G, -1, C, N)`; unlike
    that reshape it also works when it does not (e.g. `B = 9` gives groups of 5 and 4).

    Args:
        num_features (`int`): The number of channels `C`.
        virtual_batch_size (`int`, defaults to 8): The largest number of samples that share statistics.
        affine (`bool`, defaults to `True`): Learn a per-channel scale (init 1) and shift (init 0).
        eps (`float`, defaults to 1e-5): Added to the (biased) variance.
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 8, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        if virtual_batch_size < 1:
            raise ValueError(f"`virtual_batch_size` must be >= 1, got {virtual_batch_size}.")
        self.num_features = num_features
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` of shape `(batch_size, num_features, num_tokens)` -> same shape."""
        num_groups = max(1, math.ceil(x.shape[0] / self.virtual_batch_size))
        # Statistics in at least fp32 (bf16 variances of 2k-channel features are too coarse).
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        groups = []
        for group in x.to(compute_dtype).tensor_split(num_groups, dim=0):
            mean = group.mean(dim=(0, 2), keepdim=True)
            var = group.var(dim=(0, 2), keepdim=True, unbiased=False)
            groups.append((group - mean) * torch.rsqrt(var + self.eps))
        out = torch.cat(groups, dim=0)
        if self.affine:
            out = out * self.weight.to(compute_dtype)[None, :, None] + self.bias.to(compute_dtype)[None, :, None]
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, affine={self.affine}, eps={self.eps}"
        )


class DiscriminatorHead(nn.Module):
    r"""
    A StyleGAN-T style 1D discriminator head on token features (unconditional, as in SANA-Sprint).

    ```
    h = LeakyReLU(BNLocal(SNConv1d_k1(x)))                         C_in -> C
    h = (LeakyReLU(BNLocal(SNConv1d_k9_circular(h))) + h) / sqrt 2  residual block
    logits = SNConv1d_k1(h)                                       C -> 1
    ```
    `SN` is spectral normalisation (one power iteration per training-mode forward; frozen in eval mode). Circular
    padding treats the flattened token sequence as a ring, so every token sees `kernel_size` neighbours.

    Args:
        in_channels (`int`): Channels `C_in` of the features (the teacher's inner dim).
        hidden_channels (`int`, *optional*): Width `C` of the head; defaults to `in_channels` (the official choice).
            A smaller width makes the `kernel_size` conv (`C^2 kernel_size` weights) much cheaper.
        kernel_size (`int`, defaults to 9): Odd kernel size of the residual conv.
        virtual_batch_size (`int`, defaults to 8): See [`BatchNormLocal`].
        negative_slope (`float`, defaults to 0.2): LeakyReLU slope.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int | None = None,
        kernel_size: int = 9,
        virtual_batch_size: int = 8,
        negative_slope: float = 0.2,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd and positive (to keep the token count), got {kernel_size}.")
        hidden_channels = hidden_channels or in_channels
        self.conv_in = spectral_norm(nn.Conv1d(in_channels, hidden_channels, kernel_size=1))
        self.norm_in = BatchNormLocal(hidden_channels, virtual_batch_size=virtual_batch_size)
        self.conv_res = spectral_norm(
            nn.Conv1d(
                hidden_channels,
                hidden_channels,
                kernel_size=kernel_size,
                padding=kernel_size // 2,
                padding_mode="circular",
            )
        )
        self.norm_res = BatchNormLocal(hidden_channels, virtual_batch_size=virtual_batch_size)
        self.conv_out = spectral_norm(nn.Conv1d(hidden_channels, 1, kernel_size=1))
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` of shape `(batch_size, in_channels, num_tokens)` -> logits `(batch_size, num_tokens)`."""
        hidden = self.act(self.norm_in(self.conv_in(features)))
        hidden = (self.act(self.norm_res(self.conv_res(hidden))) + hidden) / math.sqrt(2)
        return self.conv_out(hidden).squeeze(1)


def interleave_order(num_first: int, num_second: int, device: torch.device | str | None = None) -> torch.Tensor:
    r"""
    A permutation of `num_first + num_second` rows (the first set at `0..num_first-1`, the second after) that spreads
    both sets evenly: row `i` of a set of size `n` gets the key `(i + 1/2) / n`, rows are sorted by key (ties: the
    first set first). Equal sizes give `a0 b0 a1 b1 ...`; any run of `k` consecutive rows holds about
    `k n_1 / (n_1 + n_2)` of the first set, so every [`BatchNormLocal`] group sees both sets in proportion.

    Returns:
        `torch.Tensor` of shape `(num_first + num_second,)`, `int64`: `mixed = rows[order]`.
    """
    if num_first < 0 or num_second < 0:
        raise ValueError(f"Row counts must be >= 0, got {num_first} and {num_second}.")

    def keys(count: int) -> torch.Tensor:
        return (torch.arange(count, device=device, dtype=torch.float64) + 0.5) / max(count, 1)

    return torch.sort(torch.cat([keys(num_first), keys(num_second)]), stable=True).indices


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator on frozen-teacher features
# ---------------------------------------------------------------------------------------------------------------------


def default_head_block_ids(num_layers: int, layout: str = "official") -> list[int]:
    """
    Default teacher blocks for the discriminator heads of a teacher with `num_layers` blocks.

    `"spread"`: up to 4 block ids spread over the depth in the proportions of the official 20-block choice
    `(2, 8, 14, 19)`: `round(f (num_layers - 1))` for `f in (2/19, 8/19, 14/19, 1)`, duplicates dropped. Examples:
    20 -> `[2, 8, 14, 19]`, 28 -> `[3, 11, 20, 27]`, 4 -> `[0, 1, 2, 3]`, 2 -> `[0, 1]`, 1 -> `[0]`.

    `"official"`: `[2, 8, 14, 19]` for every teacher of at least 20 blocks (NVlabs' 0.6B configs, 28 blocks, use the
    1.6B's ids unchanged), and the spread for shallower teachers, for which there is no official choice.
    """
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be >= 1, got {num_layers}.")
    if layout not in HEAD_BLOCK_LAYOUTS:
        raise ValueError(f"`layout` must be one of {HEAD_BLOCK_LAYOUTS}, got {layout!r}.")
    if layout == "official" and num_layers > DEFAULT_HEAD_BLOCK_IDS[-1]:
        return list(DEFAULT_HEAD_BLOCK_IDS)
    last = num_layers - 1
    fractions = [block_id / DEFAULT_HEAD_BLOCK_IDS[-1] for block_id in DEFAULT_HEAD_BLOCK_IDS]
    return sorted({int(math.floor(fraction * last + 0.5)) for fraction in fractions})


@contextmanager
def _blocks_up_to(transformer: nn.Module, last_block_id: int) -> Iterator[None]:
    """
    Inside the block, `transformer.transformer_blocks` holds blocks `0..last_block_id` only (the same modules), so a
    forward stops its block loop there; the full list is restored afterwards, also on error. The blocks after
    `last_block_id` would only feed the output, which the discriminator discards: their forward (and, with grad, the
    graph they would keep alive) is saved exactly. The final norm and projection still run on the last kept block.
    """
    blocks = transformer.transformer_blocks
    if last_block_id + 1 >= len(blocks):
        yield
        return
    transformer._modules["transformer_blocks"] = blocks[: last_block_id + 1]
    try:
        yield
    finally:
        transformer._modules["transformer_blocks"] = blocks


def _validate_head_block_ids(head_block_ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    ids = tuple(head_block_ids)
    for block_id in ids:
        if isinstance(block_id, bool) or not isinstance(block_id, numbers.Integral):
            raise ValueError(f"`head_block_ids` must hold ints, got {block_id!r} in {ids}.")
    ids = tuple(int(block_id) for block_id in ids)
    hint = (
        f"`default_head_block_ids({num_layers})` = {default_head_block_ids(num_layers)} spreads them over the depth."
    )
    if len(ids) == 0:
        raise ValueError(f"`head_block_ids` is empty; give at least one teacher block id. {hint}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`head_block_ids` {ids} repeats a block id; each block gets at most one head.")
    invalid = [block_id for block_id in ids if not 0 <= block_id < num_layers]
    if invalid:
        raise ValueError(
            f"`head_block_ids` {ids} holds {invalid}, out of range for a teacher with {num_layers} transformer "
            f"blocks (depth {num_layers}): valid ids are 0..{num_layers - 1}. {hint}"
        )
    return ids


class SanaDiscriminator(nn.Module):
    r"""
    The LADD discriminator: a frozen SANA teacher whose transformer-block features feed trainable
    [`DiscriminatorHead`]s.

    The teacher is **not a registered submodule**: it is kept in a plain attribute. Hence `parameters()`,
    `state_dict()`, `to()`, `train()`/`eval()`, `requires_grad_()` and DDP/`accelerator.prepare` see only the heads:

    - checkpoints hold the heads only (not a second multi-GB copy of the teacher, which could also be loaded back over
      a model sharing its keys, cf. diffusers #12444);
    - an optimizer built from `discriminator.parameters()` can never step the teacher;
    - `discriminator.train()` does not switch the teacher (which may also serve as the sCM teacher) to train mode,
      and `discriminator.to(dtype)` does not cast it. The caller places the teacher on its device and dtype.

    The constructor freezes the teacher (`requires_grad_(False)`, `eval()`); every forward checks it is still frozen.
    Forward hooks live only for the duration of one teacher forward inside [`extract_features`] (removed in a
    `finally`), so the same teacher used elsewhere runs hook-free and nothing is left to clean up in `__del__`.

    The teacher forward runs in the caller's grad mode: with a fake input that requires grad (generator phase), the
    adversarial gradient flows through the teacher to the input while the frozen teacher parameters get none; with
    inputs that do not require grad (discriminator phase) no graph is built through the teacher at all.

    Args:
        teacher ([`~models.TrigFlowModel`] or [`SanaSprintTransformer2DModel`]): The frozen teacher; a bare
            transformer is wrapped. Pass the `TrigFlowModel` the sCM loss uses, so that one FSDP2-sharded teacher
            serves both.
        head_block_ids (`Sequence[int]`, *optional*, defaults to `(2, 8, 14, 19)`): Teacher blocks to read, each
            with its own head; logits are concatenated in this order. `None` picks
            [`default_head_block_ids`]`(depth)`. Ids must be distinct and in `0..depth-1`.
        head_channels (`int`, *optional*): Width of each head (defaults to the teacher's inner dim, as official).
        kernel_size (`int`, defaults to 9): Residual conv kernel size of each head.
        virtual_batch_size (`int`, defaults to 8): Group size of [`BatchNormLocal`].
    """

    def __init__(
        self,
        teacher: nn.Module,
        head_block_ids: Sequence[int] | None = DEFAULT_HEAD_BLOCK_IDS,
        head_channels: int | None = None,
        kernel_size: int = 9,
        virtual_batch_size: int = 8,
    ):
        super().__init__()
        teacher = as_trigflow_model(teacher)
        if not isinstance(teacher, TrigFlowModel) or not hasattr(teacher.transformer, "transformer_blocks"):
            raise TypeError(
                "`teacher` must be a SanaSprintTransformer2DModel (with `transformer_blocks` and `trigflow_forward`) "
                f"or a TrigFlowModel around one, got {type(teacher).__name__}."
            )
        num_layers = len(teacher.transformer.transformer_blocks)
        if head_block_ids is None:
            head_block_ids = default_head_block_ids(num_layers)
        self.head_block_ids = _validate_head_block_ids(head_block_ids, num_layers)

        teacher.requires_grad_(False)
        teacher.eval()
        # Bypass nn.Module.__setattr__ so the teacher is not registered as a submodule (see the class docstring).
        object.__setattr__(self, "_teacher", teacher)

        config = teacher.transformer.config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        self.heads = nn.ModuleList(
            DiscriminatorHead(
                inner_dim,
                hidden_channels=head_channels,
                kernel_size=kernel_size,
                virtual_batch_size=virtual_batch_size,
            )
            for _ in self.head_block_ids
        )

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher's [`~models.TrigFlowModel`] (not a submodule: not in `parameters()` / `state_dict()`)."""
        return self._teacher

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens per head for a latent of `height x width`: `(height / patch) (width / patch)`."""
        patch_size = self.teacher.transformer.config.patch_size
        return (height // patch_size) * (width // patch_size)

    def _check_teacher_frozen(self) -> None:
        if self.teacher.training or any(parameter.requires_grad for parameter in self.teacher.parameters()):
            raise RuntimeError(
                "The discriminator's teacher must stay frozen (`requires_grad_(False)`) and in eval mode; something "
                "unfroze it or switched it to train mode after the SanaDiscriminator was built."
            )

    def extract_features(
        self,
        x_t_scaled: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
        controlnet_cond: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        r"""
        Run the teacher once with temporary forward hooks and return the hooked block outputs. The teacher's blocks
        after the last hooked one do not run (their outputs reach no head).

        Args:
            x_t_scaled (`torch.Tensor` of shape `(batch_size, channels, height, width)`): `x_t / sigma_data`.
            t (`torch.Tensor` of shape `(batch_size,)`): TrigFlow time in radians.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, caption_channels)`).
            encoder_attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*).
            guidance_scale: Only for a teacher with a guidance embedder (see `trigflow_forward`); else `None`.
            controlnet_cond (`torch.Tensor` of shape `(batch_size, channels, height, width)`, *optional*): Control
                latents, for a teacher `TrigFlowModel` with a ControlNet: the features are those of teacher +
                ControlNet (a block's hooked output carries the residual of the block before it).

        Returns:
            `list[torch.Tensor]`, one `(batch_size, inner_dim, num_tokens)` tensor per entry of `head_block_ids`.
        """
        self._check_teacher_frozen()
        blocks = self.teacher.transformer.transformer_blocks
        captured: dict[int, torch.Tensor] = {}

        def make_hook(block_id: int):
            def hook(module, args, output):
                if block_id in captured:
                    raise RuntimeError(f"Teacher block {block_id} ran twice in one discriminator forward.")
                captured[block_id] = output

            return hook

        handles = []
        try:
            for block_id in self.head_block_ids:
                handles.append(blocks[block_id].register_forward_hook(make_hook(block_id)))
            inputs = TrigFlowInputs(
                x_t_scaled, t, encoder_hidden_states, encoder_attention_mask, guidance_scale, controlnet_cond
            )
            with _blocks_up_to(self.teacher.transformer, max(self.head_block_ids)):
                inputs.call(self.teacher)
        finally:
            for handle in handles:
                handle.remove()

        missing = [block_id for block_id in self.head_block_ids if block_id not in captured]
        if missing:
            raise RuntimeError(f"Teacher blocks {missing} did not run during the teacher forward.")
        features = [captured[block_id].transpose(1, 2) for block_id in self.head_block_ids]
        if torch.is_grad_enabled() and x_t_scaled.requires_grad and not all(f.requires_grad for f in features):
            # E.g. a custom checkpointing function that runs blocks under no_grad: the generator would silently get
            # no adversarial gradient. diffusers' default (non-reentrant) checkpointing is fine (tested).
            raise RuntimeError(
                "The hooked teacher features are detached from the grad-requiring input (does the teacher run its "
                "blocks under no_grad, e.g. through a custom gradient-checkpointing function?)."
            )
        return features

    def forward_heads(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Heads on `[B, C, N]` features (one per head, in order) -> concatenated logits `(B, sum of N)`."""
        if len(features) != len(self.heads):
            raise ValueError(f"Expected {len(self.heads)} feature tensors (one per head), got {len(features)}.")
        dtype = self.heads[0].norm_in.weight.dtype
        return torch.cat([head(feature.to(dtype)) for head, feature in zip(self.heads, features)], dim=1)

    def forward(
        self,
        x_t_scaled: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | float | None = None,
        controlnet_cond: torch.Tensor | None = None,
        reference: TrigFlowInputs | None = None,
    ) -> torch.Tensor:
        r"""
        Per-token logits of all heads.

        Args: as in [`extract_features`], and
            reference ([`~models.TrigFlowInputs`], *optional*): Rows judged together with `x_t_scaled` (the real
                branch, when `x_t_scaled` holds fakes). They run through the teacher in a forward of their own (no
                graph when they do not require grad), and the heads normalise both sets together, rows interleaved by
                [`interleave_order`], so that no local batch-norm group holds only one kind. Without it a batch of
                only fakes is normalised on its own, which divides out what tells it from real data (module
                docstring). `guidance_scale` applies to both (the reference's own `guidance` is not read).

        Returns:
            `torch.Tensor` of shape `(batch_size [+ reference batch_size], len(head_block_ids) * num_tokens)`: the
            rows of `x_t_scaled`, then those of `reference`; head `k`'s logits are columns
            `k * num_tokens : (k + 1) * num_tokens`. An empty batch (e.g. [`misaligned_pairs`] at batch size 1)
            returns an empty `(0, ...)` tensor without running the teacher.
        """
        branches = [
            TrigFlowInputs(x_t_scaled, t, encoder_hidden_states, encoder_attention_mask, None, controlnet_cond)
        ]
        if reference is not None:
            branches.append(reference)
        branches = [branch for branch in branches if branch.x_t_scaled.shape[0] > 0]
        if not branches:
            num_tokens = self.num_tokens(*x_t_scaled.shape[-2:])
            return x_t_scaled.new_zeros(0, len(self.heads) * num_tokens, dtype=self.heads[0].norm_in.weight.dtype)
        features = [
            self.extract_features(
                b.x_t_scaled, b.t, b.prompt_embeds, b.prompt_attention_mask, guidance_scale, controlnet_cond=b.control
            )
            for b in branches
        ]
        if len(features) == 1:
            return self.forward_heads(features[0])
        first, second = features[0][0].shape[0], features[1][0].shape[0]
        order = interleave_order(first, second, device=features[0][0].device)
        mixed = [torch.cat([a, b.to(a.dtype)])[order] for a, b in zip(*features)]
        logits = self.forward_heads(mixed)
        return logits[torch.argsort(order)]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: re-noising and misaligned pairs
# ---------------------------------------------------------------------------------------------------------------------


class RenoisedInputs(NamedTuple):
    """Re-noised discriminator inputs `x_t` (sigma_data units: divide by sigma_data first); `None` if not asked."""

    real_x_t: torch.Tensor | None
    real_t: torch.Tensor | None
    fake_x_t: torch.Tensor | None
    fake_t: torch.Tensor | None


def renoise_for_discriminator(
    real_x0: torch.Tensor | None = None,
    fake_x0: torch.Tensor | None = None,
    p_mean: float = DISCRIMINATOR_P_MEAN,
    p_std: float = DISCRIMINATOR_P_STD,
    sigma_data: float = 0.5,
    share_timesteps: bool = False,
    generator: torch.Generator | None = None,
) -> RenoisedInputs:
    r"""
    Re-noise real data and/or student samples for the discriminator: `x_t = cos(t_D) x0 + sin(t_D) z` with
    `t_D = atan(exp(p_mean + p_std n) / sigma_data)`, `n ~ N(0, 1)`, `z ~ N(0, sigma_data^2 I)`.

    Each branch draws its own `t_D` (independent per branch, the default; official `diff_timesteps_D=True`) and its
    own `z`. `share_timesteps=True` reuses the real branch's `t_D` for the fake branch (noise stays independent).
    Gradients flow from `fake_x_t` to `fake_x0` (generator phase). Draw order with a `generator`: real `t`, real `z`,
    fake `t`, fake `z`.

    Args:
        real_x0 (`torch.Tensor` of shape `(batch_size, C, H, W)`, *optional*): Data latents, sigma_data-scaled.
        fake_x0 (`torch.Tensor` of shape `(batch_size', C, H, W)`, *optional*): Student `x0_hat`.
        p_mean, p_std (`float`, defaults to -0.6 and 1.0): The log-normal-in-tan time of the discriminator.
        sigma_data (`float`, defaults to 0.5).
        share_timesteps (`bool`, defaults to `False`): Use one `t_D` for both branches (needs equal batch sizes).
        generator (`torch.Generator`, *optional*).

    Returns:
        [`RenoisedInputs`] `(real_x_t, real_t, fake_x_t, fake_t)`: `x_t` like `x0`, `t` of shape `(batch_size,)`.
    """
    if real_x0 is None and fake_x0 is None:
        raise ValueError("Give `real_x0`, `fake_x0` or both.")
    if share_timesteps and (real_x0 is None or fake_x0 is None or real_x0.shape[0] != fake_x0.shape[0]):
        raise ValueError("`share_timesteps=True` needs `real_x0` and `fake_x0` with the same batch size.")

    def renoise(x0: torch.Tensor, t: torch.Tensor | None):
        if t is None and x0.shape[0] == 0:  # e.g. misaligned pairs at batch size 1
            t = torch.zeros(0, device=x0.device)
        elif t is None:
            t = sample_trigflow_time(
                x0.shape[0], p_mean=p_mean, p_std=p_std, sigma_data=sigma_data, device=x0.device, generator=generator
            )
        return add_trigflow_noise(x0, sample_noise(x0, sigma_data, generator), t), t

    real_x_t = real_t = fake_x_t = fake_t = None
    if real_x0 is not None:
        real_x_t, real_t = renoise(real_x0, None)
    if fake_x0 is not None:
        fake_x_t, fake_t = renoise(fake_x0, real_t if share_timesteps else None)
    return RenoisedInputs(real_x_t, real_t, fake_x_t, fake_t)


class MisalignedPairs(NamedTuple):
    """Real latents with a caption that is not theirs (extra fakes for the discriminator)."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor | None


def misaligned_pairs(
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
) -> MisalignedPairs:
    r"""
    Real latents paired with the captions rolled by one along the batch: sample `i` gets caption `i - 1`
    (`torch.roll(..., 1, dims=0)`). The discriminator should call these fake, so it must look at text alignment, not
    only at image realism. Concatenate them to the fake branch (`torch.cat([fake, pairs.latents])`, re-noised like any
    fake) rather than averaging their logits alone.

    Batch size 1: rolling is the identity, so every "misaligned" pair would be an aligned real pair labelled fake,
    fighting the real branch. There is no other caption in the batch, so an **empty** batch (size 0) is returned;
    concatenating it is a no-op and [`SanaDiscriminator`] maps it to empty logits. (Averaging empty logits alone
    would give NaN.) Pairs whose rolled caption equals their own (duplicate prompts in the batch; embeds and mask both
    identical) are dropped for the same reason; this makes the output size data dependent (one host sync).

    Args:
        latents (`torch.Tensor` of shape `(batch_size, C, H, W)`): Clean data latents `x0`.
        encoder_hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, caption_channels)`).
        encoder_attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*).

    Returns:
        [`MisalignedPairs`] `(latents, encoder_hidden_states, encoder_attention_mask)` with batch size `M`,
        `0 <= M <= batch_size` (`M = 0` at batch size 1).
    """
    batch_size = latents.shape[0]
    if encoder_hidden_states.shape[0] != batch_size or (
        encoder_attention_mask is not None and encoder_attention_mask.shape[0] != batch_size
    ):
        raise ValueError("`latents`, `encoder_hidden_states` and `encoder_attention_mask` need the same batch size.")
    if batch_size <= 1:
        mask = None if encoder_attention_mask is None else encoder_attention_mask[:0]
        return MisalignedPairs(latents[:0], encoder_hidden_states[:0], mask)

    rolled_states = torch.roll(encoder_hidden_states, shifts=1, dims=0)
    rolled_mask = None if encoder_attention_mask is None else torch.roll(encoder_attention_mask, shifts=1, dims=0)
    same = (rolled_states == encoder_hidden_states).flatten(1).all(dim=1)
    if rolled_mask is not None:
        same = same & (rolled_mask == encoder_attention_mask).flatten(1).all(dim=1)
    keep = ~same
    return MisalignedPairs(latents[keep], rolled_states[keep], None if rolled_mask is None else rolled_mask[keep])


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`0.5 (mean relu(1 - real) + mean relu(1 + fake))`; logits of any shape (e.g. `(B, tokens)`)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """`-mean fake`."""
    return -fake_logits.mean()


def bce_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`mean softplus(-real) + mean softplus(fake)` = BCE(real, 1) + BCE(fake, 0) (official, no 0.5 factor)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def bce_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating `mean softplus(-fake)` = BCE(fake, 1)."""
    return F.softplus(-fake_logits).mean()


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in ADVERSARIAL_LOSS_TYPES:
        raise ValueError(f"Unknown adversarial `loss_type` {loss_type!r}; expected one of {ADVERSARIAL_LOSS_TYPES}.")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, loss_type: str = "hinge") -> torch.Tensor:
    """The discriminator loss named by `loss_type` (`"hinge"` or `"bce"`)."""
    _check_loss_type(loss_type)
    if loss_type == "hinge":
        return hinge_discriminator_loss(real_logits, fake_logits)
    return bce_discriminator_loss(real_logits, fake_logits)


def generator_adversarial_loss(fake_logits: torch.Tensor, loss_type: str = "hinge") -> torch.Tensor:
    """The generator's adversarial loss named by `loss_type` (`"hinge"` or `"bce"`)."""
    _check_loss_type(loss_type)
    if loss_type == "hinge":
        return hinge_generator_loss(fake_logits)
    return bce_generator_loss(fake_logits)


def r1_penalty(
    discriminator: SanaDiscriminator,
    real_inputs: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    guidance_scale: torch.Tensor | float | None = None,
    controlnet_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    R1 gradient penalty at real samples w.r.t. each head's input features (the official variant), differentiable
    w.r.t. the heads (`create_graph=True`); scale it yourself (`loss_D + gamma / 2 * r1`).

    `sum_heads E_b || d(sum_tokens D_h)_b / d features_h,b ||^2 / num_heads`; the teacher runs once without a graph.
    With local batch norm a sample's logits depend on its group mates, so the gradient of the summed logits (as in
    StyleGAN) also carries those cross terms.

    Args:
        discriminator ([`SanaDiscriminator`]).
        real_inputs (`torch.Tensor` of shape `(batch_size, C, H, W)`): Real `x_t / sigma_data`.
        t, encoder_hidden_states, encoder_attention_mask, guidance_scale, controlnet_cond: As for the discriminator.

    Returns:
        A scalar tensor.
    """
    with torch.no_grad():
        features = discriminator.extract_features(
            real_inputs, t, encoder_hidden_states, encoder_attention_mask, guidance_scale, controlnet_cond
        )
    with torch.enable_grad():
        features = [feature.detach().requires_grad_(True) for feature in features]
        logits = discriminator.forward_heads(features)
        gradients = torch.autograd.grad(logits.sum(), features, create_graph=True)
    penalty = sum(gradient.flatten(1).square().sum(dim=1) for gradient in gradients)
    return penalty.mean() / len(gradients)


__all__ = [
    "ADVERSARIAL_LOSS_TYPES",
    "DEFAULT_HEAD_BLOCK_IDS",
    "HEAD_BLOCK_LAYOUTS",
    "DISCRIMINATOR_P_MEAN",
    "DISCRIMINATOR_P_STD",
    "BatchNormLocal",
    "DiscriminatorHead",
    "MisalignedPairs",
    "RenoisedInputs",
    "SanaDiscriminator",
    "bce_discriminator_loss",
    "bce_generator_loss",
    "default_head_block_ids",
    "discriminator_loss",
    "generator_adversarial_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "interleave_order",
    "misaligned_pairs",
    "r1_penalty",
    "renoise_for_discriminator",
]
