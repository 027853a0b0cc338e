"""The released SANA-Sprint teachers (`benchmarks/sana_configs.py`, `SPRINT_TEACHER_REPOS`) load as teachers.

Real sizes are built on the `meta` device (shapes and counts only); everything that runs uses `tiny_config`, the same
structural switches (QK-norm, no guidance embedder, `timestep_scale=0.001`) at tiny widths. The reference TrigFlow
forward is that of diffusers' research script (`examples/research_projects/sana/train_sana_sprint_diffusers.py`,
class `SanaTrigFlow`), written here from its formulas on diffusers' own `SanaTransformer2DModel`.
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from fixtures.parameter_counts import hand_count_transformer
from fixtures.script_runs import TEACHER_SCRIPT, base_args, read_log, run_script
from PIL import Image

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel
from diffusers_sprint.training.teacher import build_student, flow_time_scale_of, prepare_sprint_teacher


PARITY_ATOL = 1e-5
# The teacher keys diffusers' research script copies into its student (`param_mapping`): a model without a guidance
# embedder nests its time MLP under `time_embed.emb.`.
RESEARCH_SCRIPT_TIME_KEYS = [
    f"time_embed.emb.timestep_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
]
# Parameter counts of the released teachers (hand arithmetic of tests/fixtures/parameter_counts.py agrees, see below).
TEACHER_PARAMETERS = {"0.6B": 591_876_896, "1.6B": 1_604_641_952}


@pytest.fixture(scope="module")
def sana_configs(load_module):
    return load_module("benchmarks/sana_configs.py")


def _perturbed_stock_teacher(sana_configs, seed: int = 0) -> SanaTransformer2DModel:
    """diffusers' `SanaTransformer2DModel` in the tiny released-teacher config, every weight moved off its init."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**sana_configs.tiny_config(sana_configs.sprint_teacher_config("0.6B")))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def research_script_trigflow(model: SanaTransformer2DModel, x_scaled, t, embeds, mask) -> torch.Tensor:
    """`SanaTrigFlow.forward` (guidance=None) of diffusers' research script: TrigFlow -> flow -> TrigFlow."""
    t = t.expand(x_scaled.shape[0]).to(embeds.dtype)
    s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    s4 = s.view(-1, 1, 1, 1)
    norm = torch.sqrt(s4**2 + (1 - s4) ** 2)
    x_s = x_scaled * norm
    v = model(hidden_states=x_s, encoder_hidden_states=embeds, timestep=s, encoder_attention_mask=mask)[0]
    return ((1 - 2 * s4) * x_s + (1 - 2 * s4 + 2 * s4**2) * v) / norm


def _inputs(text_conditioning, batch_size: int = 3):
    generator = torch.Generator().manual_seed(1)
    x_scaled = torch.randn(batch_size, 4, 8, 8, generator=generator)
    t = torch.tensor([0.2, 0.9, 1.5])[:batch_size]
    embeds, mask = text_conditioning(batch_size=batch_size, seq_len=6)
    return x_scaled, t, embeds, mask


@pytest.fixture(scope="module")
def stock_teacher(sana_configs):
    return _perturbed_stock_teacher(sana_configs)


@pytest.fixture(scope="module")
def teacher_folder(stock_teacher, tmp_path_factory, make_text_encoder, make_tokenizer, make_vae):
    """A tiny pipeline folder laid out like the released teachers: a diffusers `SanaPipeline`, stock class names."""
    folder = tmp_path_factory.mktemp("released_teacher")
    SanaPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=stock_teacher,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["0.6B", "1.6B"])
def test_released_teacher_config_builds_at_full_size_on_meta(name, sana_configs):
    config = sana_configs.sprint_teacher_config(name)
    assert config["qk_norm"] == "rms_norm_across_heads" and not config["guidance_embeds"]
    assert config["timestep_scale"] == sana_configs.DENSE_TIME_TIMESTEP_SCALE
    with torch.device("meta"):
        ours = SanaSprintTransformer2DModel(**config)
        stock = SanaTransformer2DModel(**config)
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in stock.state_dict().items()}
    count = sum(parameter.numel() for parameter in ours.parameters())
    assert count == hand_count_transformer(config, guidance=False, logvar=False) == TEACHER_PARAMETERS[name]
    assert all(key in shapes for key in RESEARCH_SCRIPT_TIME_KEYS)
    assert not any("guidance_embedder" in key for key in shapes)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    cross = config["num_cross_attention_heads"] * config["cross_attention_head_dim"]
    assert shapes["transformer_blocks.0.attn1.norm_q.weight"] == (width,)
    assert shapes["transformer_blocks.0.attn2.norm_k.weight"] == (cross,)
    assert shapes["caption_projection.linear_1.weight"] == (width, 2304)
    assert ours.effective_flow_time_scale == 1.0  # dense time read from the config alone


