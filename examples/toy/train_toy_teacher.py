#!/usr/bin/env python
"""Train the embedded toy teacher from scratch: a tiny Sana text-to-image pipeline on 32x32 Twemoji.

    python examples/toy/train_toy_teacher.py --output_dir src/diffusers_sprint/toy/toy_teacher

What it builds (all diffusers / transformers classes, saved as a `diffusers.SanaPipeline`):
  * tokenizer     BPE trained on the 1,628 captions, in Gemma's layout (`GemmaTokenizerFast`, `<bos>` prepended).
  * text_encoder  `Gemma2Model`, 2 layers, hidden 64, random init and frozen. Its (causal) hidden states keep each
                  token's identity, which is all the transformer's cross-attention needs to tell captions apart;
                  freezing it lets us encode every caption once and gives the distillation the same fixed encoder.
  * vae           `AutoencoderDC`, spatial compression 8, 32 latent channels (32x32x3 -> 4x4x32), ResBlocks only,
                  trained here as a plain autoencoder (L1 + MSE, with latent-noise augmentation so the decoder is
                  forgiving of imperfect diffusion samples). scaling_factor = 1 / std of the data latents.
  * transformer   `SanaTransformer2DModel` (linear self-attention, Mix-FFN, cross-attention), trained with rectified
                  flow: x_s = (1 - s) x0 + s z, target v = z - x0, timestep s (dense time:
                  timestep_scale 0.001 x 1000 s, the convention of SANA-Sprint teachers, under which sCM distillation
                  is stable), s ~ U(0, 1), captions dropped
                  to the empty prompt 10% of the time (classifier-free guidance). No guidance embedding, no QK-norm:
                  a standard flow-matching teacher. 24,000 steps at batch 64 (~75 min on one core). The EMA weights
                  are saved.
  * scheduler     `FlowMatchEulerDiscreteScheduler` (shift 1).

Sample with `SanaPipeline.from_pretrained(path)(prompt, height=32, width=32, num_inference_steps=20,
guidance_scale=4.5, use_resolution_binning=False, complex_human_instruction=None)`.

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F
import toy_common as common  # examples/toy/toy_common.py, beside this script
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from diffusers.training_utils import EMAModel
from transformers import Gemma2Config, Gemma2Model

from diffusers_sprint.toy import load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer


GRID_PROMPTS = [
    "red apple",
    "grinning face",
    "heavy black heart",
    "blue heart",
    "green apple",
    "banana",
    "dog face",
    "cat face",
    "sun with face",
    "fire",
    "snowman",
    "pile of poo",
    "tangerine",
    "automobile",
    "rocket",
    "ghost",
]


def parse_args(argv=None):
    p = common.training_parser(__doc__, steps=24000, batch_size=64, lr=3e-3)  # the transformer's
    common.add_flow_training_arguments(p, ema_decay=0.999)
    p.add_argument("--output_dir", default="src/diffusers_sprint/toy/toy_teacher")
    p.add_argument("--grid_path", default="docs/images/toy_teacher_grid.png")
    p.add_argument("--resolution", type=int, default=32)
    # tokenizer / text encoder
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--text_hidden", type=int, default=64)
    p.add_argument("--text_layers", type=int, default=2)
    # vae
    p.add_argument("--vae_channels", type=int, nargs="+", default=[16, 16, 32, 64])
    p.add_argument("--vae_layers", type=int, nargs="+", default=[0, 1, 1, 1])
    p.add_argument("--latent_channels", type=int, default=32)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_latent_noise", type=float, default=0.1, help="max relative std of decoder input noise")
    # transformer
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument(
        "--timestep_scale",
        type=float,
        default=0.001,
        help="The network sees timestep 1000 s x this (diffusers' SanaTransformer2DModel config). 0.001: dense time "
        "s in [0, 1], as SANA-Sprint's teachers (sCM is unstable with 1000 s); 1.0: Sana's original convention.",
    )
    # evaluation
    p.add_argument("--guidance_scale", type=float, default=4.5)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--stop_after_vae", action="store_true", help="train and report the autoencoder only")
    p.add_argument(
        "--vae_weights", default=None, help="(experiments) load these autoencoder weights, skip its training"
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# components


def build_text_encoder(vocab_size: int, hidden: int, layers: int, embed_std: float = 0.5) -> Gemma2Model:
    """Random Gemma2; token embeddings drawn at `embed_std` (Gemma scales them by sqrt(hidden) -> RMS 4).

    With the default init (std 0.02 -> RMS 0.16) the RMS-normalised attention / MLP outputs (RMS 1 each, mostly a
    context average dominated by `<bos>`) swamp the token embeddings and different words get cosine ~0.5-0.85; at
    RMS 4 each hidden state is its own word plus a little context (different words: cosine ~0.1).
    """
    head_dim = 32
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    model = Gemma2Model(config)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, embed_std)
    return model.eval().requires_grad_(False)


def build_vae(channels, layers, latent_channels: int) -> AutoencoderDC:
    n = len(channels)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=tuple(channels),
        decoder_block_out_channels=tuple(channels),
        encoder_layers_per_block=tuple(layers),
        decoder_layers_per_block=tuple(layers),
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        scaling_factor=1.0,
    )


def build_transformer(args, latent_channels: int, latent_size: int) -> SanaTransformer2DModel:
    inner = args.heads * args.head_dim
    return SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_layers=args.layers,
        num_cross_attention_heads=args.heads,
        cross_attention_head_dim=args.head_dim,
        cross_attention_dim=inner,
        caption_channels=args.text_hidden,
        sample_size=latent_size,
        patch_size=1,
        qk_norm=None,
        guidance_embeds=False,
        timestep_scale=args.timestep_scale,
    )


# ----------------------------------------------------------------------------------------------------------------
# training


def train_vae(vae: AutoencoderDC, images: torch.Tensor, args, log) -> tuple[float, torch.Tensor]:
    """Plain autoencoder (DC-AE has no KL): L1 + MSE; decoder input noised by up to `vae_latent_noise` x std.

    Returns the reconstruction PSNR (dB) and the latents of all `images` (unscaled)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * common.lr_at(step, args.vae_steps, 50)
        idx = torch.randint(len(images), (args.vae_batch_size,), generator=generator)
        x = images[idx]
        z = vae.encode(x).latent
        noise_level = args.vae_latent_noise * torch.rand(len(x), 1, 1, 1, generator=generator)
        z = z + noise_level * z.detach().std() * torch.randn(z.shape, generator=generator)
        y = vae.decode(z).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f}s")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(latents[i : i + 256]).sample for i in range(0, len(images), 256)])
    mse = F.mse_loss(recon.clamp(-1, 1), images).item()
    psnr = 10 * math.log10(4.0 / mse)
    log(f"vae done in {time.time() - start:.0f}s: PSNR {psnr:.2f} dB, latent std {latents.std().item():.3f}")
    return psnr, latents


