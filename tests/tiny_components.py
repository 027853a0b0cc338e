"""Tiny, offline components for tests: a word-level Gemma tokenizer, Gemma2 encoder, DC-AE and Sana transformers.

Nothing here touches the network; every weight is drawn from a seeded generator.
"""

import math

import torch
from diffusers import AutoencoderDC, SanaControlNetModel, SanaTransformer2DModel
from diffusers.models.embeddings import Timesteps
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer


WORDS = (
    "a an the of on in with and red green blue yellow black white small big cat dog car tree house apple "
    "emoji icon photo drawing smiling face heart star moon sun flower bird fish boat"
).split()
TEXT_HIDDEN = 16
TEXT_VOCAB = 256
TRANSFORMER_DIM = 16  # heads x head_dim


def make_tokenizer() -> GemmaTokenizerFast:
    """A BPE tokenizer trained on `WORDS`, in Gemma's layout so `save_pretrained`/`from_pretrained` round-trip."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tokenizer = train_gemma_layout_tokenizer(texts, vocab_size=TEXT_VOCAB - 8)
    assert len(tokenizer) <= TEXT_VOCAB
    return tokenizer


def make_text_encoder(seed: int = 0) -> Gemma2Model:
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=TEXT_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def make_vae(seed: int = 0) -> AutoencoderDC:
    """DC-AE with spatial compression 2 and 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def transformer_config(student: bool = True, **overrides) -> dict:
    """Config of a 2-layer Sana transformer; `student=True` is the Sprint form (guidance embedder + QK-norm)."""
    config = dict(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=TRANSFORMER_DIM,
        caption_channels=TEXT_HIDDEN,
        sample_size=16,
        qk_norm="rms_norm_across_heads" if student else None,
        guidance_embeds=student,
    )
    config.update(overrides)
    return config


def make_diffusers_transformer(student: bool = True, seed: int = 0, **overrides) -> SanaTransformer2DModel:
    """A diffusers `SanaTransformer2DModel` with non-trivial weights (default init zeroes nothing that matters)."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**transformer_config(student, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def make_sprint_transformer(student: bool = True, seed: int = 0, logvar_head: bool = False):
    """Our `SanaSprintTransformer2DModel` with `make_diffusers_transformer(student, seed)`'s weights, in eval mode."""
    model = SanaSprintTransformer2DModel(**transformer_config(student=student), logvar_head=logvar_head)
    model.load_state_dict(make_diffusers_transformer(student=student, seed=seed).state_dict(), strict=not logvar_head)
    return model.eval()


def make_student(logvar_head: bool = True, seed: int = 0) -> SanaSprintTransformer2DModel:
    """Tiny Sprint student (guidance embedder, QK-norm) with non-trivial weights; its logvar head is perturbed too."""
    model = make_sprint_transformer(student=True, seed=seed, logvar_head=logvar_head)
    if logvar_head:
        with torch.no_grad():
            model.logvar_linear.weight.normal_(std=0.1)
            model.logvar_linear.bias.fill_(0.2)
    return model


def make_teacher(seed: int = 1, logvar_head: bool = False) -> SanaSprintTransformer2DModel:
    """Tiny flow-matching teacher (no guidance embedder) seen through TrigFlow; frozen."""
    return make_sprint_transformer(student=False, seed=seed, logvar_head=logvar_head).requires_grad_(False)


def scm_batch(batch_size: int = 2, seed: int = 0, dtype=torch.float32, sigma_data: float = 0.5):
    """`(x0, z, t, w)`: sigma_data-scaled latents and noise, t in radians inside (0, pi/2), w per sample."""
    generator = torch.Generator().manual_seed(seed)
    x0 = sigma_data * torch.randn(batch_size, 4, 16, 16, generator=generator, dtype=dtype)
    z = sigma_data * torch.randn(batch_size, 4, 16, 16, generator=generator, dtype=dtype)
    t = torch.linspace(0.3, 1.3, batch_size, dtype=dtype)
    w = torch.tensor([4.0, 5.0, 4.5, 4.0][:batch_size], dtype=dtype)
    return x0, z, t, w


def null_prompt(seq_len: int = 6):
    """`(embeds, mask)` of an empty prompt, batch 1: bos + eos, the rest padding."""
    embeds, mask = text_conditioning(batch_size=1, seq_len=seq_len, seed=7, padded=False)
    mask[0, 2:] = 0
    return embeds, mask


def float64_timestep_projection(module: Timesteps):
    """diffusers' sinusoidal time projection in float64 (diffusers computes it in fp32 even in a float64 model)."""

    def forward(timesteps):
        half = module.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - module.downscale_freq_shift)
        angles = timesteps.double()[:, None] * torch.exp(exponent)[None] * module.scale
        sin, cos = torch.sin(angles), torch.cos(angles)
        return torch.cat([cos, sin] if module.flip_sin_to_cos else [sin, cos], dim=-1)

    return forward


def text_conditioning(batch_size: int = 2, seq_len: int = 6, seed: int = 0, padded: bool = True):
    """Random `(embeds, mask)`; with `padded`, the first row masks its last half."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch_size, seq_len, TEXT_HIDDEN, generator=generator)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padded:
        mask[0, seq_len // 2 :] = 0
    return embeds, mask


def make_controlnet(seed: int = 0, num_layers: int = 1, **overrides) -> SanaControlNetModel:
    """A diffusers `SanaControlNetModel` sized for `transformer_config`, with its zero-initialised input and output
    projections perturbed (at init a ControlNet adds exactly nothing, which would make every test pass)."""
    config = {k: v for k, v in transformer_config(student=False).items() if k not in ("qk_norm", "guidance_embeds")}
    config.update(num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    model = SanaControlNetModel(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def save_tiny_teacher_pipeline(folder) -> None:
    """A tiny diffusers `SanaPipeline` flow teacher (8x8 latents) saved to `folder`, for the training-script tests."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    SanaPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=make_diffusers_transformer(student=False, sample_size=8),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    ).save_pretrained(folder)
