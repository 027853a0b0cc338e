"""examples/train_sana_sprint.py with --controlnet_model_name_or_path: ControlNet distillation end to end, offline.

Tiny flow teacher + tiny SanaControlNetModel, a `save_to_disk` dataset with an image, a caption and a control image
per row. Runs are subprocesses (helpers of tests/fixtures/script_runs.py).
"""

import json
import re

import numpy as np
import pytest
import torch
from fixtures.script_runs import _env, base_args, read_log, run_script
from PIL import Image
from safetensors.torch import load_file

from diffusers_sprint import SanaSprintControlNetPipeline
from diffusers_sprint.training.recipe import DISTILLATION, parse_recipe


pytestmark = pytest.mark.slow

COLORS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 220, 30)]
WORDS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def control_assets(tmp_path_factory, make_controlnet, save_tiny_teacher_pipeline):
    """Teacher pipeline, its ControlNet, a mismatched ControlNet and an 8-row dataset with control images."""
    import datasets

    root = tmp_path_factory.mktemp("controlnet_assets")
    save_tiny_teacher_pipeline(root / "teacher")
    make_controlnet(seed=1, num_layers=1, sample_size=8).save_pretrained(root / "controlnet")
    make_controlnet(seed=1, num_layers=1, sample_size=8, num_attention_heads=4).save_pretrained(root / "wide")
    images, controls, texts = [], [], []
    for i in range(8):
        array = np.full((16, 16, 3), 128, np.uint8)
        array[2 + i % 4 : 12 + i % 4, 3:13] = COLORS[i % 4]
        edges = np.zeros((16, 16, 3), np.uint8)
        edges[2 + i % 4, 3:13] = edges[11 + i % 4, 3:13] = 255
        images.append(Image.fromarray(array))
        controls.append(Image.fromarray(edges))
        texts.append(f"a {'small' if i % 2 else 'big'} {WORDS[i % 4]} house")
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "conditioning_image": datasets.Image()}
    )
    datasets.Dataset.from_dict(
        {"image": images, "text": texts, "conditioning_image": controls}, features=features
    ).save_to_disk(str(root / "dataset"))
    root.joinpath("hf_cache").mkdir()
    return root


def control_args(assets, output_dir, steps, **flags):
    args = base_args(assets, output_dir, steps, **flags)
    args[args.index("--train_data_dir") : args.index("--train_data_dir") + 2] = ["--dataset_name", assets / "dataset"]
    return args + ["--controlnet_model_name_or_path", assets / "controlnet"]


JOINT = dict(controlnet_training_mode="joint")


