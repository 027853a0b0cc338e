"""The released Sana / Sana-Sprint transformer and DC-AE configs, written down so that no download is needed.

Shared by `memory_model.py` and `gpu_check.py` (and their tests). Keys are diffusers' `config.json` keys without
the `_class_name` / `_diffusers_version` bookkeeping; every config builds with
`SanaSprintTransformer2DModel(**config)` (or diffusers' `SanaTransformer2DModel(**config)`) and `AutoencoderDC`.

Where each one comes from (read in stored copies of the public files; no Hub access from this machine):

- `sana-sprint-0.6b`: `Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers`, `transformer/config.json`.
  The official file itself was not in the stored copies; it was read from a third-party re-upload of the pipeline
  (`deAPI-ai/sanasprint06b1024`, `transformer/config.json`, `_diffusers_version` 0.33.0.dev0), and every width in
  it agrees with diffusers' `scripts/convert_sana_to_diffusers.py` (`SanaSprint_600M_P1_D28`: 36 x 32 heads,
  16 x 72 cross heads, 28 layers; `qk_norm="rms_norm_across_heads"`, `guidance_embeds=True` for Sprint models).
- `sana-sprint-1.6b`: `Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers`. **Not read directly**: the widths
  and depth are those of diffusers' conversion scripts (`SanaSprint_1600M_P1_D20`: 70 x 32 heads, 20 x 112 cross
  heads, cross_attention_dim 2240, 20 layers), which are also those of the official
  `Efficient-Large-Model/Sana_1600M_1024px_MultiLing_diffusers/transformer/config.json` (read); the Sprint-only keys
  (`qk_norm`, `guidance_embeds`, `guidance_embeds_scale`, `timestep_scale`) are copied from the 0.6B Sprint file.
- `sana-1.5-4.8b`: `Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers`. **Not read directly**: diffusers'
  `scripts/convert_sana_to_diffusers.py` (`SanaMS1.5_4800M_P1_D60`: 70 x 32 heads, 20 x 112 cross heads, 2240,
  60 layers; QK-norm for the SANA-1.5 models) and NVlabs/Sana's `SanaMS_4800M_P1_D60` (depth 60, hidden 2240);
  a flow-matching model, so no guidance embedder. The keys the script takes as fixed for every Sana
  (`mlp_ratio` 2.5, `caption_channels` 2304, patch size 1, 32 latent channels) are assumed; a different
  `mlp_ratio` in the released file would change the count (QK-norm is only 4 x 2240 weights per block, 0.5 M).
- `DC_AE_F32C32`: `mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`, as stored in the official
  `Efficient-Large-Model/Sana_600M_1024px_diffusers/vae/config.json` (`_name_or_path` says so; read). That file
  predates diffusers' `encoder_out_shortcut` / `decoder_in_shortcut` / `decoder_conv_act_fn` keys; their diffusers
  defaults (`True`, `True`, `"relu"`) are written out here, as a later re-save of the same VAE shows them.

- Sprint teachers (`SPRINT_TEACHER_REPOS`): `Efficient-Large-Model/Sana_Sprint_0.6B_1024px_teacher_diffusers` and
  `Efficient-Large-Model/SANA_Sprint_1.6B_1024px_teacher_diffusers`, the starting point of diffusers' research script
  `examples/research_projects/sana/train_sana_sprint_diffusers.py`. **Not read directly** (no stored copy of either
  `config.json`); each key follows from diffusers' own code: the widths of the Sprint model of the same size (the
  script distils the teacher into `guidance_embeds=True` of the same shapes); no guidance embedder (the script loads
  the teacher a second time with `guidance_embeds=False` and copies its `time_embed.emb.timestep_embedder.*`
  weights to the student's `time_embed.timestep_embedder.*`, the keys of a model without one); QK-norm
  `rms_norm_across_heads` (paper section 3.2; `norm_q`/`norm_k` weights in the conversion script); dense time:
  the script's `SanaTrigFlow` feeds the flow time `s in [0, 1]` itself to `SanaTransformer2DModel.forward`, and
  diffusers PR #11150 ("add a timestep scale for sana-sprint teacher model") added `timestep_scale` so that
  `SanaPipeline`, which feeds `1000 s`, rescales "[1~1000] to [0~1]" for this teacher: `timestep_scale=0.001`.

Sprint teachers are the flow-matching Sana with dense time and QK-norm (no guidance embedder); the student adds
the guidance embedder (and, in this package, the `logvar_head`): [`teacher_config`] / [`student_config`].
`sprint_teacher_config("0.6B")` is the released teacher, `tiny_config(config)` its tiny-width test stand-in.
"""

import copy


# The fields every 1024 px Sana transformer shares (32-channel DC-AE latents, 32 x 32 tokens, Gemma-2 2B captions).
_COMMON_1024PX = dict(
    in_channels=32,
    out_channels=32,
    caption_channels=2304,
    mlp_ratio=2.5,
    dropout=0.0,
    attention_bias=False,
    sample_size=32,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,
    qk_norm="rms_norm_across_heads",
    guidance_embeds_scale=0.1,
    timestep_scale=1.0,
)

