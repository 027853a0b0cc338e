"""The release recipes of examples/configs/ parse through the script and hold the official numbers.

Each recipe is a settings file (`<name>.yaml`, read by the script as `--config`) whose header names its launch command,
`examples/configs/launch.sh <name> <ddp|fsdp2>` (the one `accelerate launch` command, with that accelerate config).
The official values come from NVlabs/Sana
`configs/sana_sprint_config/1024ms/SanaSprint_{600M,1600M}_1024px_allqknorm_bf16_scm_ladd*.yaml` and
`train_scripts/train_scm_ladd.py` (docs/training.md, "Release recipes").
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from diffusers_sprint.training.recipe import DISTILLATION, parse_recipe


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"


# recipe -> released transformer config (benchmarks/sana_configs.py) and the values that differ between recipes
RECIPES = {
    "sana_sprint_0.6b_1024px": dict(model="0.6B", accelerate_config="ddp.yaml", fsdp=False),
    "sana_sprint_1.6b_1024px": dict(model="1.6B", accelerate_config="ddp.yaml", fsdp=False),
    "sana_1.5_4.8b_1024px_fsdp2": dict(model="4.8B", accelerate_config="fsdp2.yaml", fsdp=True),
}
# The official recipe (the yaml's train/model/scheduler sections; see the module docstring).
OFFICIAL = dict(
    resolution=1024,  # image_size
    multi_scale=True,  # multi_scale, aspect_ratio_type ASPECT_RATIO_1024
    max_sequence_length=300,  # model_max_length
    complex_human_instruction=True,  # chi_prompt
    max_train_steps=20000,  # the paper's 20k iterations
    optimizer="came",  # CAMEWrapper
    learning_rate=2e-6,
    adam_beta1=0.9,
    adam_beta2=0.999,
    came_beta3=0.9999,
    adam_weight_decay=0.0,
    lr_scheduler="constant_with_warmup",  # lr_schedule constant, num_warmup_steps 5000
    lr_warmup_steps=5000,
    discriminator_learning_rate=None,  # optimizer_D built from the generator's optimizer config: lr 2e-6
    discriminator_lr_schedule="constant",  # no scheduler for optimizer_D
    max_grad_norm=0.1,  # gradient_clip
    mixed_precision="bf16",
    fp32_linear_attention=True,  # fp32_attention
    teacher_fp32=True,  # the teacher is accelerator.prepare'd in fp32
    gradient_checkpointing=True,  # grad_checkpointing
    p_mean=0.2,  # logit_mean
    p_std=1.6,  # logit_std
    guidance_scales=[4.0, 4.5, 5.0],  # scm_cfg_scale
    guidance_embeds=True,  # cfg_embed
    guidance_embeds_scale=0.1,  # cfg_embed_scale
    null_branch_mask="conditional",  # cfg_y_mask = cat([y_mask, y_mask])
    tangent_warmup_steps=2000,  # 4000 steps of a loop that counts G and D phases
    tangent_norm="l2",  # vector_norm over (1, 2, 3)
    tangent_norm_eps=0.1,
    adaptive_weight=True,  # logvar
    scm_lambda=1.0,
    head_block_ids=[2, 8, 14, 19],
    adversarial_loss="hinge",
    adversarial_lambda=0.5,  # adv_lambda
    discriminator_p_mean=-0.6,  # logit_mean_discriminator
    discriminator_p_std=1.0,  # logit_std_discriminator
    max_time_probability=0.5,  # largest_timestep_prob (largest_timestep 1.5708)
    misaligned_pairs=True,  # misaligned_pairs_D
    fake_from_scm_forward=False,  # train_largest_timestep: fresh t and noise for the fake
    seed=42,
)
GLOBAL_BATCH = 512


def _script(load_module):
    return load_module("examples/train_sana_sprint.py", name="train_sana_sprint_for_recipes")


@pytest.fixture(scope="module")
def sana_configs(load_module):
    return load_module("benchmarks/sana_configs.py")


@pytest.fixture(scope="module")
def script(load_module):
    return _script(load_module)


@pytest.fixture
def came_importable(monkeypatch):
    """`--optimizer came` checks that `came_pytorch` is installed; the recipes are checked without it."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "came_pytorch" else find_spec(name, *a)
    )