def test_joint_distillation_saves_a_controlnet_pipeline_and_resumes_exactly(control_assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(tmp_path, control_args(control_assets, straight, 3, random_flip=True, cache_latents=True, **JOINT))
    run_script(tmp_path, control_args(control_assets, resumed, 2, checkpointing_steps=2, random_flip=True,
                                      cache_latents=True, **JOINT))  # fmt: skip
    assert (resumed / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    run_script(tmp_path, control_args(control_assets, resumed, 3, checkpointing_steps=2, random_flip=True,
                                      cache_latents=True, resume_from_checkpoint="latest", **JOINT))  # fmt: skip
    assert read_log(resumed) == read_log(straight)
    for part in ("transformer", "controlnet"):
        final = load_file(resumed / part / "diffusion_pytorch_model.safetensors")
        for key, value in load_file(straight / part / "diffusion_pytorch_model.safetensors").items():
            assert torch.equal(final[key], value), (part, key)

    # the ControlNet moved away from the teacher's, and the output folder is a SanaSprintControlNetPipeline
    trained = load_file(straight / "controlnet" / "diffusion_pytorch_model.safetensors")
    initial = load_file(control_assets / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    assert json.loads((straight / "model_index.json").read_text())["_class_name"] == "SanaSprintControlNetPipeline"
    pipe = SanaSprintControlNetPipeline.from_pretrained(straight)
    control = Image.new("RGB", (16, 16))
    kwargs = dict(height=16, width=16, use_resolution_binning=False, complex_human_instruction=None, output_type="np")
    images = {}
    for scale in (1.0, 0.0):
        images[scale] = pipe(
            "a red house", control_image=control, controlnet_conditioning_scale=scale, num_inference_steps=1,
            generator=torch.Generator().manual_seed(0), **kwargs,
        ).images  # fmt: skip
    assert images[1.0].shape == (1, 16, 16, 3) and np.isfinite(images[1.0]).all()
    assert np.abs(images[1.0] - images[0.0]).max() > 1e-4  # the saved ControlNet acts


def test_controlnet_only_keeps_the_student_transformer_bitwise(control_assets, tmp_path):
    student = tmp_path / "student"
    run_script(tmp_path, control_args(control_assets, student, 1, **JOINT))
    distilled = tmp_path / "distilled"
    run_script(
        tmp_path,
        control_args(control_assets, distilled, 2, pretrained_student_model_name_or_path=student),
    )
    before = load_file(student / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(distilled / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {k for k in after if not torch.equal(after[k], before[k])} <= {k for k in after if "logvar" in k}
    controlnet_before = load_file(student / "controlnet" / "diffusion_pytorch_model.safetensors")
    controlnet_after = load_file(distilled / "controlnet" / "diffusion_pytorch_model.safetensors")
    # the student ControlNet starts from the teacher's (not from the student folder's) unless told otherwise
    initial = load_file(control_assets / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(controlnet_after[k], initial[k]) for k in initial)
    assert any(not torch.equal(controlnet_after[k], controlnet_before[k]) for k in initial)


def test_two_processes_match_one_process(control_assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, control_args(control_assets, one, 2, gradient_accumulation_steps=2, **JOINT))
    run_script(
        tmp_path,
        control_args(control_assets, two, 2, gradient_accumulation_steps=1, **JOINT),
        launcher="accelerate",
        num_processes=2,
        env=_env(tmp_path, ACCELERATE_USE_CPU="1"),
    )
    for row_one, row_two in zip(read_log(one), read_log(two), strict=True):
        for key in ("generator_loss", "scm_loss", "adversarial_loss", "discriminator_loss"):
            assert abs(row_one[key] - row_two[key]) <= 1e-5 * max(1.0, abs(row_one[key])), key
    for part in ("transformer", "controlnet"):
        a = load_file(one / part / "diffusion_pytorch_model.safetensors")
        b = load_file(two / part / "diffusion_pytorch_model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, part


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(conditioning_image_column="edges", **JOINT), r"`--conditioning_image_column` 'edges' is not a column"),
        (dict(controlnet_model_name_or_path="WIDE", **JOINT), r"`--controlnet_model_name_or_path` does not match"),
    ],
    ids=["missing_column", "mismatched_controlnet"],
)
def test_bad_inputs_fail_naming_the_argument(control_assets, tmp_path, flags, message):
    args = [str(a) for a in control_args(control_assets, tmp_path / "out", 1, **flags)]
    args = [str(control_assets / "wide") if a == "WIDE" else a for a in args]
    while args.count("--controlnet_model_name_or_path") > 1:  # the explicit flag wins over control_args' default
        index = len(args) - 1 - args[::-1].index("--controlnet_model_name_or_path")
        del args[index : index + 2]
    result = run_script(tmp_path, args, check=False)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]


def test_controlnet_flags_are_checked_before_loading():
    base = ["--pretrained_teacher_model_name_or_path", "x", "--dataset_name", "y"]
    for extra, message in (
        (["--controlnet_model_name_or_path", "c"], "pass --pretrained_student_model_name_or_path"),
        (["--controlnet_model_name_or_path", "c", "--controlnet_training_mode", "both"], None),
        (["--controlnet_model_name_or_path", "c", "--controlnet_training_mode", "joint", "--lora_rank", "4"], "lora"),
        (
            [
                "--controlnet_model_name_or_path",
                "c",
                "--controlnet_training_mode",
                "joint",
                "--validation_prompts",
                "a",
            ],
            "validation_prompts",
        ),  # fmt: skip
        (["--student_controlnet_model_name_or_path", "c"], "needs --controlnet_model_name_or_path"),
        (
            [
                "--controlnet_model_name_or_path",
                "c",
                "--controlnet_training_mode",
                "joint",
                "--controlnet_conditioning_scale",
                "-1",
            ],
            "--controlnet_conditioning_scale must be >= 0",
        ),  # fmt: skip
    ):
        if message is None:  # argparse's choices
            with pytest.raises(SystemExit):
                parse_recipe(DISTILLATION, base + extra)
            continue
        with pytest.raises(ValueError, match=message):
            parse_recipe(DISTILLATION, base + extra)
    joint = ["--controlnet_model_name_or_path", "c", "--controlnet_training_mode", "joint"]
    args = parse_recipe(DISTILLATION, base + joint)
    assert args.conditioning_image_column == "conditioning_image" and args.controlnet_conditioning_scale == 1.0
