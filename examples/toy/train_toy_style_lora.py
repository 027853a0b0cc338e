#!/usr/bin/env python
"""A user's style fine-tune of the embedded toy teacher: a flow-matching LoRA on restyled emoji (docs/lora.md).

    python examples/toy/train_toy_style_lora.py --style grayscale --output_dir toy-style-lora

The stand-in for a DreamBooth / style LoRA that someone trains on a Sana model: the toy teacher
(`diffusers_sprint.toy.TOY_TEACHER_PATH`, frozen) gets a PEFT LoRA on its attention projections, trained with the
teacher's own rectified-flow loss and schedule (`train_toy_teacher.train_transformer`: `x_s = (1 - s) x0 + s z`,
target `z - x0`, captions dropped 10% of the time, EMA) on the **tuning split** of the emoji dataset restyled with
`--style` (`load_emoji_dataset(style=...)`; the held-out split's 604 emoji stay unseen, for evaluation). Saved in
diffusers' LoRA format, so it loads with

    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.load_lora_weights("toy-style-lora", adapter_name="style")

Images: Twemoji by Twitter, Inc. and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import json
import os
import time

import torch
import toy_common as common  # examples/toy/toy_common.py, beside this script
from diffusers import SanaPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from train_toy_teacher import train_transformer

from diffusers_sprint.toy import STYLES, TOY_TEACHER_PATH, load_emoji_dataset
from diffusers_sprint.toy.classifier import images_to_tensor
from diffusers_sprint.toy.protocol import split_rows
from diffusers_sprint.training.lora import DEFAULT_LORA_TARGET_MODULES


def parse_args(argv=None):
    p = common.training_parser(__doc__, steps=1000, batch_size=32, lr=1e-3)
    common.add_flow_training_arguments(p, ema_decay=0.99)
    p.add_argument("--style", default="grayscale", choices=STYLES)
    p.add_argument("--teacher", default=TOY_TEACHER_PATH, help="the SanaPipeline folder to fine-tune")
    p.add_argument("--output_dir", default="toy-style-lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--target_modules", nargs="+", default=list(DEFAULT_LORA_TARGET_MODULES))
    p.add_argument("--limit", type=int, default=None, help="(tests) use the first N dataset rows only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_up(args)
    start = time.time()
    pipe = SanaPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.requires_grad_(False)
    args.timestep_scale = transformer.config.timestep_scale  # what SanaPipeline multiplies 1000 s by

    dataset = load_emoji_dataset(style=args.style, limit=args.limit)
    rows = split_rows("tuning", dataset.num_rows, None if args.limit else 1024)
    subset = dataset.select(rows)
    captions = list(subset["caption"])
    with torch.no_grad():
        images = images_to_tensor(subset["image"])
        latents = torch.cat([pipe.vae.encode(images[i : i + 256]).latent for i in range(0, len(images), 256)])
    latents = latents * pipe.vae.config.scaling_factor
    max_length = max(len(ids) for ids in pipe.tokenizer(captions).input_ids)
    embeds, masks = common.encode_captions(pipe, captions, max_length)
    null_embed, null_mask = common.encode_captions(pipe, [""], max_length)

    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=args.target_modules))
    train_transformer(transformer, latents, embeds, masks, null_embed[0], null_mask[0], args, print)
    SanaPipeline.save_lora_weights(args.output_dir, transformer_lora_layers=get_peft_model_state_dict(transformer))
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as handle:
        info = {
            "script": "examples/toy/train_toy_style_lora.py",
            "args": vars(args),
            "train_rows": len(rows),
            "seconds": round(time.time() - start),
            "torch_threads": torch.get_num_threads(),
        }
        json.dump(info, handle, indent=2)
    print(f"saved {args.output_dir} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