def _launch(recipe: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The accelerate config and the script arguments of the `accelerate launch` command that the launch line in
    `<recipe>.args` runs: `launch.sh` is run with a stand-in `accelerate` that records its arguments."""
    header = re.search(r"^# Launch: (.*)$", (CONFIGS / f"{recipe}.yaml").read_text(), flags=re.MULTILINE)
    words = shlex.split(header.group(1))
    command = words[words.index("bash") :]
    assert command[:3] == ["bash", "examples/configs/launch.sh", recipe]
    record = tmp_path / "accelerate_argv"
    stand_in = tmp_path / "bin" / "accelerate"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(TEACHER="teacher", DATASET="data", OUTPUT_DIR="out")
    subprocess.run([*command, "--validation_prompts", "a red fox in the snow"], cwd=REPO, env=env, check=True)
    argv = record.read_text().split("\0")[:-1]
    assert argv[:2] == ["launch", "--config_file"]
    script = argv.index("examples/train_sana_sprint.py")
    return REPO / argv[2], argv[script + 1 :]


def test_every_shipped_recipe_is_tested():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(RECIPES)
    assert [path.name for path in CONFIGS.glob("*.sh")] == ["launch.sh"]


@pytest.mark.parametrize(
    "words, message",
    [
        (["no_such_recipe", "ddp"], "no recipe examples/configs/no_such_recipe.yaml"),
        (["sana_sprint_1.6b_1024px", "deepspeed"], "no accelerate config examples/accelerate_configs/deepspeed.yaml"),
    ],
)
def test_launcher_refuses_an_unknown_recipe_or_config(words, message):
    env = {**os.environ, "TEACHER": "teacher", "DATASET": "data"}
    ran = subprocess.run(
        ["bash", "examples/configs/launch.sh", *words], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert ran.returncode == 2 and message in ran.stderr, ran.stderr


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_parses_and_holds_the_official_values(script, came_importable, recipe, tmp_path, sana_configs):
    expected = RECIPES[recipe]
    config_path, arguments = _launch(recipe, tmp_path)
    assert config_path.name == expected["accelerate_config"]
    assert arguments[:2] == ["--config", f"examples/configs/{recipe}.yaml"]
    accelerate_config = yaml.safe_load(config_path.read_text())

    # The launcher's arguments (flags after the file, as a user gives them; the script runs from the repository root).
    args = parse_recipe(DISTILLATION, ["--config", str(REPO / arguments[1]), *arguments[2:]])  # every check runs

    wrong = {name: getattr(args, name) for name, value in OFFICIAL.items() if getattr(args, name) != value}
    assert wrong == {}, f"{recipe} differs from the official recipe: {wrong}"
    assert args.fsdp == expected["fsdp"]
    assert (args.pretrained_teacher_model_name_or_path, args.dataset_name) == ("teacher", "data")
    assert args.output_dir == "out"
    assert args.validation_prompts == ["a red fox in the snow"]  # a flag after the recipe reaches the script whole
    processes = accelerate_config["num_processes"]
    assert args.train_batch_size * args.gradient_accumulation_steps * processes == GLOBAL_BATCH
    assert accelerate_config["mixed_precision"] == "bf16"
    if expected["fsdp"]:
        assert (
            accelerate_config["distributed_type"] == "FSDP" and accelerate_config["fsdp_config"]["fsdp_version"] == 2
        )
    else:
        assert accelerate_config["distributed_type"] == "MULTI_GPU"

    # The heads sit on existing blocks of the released model; the official ids for the 0.6B and 1.6B.
    layers = sana_configs.transformer_config(expected["model"])["num_layers"]
    assert {"0.6B": 28, "1.6B": 20, "4.8B": 60}[expected["model"]] == layers
    assert max(args.head_block_ids) < layers
    assert script.head_block_ids(args, _Depth(layers)) == [2, 8, 14, 19]


class _Depth:
    def __init__(self, layers: int):
        self.transformer_blocks = [None] * layers


@pytest.mark.parametrize("where", ["before", "after"])
def test_recipe_flags_on_the_command_line_win(came_importable, where):
    config = ["--config", str(CONFIGS / "sana_sprint_1.6b_1024px.yaml")]
    flags = ["--pretrained_teacher_model_name_or_path", "t", "--dataset_name", "d", "--learning_rate", "1e-5"]
    flags += ["--head_block_ids", "3", "11"]
    args = parse_recipe(DISTILLATION, config + flags if where == "after" else flags + config)
    assert args.learning_rate == 1e-5 and args.head_block_ids == [3, 11] and args.optimizer == "came"


def test_flag_files_still_work(came_importable, tmp_path):
    """`@file`: flags one or more per line, shell quoting, `#` comments; later flags win; `--config` inside one."""
    flags = tmp_path / "run.args"
    flags.write_text(
        f"# my run\n--config {CONFIGS / 'sana_sprint_0.6b_1024px.yaml'}\n--learning_rate 3e-6  # lower\n"
        "--validation_prompts 'a red fox' \"a blue car\"\n"
    )
    args = parse_recipe(
        DISTILLATION, [f"@{flags}", "--pretrained_teacher_model_name_or_path", "t", "--dataset_name", "d"]
    )
    assert args.learning_rate == 3e-6 and args.validation_prompts == ["a red fox", "a blue car"]
    assert args.optimizer == "came" and args.fake_from_scm_forward is False


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rate: 1e-5\nlearning_rat: 2\n", "unknown settings learning_rat"),
        ("- learning_rate\n", "must hold a mapping"),
        ("learning_rate: [1e-5\n", "cannot be read"),
        ("optimizer: sgd\n", "invalid choice: 'sgd'"),
        ("max_grad_norm: 0\n", "--max_grad_norm must be > 0"),
    ],
)
def test_bad_recipe_files_are_refused_naming_the_file_or_setting(tmp_path, capsys, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(content)
    argv = ["--config", str(path), "--pretrained_teacher_model_name_or_path", "t", "--dataset_name", "d"]
    with pytest.raises((ValueError, SystemExit)) as error:
        parse_recipe(DISTILLATION, argv)
    text = str(error.value) + capsys.readouterr().err
    assert message in text, text
    if "unknown" in message or "mapping" in message or "read" in message:
        assert str(path) in text


def test_a_json_recipe_reads_like_a_yaml_one(came_importable, tmp_path):
    """`--config x.json`: the same settings as the YAML recipe; `null` keeps a default that is unset."""
    values = yaml.safe_load((CONFIGS / "sana_sprint_0.6b_1024px.yaml").read_text())
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**values, "discriminator_learning_rate": None}))
    base = ["--pretrained_teacher_model_name_or_path", "t", "--dataset_name", "d"]
    from_json = parse_recipe(DISTILLATION, ["--config", str(path), *base])
    from_yaml = parse_recipe(DISTILLATION, ["--config", str(CONFIGS / "sana_sprint_0.6b_1024px.yaml"), *base])
    assert vars(from_json) == {**vars(from_yaml), "config": str(path)}
    assert from_json.discriminator_learning_rate is None and from_json.head_block_ids == [2, 8, 14, 19]