def train_transformer(transformer, latents, embeds, masks, null_embed, null_mask, args, log):
    """Rectified flow: x_s = (1 - s) x0 + s z, v = z - x0, timestep = 1000 s * timestep_scale (as SanaPipeline feeds
    it); captions -> empty prompt w.p. 10%. Returns the transformer holding its EMA weights (diffusers' `EMAModel`,
    decay min(ema_decay, (1 + step) / (10 + step)))."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = EMAModel(params, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    transformer.train()
    start, running = time.time(), None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * common.lr_at(step, args.steps, args.warmup_steps)
        _, x0, cond, mask, s, z, x_s = common.flow_matching_batch(
            latents, embeds, masks, null_embed, null_mask, args.batch_size, args.cfg_dropout, generator
        )
        timestep = 1000 * s * args.timestep_scale
        v = transformer(x_s, encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=timestep).sample
        loss = F.mse_loss(v, z - x0)
        common.optimizer_step(loss, optimizer, params, ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"transformer step {step:5d}  loss {running:.4f}  {time.time() - start:6.0f}s")
    log(f"transformer done in {time.time() - start:.0f}s")
    ema.copy_to(params)
    return transformer.eval()


# ----------------------------------------------------------------------------------------------------------------
# samples


@torch.no_grad()
def save_grid(pipe: SanaPipeline, names: list[str], path: str, args, seeds=(0, 1, 2, 3)):
    """One row per seed; the top row is the dataset image (ground truth) for each prompt."""
    from PIL import Image, ImageDraw

    dataset = load_emoji_dataset(resolution=args.resolution)
    by_name = {n: i for i, n in enumerate(dataset["name"])}
    r, scale = args.resolution, 3
    grid = Image.new("RGB", (len(names) * r, (len(seeds) + 1) * r), "white")
    for col, name in enumerate(names):
        grid.paste(dataset[by_name[name]]["image"], (col * r, 0))
    for row, seed in enumerate(seeds, start=1):
        images = pipe(
            [f"an emoji of {n}" for n in names],
            height=r,
            width=r,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=[torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(names))],
            use_resolution_binning=False,
            complex_human_instruction=None,
        ).images
        for col, image in enumerate(images):
            grid.paste(image, (col * r, row * r))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    ImageDraw.Draw(grid).line([(0, r * scale), (grid.width, r * scale)], fill=(128, 128, 128), width=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def main(argv=None):
    args = parse_args(argv)
    common.set_up(args)
    t0 = time.time()
    log_lines = []

    def log(message):
        print(message, flush=True)
        log_lines.append(message)

    dataset = load_emoji_dataset(resolution=args.resolution)
    captions = list(dataset["caption"])
    images = images_to_tensor(dataset["image"])
    log(f"dataset: {len(captions)} emoji at {args.resolution}px ({time.time() - t0:.0f}s)")

    tokenizer = train_gemma_layout_tokenizer(captions, args.vocab_size)
    text_encoder = build_text_encoder(len(tokenizer), args.text_hidden, args.text_layers)
    max_length = max(len(ids) for ids in tokenizer(captions).input_ids)
    log(f"tokenizer: {len(tokenizer)} tokens, longest caption {max_length} tokens")

    vae = build_vae(args.vae_channels, args.vae_layers, args.latent_channels)
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f}M params")
    t_vae = time.time()
    if args.vae_weights:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(args.vae_weights))
        vae.eval()
        args.vae_steps = 0
    psnr, latents = train_vae(vae, images, args, log)
    t_vae = time.time() - t_vae
    if args.stop_after_vae:
        return
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor

    latent_size = args.resolution // vae.spatial_compression_ratio
    transformer = build_transformer(args, args.latent_channels, latent_size)
    log(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.3f}M params, {latent_size}^2 tokens")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)

    embeds, masks = common.encode_captions(pipe, captions, max_length)
    null_embed, null_mask = common.encode_captions(pipe, [""], max_length)
    t_tr = time.time()
    train_transformer(transformer, latents, embeds, masks, null_embed[0], null_mask[0], args, log)
    t_tr = time.time() - t_tr

    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as handle:
        info = {
            "script": "examples/toy/train_toy_teacher.py",
            "args": vars(args),
            "dataset_size": len(captions),
            "vae_psnr_db": round(psnr, 2),
            "vae_seconds": round(t_vae),
            "transformer_seconds": round(t_tr),
            "total_seconds": round(time.time() - t0),
            "torch_threads": torch.get_num_threads(),
            "credits": "Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0",
        }
        json.dump(info, handle, indent=2)
    log(f"saved {args.output_dir}; total {time.time() - t0:.0f}s")
    if args.grid_path:
        reloaded = SanaPipeline.from_pretrained(args.output_dir)
        reloaded.set_progress_bar_config(disable=True)
        save_grid(reloaded, GRID_PROMPTS, args.grid_path, args)
        log(f"grid: {args.grid_path}")


if __name__ == "__main__":
    main()