TRANSFORMER_CONFIGS: dict[str, dict] = {
    "sana-sprint-0.6b": dict(
        _COMMON_1024PX,
        num_attention_heads=36,
        attention_head_dim=32,
        num_layers=28,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
        cross_attention_dim=1152,
        guidance_embeds=True,
    ),
    "sana-sprint-1.6b": dict(
        _COMMON_1024PX,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=20,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        guidance_embeds=True,
    ),
    "sana-1.5-4.8b": dict(
        _COMMON_1024PX,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=60,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        guidance_embeds=False,
    ),
}

# Where each config was read (see the module docstring for what could not be verified).
CONFIG_SOURCES: dict[str, str] = {
    "sana-sprint-0.6b": "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers transformer/config.json (read "
    "in a third-party re-upload); widths match diffusers' convert_sana_to_diffusers.py",
    "sana-sprint-1.6b": "widths from diffusers' convert_sana(_sprint)_to_diffusers.py and the official "
    "Sana_1600M_1024px_MultiLing_diffusers config; Sprint keys from the 0.6B Sprint config (file not read)",
    "sana-1.5-4.8b": "diffusers' convert_sana_to_diffusers.py (SanaMS1.5_4800M_P1_D60) and NVlabs/Sana "
    "SanaMS_4800M_P1_D60 (file not read)",
    "dc-ae-f32c32": "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers as stored in "
    "Efficient-Large-Model/Sana_600M_1024px_diffusers vae/config.json (read)",
}

# The released Sprint teachers (diffusers format) of each Sprint config; see the module docstring.
SPRINT_TEACHER_REPOS: dict[str, str] = {
    "sana-sprint-0.6b": "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_teacher_diffusers",
    "sana-sprint-1.6b": "Efficient-Large-Model/SANA_Sprint_1.6B_1024px_teacher_diffusers",
}
# diffusers' `timestep_scale` of a dense-time teacher: `SanaPipeline` feeds `1000 s * timestep_scale = s`.
DENSE_TIME_TIMESTEP_SCALE = 0.001

# Short names used on the command line.
MODEL_ALIASES: dict[str, str] = {"0.6B": "sana-sprint-0.6b", "1.6B": "sana-sprint-1.6b", "4.8B": "sana-1.5-4.8b"}

DC_AE_F32C32: dict = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    encoder_out_shortcut=True,
    decoder_in_shortcut=True,
    decoder_conv_act_fn="relu",
    scaling_factor=0.41407,
)

# Tiny stand-ins with the same structure, for `--smoke` runs and tests (seconds on a CPU).
TINY_TRANSFORMER: dict = dict(
    _COMMON_1024PX,
    in_channels=4,
    out_channels=4,
    caption_channels=16,
    sample_size=16,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    guidance_embeds=True,
)
TINY_DC_AE: dict = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=2,
    encoder_block_types=["ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 8],
    decoder_block_out_channels=[8, 8],
    encoder_layers_per_block=[1, 1],
    decoder_layers_per_block=[1, 1],
    encoder_qkv_multiscales=[[], [5]],
    decoder_qkv_multiscales=[[], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)


def resolve_model_name(name: str) -> str:
    """`"0.6B"`/`"1.6B"`/`"4.8B"` or a full key of `TRANSFORMER_CONFIGS` -> the full key."""
    key = MODEL_ALIASES.get(name, name)
    if key not in TRANSFORMER_CONFIGS:
        allowed = sorted(MODEL_ALIASES) + sorted(TRANSFORMER_CONFIGS)
        raise ValueError(f"Unknown model {name!r}; allowed: {', '.join(allowed)}.")
    return key


def transformer_config(name: str) -> dict:
    """A copy of the released transformer config `name` (alias or full key)."""
    return copy.deepcopy(TRANSFORMER_CONFIGS[resolve_model_name(name)])


def teacher_config(config: dict) -> dict:
    """
    The Sprint teacher of a config, as released: no guidance embedder (it is guided by CFG outside the model) and
    dense time in diffusers' convention (`timestep_scale=0.001`, so the time embedding sees `s in [0, 1]`).
    """
    return dict(copy.deepcopy(config), guidance_embeds=False, timestep_scale=DENSE_TIME_TIMESTEP_SCALE)


def sprint_teacher_config(name: str) -> dict:
    """The config of the released Sprint teacher `SPRINT_TEACHER_REPOS[name]` (alias or full key of a Sprint model)."""
    key = resolve_model_name(name)
    if key not in SPRINT_TEACHER_REPOS:
        raise ValueError(
            f"No released Sprint teacher for {name!r}; allowed: {', '.join(sorted(SPRINT_TEACHER_REPOS))}."
        )
    return teacher_config(TRANSFORMER_CONFIGS[key])


# The keys `tiny_config` shrinks: widths, depth and latent size. Every other key (QK-norm, guidance embedder, time
# convention, norms, patch size, positional embedding) is a structural switch and stays as released.
WIDTH_KEYS = (
    "in_channels",
    "out_channels",
    "caption_channels",
    "sample_size",
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "cross_attention_dim",
)


def tiny_config(config: dict) -> dict:
    """`config` with `TINY_TRANSFORMER`'s widths and depth (seconds on a CPU), every structural switch kept."""
    return dict(copy.deepcopy(config), **{key: TINY_TRANSFORMER[key] for key in WIDTH_KEYS})


def student_config(config: dict, logvar_head: bool = True) -> dict:
    """The SANA-Sprint student of a config: guidance embedder plus (in this package) the adaptive-weight head."""
    return dict(copy.deepcopy(config), guidance_embeds=True, logvar_head=logvar_head)