def test_tiny_config_keeps_every_structural_switch(sana_configs):
    config = sana_configs.sprint_teacher_config("1.6B")
    tiny = sana_configs.tiny_config(config)
    changed = {key for key in config if tiny[key] != config[key]}
    assert changed <= set(sana_configs.WIDTH_KEYS)
    for key in ("qk_norm", "guidance_embeds", "timestep_scale", "interpolation_scale", "patch_size", "norm_eps"):
        assert tiny[key] == config[key]
    with pytest.raises(ValueError, match="No released Sprint teacher for '4.8B'; allowed: sana-sprint-0.6b, sana-spr"):
        sana_configs.sprint_teacher_config("4.8B")


def test_time_convention_is_dense_for_the_released_teacher(stock_teacher):
    """`SanaPipeline` feeds `1000 s * timestep_scale = s`; so do our time-scale readers, for both classes."""
    assert flow_time_scale_of(stock_teacher) == 1.0
    ours = SanaSprintTransformer2DModel.from_config(stock_teacher.config)
    assert ours.effective_flow_time_scale == 1.0
    # The old `teacher_config` (timestep_scale 1.0) is a `1000 s` flow-matching Sana.
    flow = dict(stock_teacher.config, timestep_scale=1.0)
    assert SanaSprintTransformer2DModel.from_config(flow).effective_flow_time_scale == 1000.0


def test_trigflow_forward_equals_the_research_script_on_the_same_weights(
    stock_teacher, teacher_folder, text_conditioning
):
    ours = SanaSprintTransformer2DModel.from_pretrained(teacher_folder, subfolder="transformer").eval()
    x_scaled, t, embeds, mask = _inputs(text_conditioning)
    with torch.no_grad():
        reference = research_script_trigflow(stock_teacher, x_scaled, t, embeds, mask)
        got = ours.trigflow_forward(x_scaled, t, embeds, mask).sample
        prepared = prepare_sprint_teacher(ours).trigflow_forward(x_scaled, t, embeds, mask).sample
        student = build_student(prepare_sprint_teacher(ours))
        student_out = student.trigflow_forward(x_scaled, t, embeds, mask, guidance_scale=4.5).sample
        # Reading the released teacher as a `1000 s` model (timestep_scale ignored) is far off.
        misread = SanaSprintTransformer2DModel.from_config(ours.config, flow_time_scale=1000.0).eval()
        misread.load_state_dict(ours.state_dict())
        wrong = misread.trigflow_forward(x_scaled, t, embeds, mask).sample
    assert (got - reference).abs().max().item() <= PARITY_ATOL
    # prepare_sana_sprint_teacher.py's conversion is the identity on it (QK-norm and dense time already there) ...
    assert (prepared - reference).abs().max().item() <= PARITY_ATOL
    # ... and the student starts at it (mirrored guidance init: exactly zero guidance embedding).
    assert (student_out - reference).abs().max().item() <= PARITY_ATOL
    assert (wrong - reference).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four captioned 16 px PNGs as an imagefolder."""
    root = tmp_path_factory.mktemp("images")
    rows = []
    for i in range(4):
        array = np.full((16, 16, 3), 60 * i, np.uint8)
        Image.fromarray(array).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {['red', 'blue', 'green', 'white'][i]} house"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _script_args(teacher_folder, images, output, **flags):
    assets = teacher_folder.parent / "assets"
    (assets / "teacher").mkdir(parents=True, exist_ok=True)
    args = base_args(assets, output, 1, resolution=16, **flags)
    args[args.index("--pretrained_teacher_model_name_or_path") + 1] = teacher_folder
    args[args.index("--train_data_dir") + 1] = images
    return args


@pytest.mark.slow
def test_both_scripts_take_the_released_teacher_unchanged(teacher_folder, images, tmp_path):
    # prepare_sana_sprint_teacher.py: one fine-tune step; the teacher keeps its QK-norm and dense time.
    args = _script_args(teacher_folder, images, tmp_path / "prepared")
    cut = args.index("--tangent_warmup_steps")  # a distillation flag
    run_script(tmp_path, args[:cut] + args[cut + 2 :], script=TEACHER_SCRIPT)
    assert math.isfinite(read_log(tmp_path / "prepared")[0]["finetune_loss"])
    prepared = SanaSprintTransformer2DModel.from_pretrained(tmp_path / "prepared", subfolder="transformer")
    assert prepared.config.qk_norm == "rms_norm_across_heads" and not prepared.config.guidance_embeds
    assert prepared.effective_flow_time_scale == 1.0 and math.isclose(prepared.config.timestep_scale, 1e-3)

    # train_sana_sprint.py straight from the released teacher: no time-scale warning, a dense-time student.
    result = run_script(tmp_path, _script_args(teacher_folder, images, tmp_path / "student"))
    assert "time scale" not in result.stderr, result.stderr[-2000:]
    row = read_log(tmp_path / "student")[0]
    assert math.isfinite(row["scm_loss"]) and math.isfinite(row["generator_loss"])
    pipe = SanaSprintPipeline.from_pretrained(tmp_path / "student")
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.effective_flow_time_scale == 1.0
