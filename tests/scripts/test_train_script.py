"""examples/train_sana_sprint.py end to end, offline, on tiny models and a generated image dataset.

Every run is a subprocess (`python` or `accelerate launch`) with one thread per process and the Hub switched off
(`HF_HUB_OFFLINE=1`), except the push test, whose Hub is a local stand-in server (tests/fixtures/hub_stand_in.py).
"""

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from diffusers.utils import make_image_grid
from fixtures.script_runs import (
    REPO,
    SCRIPT,
    TEACHER_SCRIPT,
    _assert_same_run,
    _env,
    _final_weights,
    base_args,
    read_log,
    run_script,
)
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel
from diffusers_sprint.training import DistillationConfig, SCMLossConfig
from diffusers_sprint.training.publish import save_model_card
from diffusers_sprint.training.recipe import DISTILLATION, TEACHER_PREPARATION, parse_recipe
from diffusers_sprint.training.settings import settings_of


pytestmark = pytest.mark.slow

PROMPTS = ["a red house", "a small blue house"]


def _generate(pipe, steps, **kwargs):
    kwargs = {
        "height": 16,
        "width": 16,
        "use_resolution_binning": False,
        "complex_human_instruction": None,
        "max_sequence_length": 16,
        "output_type": "pil",
        **kwargs,
    }
    return pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).images


# ---------------------------------------------------------------------------------------------------------------------
# (7) teacher preparation, then (1) distillation from it
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_teacher(assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("prepare")
    output = tmp_path / "teacher"
    args = base_args(
        assets,
        output,
        2,
        resolution=32,  # diffusers' SanaPipeline (teacher validation) needs multiples of 32
        calibrate_qk_norm=True,
        validation_prompts=PROMPTS,
        validation_inference_steps=[3],
        checkpointing_steps=2,
    )
    cut = args.index("--tangent_warmup_steps")  # a distillation flag
    run_script(tmp_path, args[:cut] + args[cut + 2 :], script=TEACHER_SCRIPT)
    return output


def test_prepare_teacher_writes_a_sprint_teacher_that_sana_pipeline_loads(prepared_teacher, assets):
    log = read_log(prepared_teacher)
    assert [row["step"] for row in log] == [1, 2]
    assert all(math.isfinite(row["finetune_loss"]) and row["skipped"] == 0 for row in log)
    pipe = SanaPipeline.from_pretrained(prepared_teacher)  # `import diffusers_sprint` registered the class
    transformer = pipe.transformer
    assert isinstance(transformer, SanaSprintTransformer2DModel)
    assert transformer.config.qk_norm == "rms_norm_across_heads" and not transformer.config.guidance_embeds
    assert transformer.effective_flow_time_scale == 1.0 and math.isclose(transformer.config.timestep_scale, 1e-3)
    flow = SanaSprintTransformer2DModel.from_pretrained(assets / "teacher", subfolder="transformer")
    assert flow.effective_flow_time_scale == 1000.0 and flow.config.qk_norm is None
    images = pipe(
        PROMPTS[0],
        height=32,
        width=32,
        num_inference_steps=3,
        use_resolution_binning=False,
        complex_human_instruction=None,
        max_sequence_length=16,
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert (prepared_teacher / "validation_grid.png").exists()
    assert not (prepared_teacher / "checkpoint-2" / "discriminator_heads").exists()


def test_distill_end_to_end(prepared_teacher, assets, tmp_path):
    """accelerate launch, tensorboard, EMA, flips, checkpoint + validation at step 2, final pipeline and grid."""
    output = tmp_path / "out"
    args = base_args(
        assets,
        output,
        3,
        checkpointing_steps=2,
        validation_steps=2,
        validation_prompts=PROMPTS,
        use_ema=True,
        ema_decay=0.5,
        random_flip=True,
    )
    args[args.index("--pretrained_teacher_model_name_or_path") + 1] = prepared_teacher
    args[args.index("--report_to") + 1] = "tensorboard"
    result = run_script(tmp_path, args, launcher="accelerate")
    print(f"distill run: {result.seconds:.1f} s")

    log = read_log(output)
    assert [row["step"] for row in log] == [1, 2, 3]
    for row in log:
        for key in ("generator_loss", "scm_loss", "adversarial_loss", "discriminator_loss"):
            assert math.isfinite(row[key]), (key, row)
    assert [row["generator_steps"] for row in log] == [1, 2, 3]  # G and D updates are counted apart
    assert [row["discriminator_steps"] for row in log] == [1, 2, 3]
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert (output / "validation" / "step_000002.png").exists() and (output / "validation_grid.png").exists()

    # The checkpoint holds the student and the heads, never the frozen teacher (diffusers #12444).
    checkpoint = output / "checkpoint-2"
    weights = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*.safetensors"))
    assert weights == ["discriminator_heads/heads.safetensors", "transformer/diffusion_pytorch_model.safetensors"]
    assert all(key.startswith("heads.") for key in load_file(checkpoint / "discriminator_heads/heads.safetensors"))
    saved = SanaSprintTransformer2DModel.from_pretrained(checkpoint / "transformer")
    assert saved.config.guidance_embeds and saved.config.logvar_head
    teacher = SanaSprintTransformer2DModel.from_pretrained(prepared_teacher / "transformer")
    assert not teacher.config.guidance_embeds
    assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == 2

    # The output is a complete SanaSprintPipeline; its images are the final validation grid (same seed, 1 and 2
    # steps through the real pipeline).
    pipe = SanaSprintPipeline.from_pretrained(output)
    assert isinstance(pipe.transformer, SanaSprintTransformer2DModel) and pipe.transformer.dtype == torch.float32
    columns = [_generate(pipe, steps, guidance_scale=4.5) for steps in (1, 2)]
    grid = make_image_grid([column[row] for row in range(2) for column in columns], rows=2, cols=2)
    difference = np.abs(np.asarray(grid, np.int16) - np.asarray(Image.open(output / "validation_grid.png"), np.int16))
    assert difference.max() <= 1
    assert not np.array_equal(np.asarray(columns[0][0]), np.asarray(columns[1][0]))


# ---------------------------------------------------------------------------------------------------------------------
# (2) resume equality
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run_exactly(assets, tmp_path):
    """4 steps straight vs 3 steps (checkpoint at 2, then 'killed') + resume from the checkpoint to 4."""
    flags = dict(use_ema=True, ema_decay=0.5, random_flip=True, gradient_accumulation_steps=1)
    straight = tmp_path / "straight"
    run_script(tmp_path, base_args(assets, straight, 4, checkpointing_steps=1, checkpoints_total_limit=2, **flags))
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    resumed = tmp_path / "resumed"
    run_script(tmp_path, base_args(assets, resumed, 3, checkpointing_steps=2, **flags))
    assert [row["step"] for row in read_log(resumed)] == [1, 2, 3]
    run_script(
        tmp_path, base_args(assets, resumed, 4, checkpointing_steps=2, resume_from_checkpoint="latest", **flags)
    )

    expected, got = read_log(straight), read_log(resumed)
    assert [row["step"] for row in got] == [1, 2, 3, 4]  # the log was cut back to the checkpoint
    assert got == expected  # every logged float, bit for bit
    final = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors").items():
        assert torch.equal(final[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# (3) LoRA round trip
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_distillation_round_trip(assets, tmp_path):
    output = tmp_path / "lora"
    args = base_args(
        assets,
        output,
        2,
        lora_rank=4,
        lora_alpha=4,
        guidance_scales=[4.5],
        cache_latents=True,
        validation_prompts=PROMPTS,
        validation_inference_steps=[1],
    )
    args[args.index("--train_data_dir") : args.index("--train_data_dir") + 2] = [
        "--dataset_name",
        assets / "saved_dataset",
    ]
    run_script(tmp_path, args)
    assert (output / "pytorch_lora_weights.safetensors").exists() and not (output / "transformer").exists()
    lora = load_file(output / "pytorch_lora_weights.safetensors")
    assert lora and all(".lora_A." in key or ".lora_B." in key for key in lora)

    pipe = SanaSprintPipeline.from_pretrained(assets / "teacher")  # the teacher is the LoRA's base
    base = _generate(pipe, 1, guidance_scale=None)
    pipe.load_lora_weights(output)
    with_lora = _generate(pipe, 1, guidance_scale=None)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    assert {f"transformer.{key}" for key in loaded} == set(lora)
    for key, value in loaded.items():
        assert torch.equal(lora[f"transformer.{key}"], value), key
    grid = make_image_grid(with_lora, rows=2, cols=1)
    difference = np.abs(np.asarray(grid, np.int16) - np.asarray(Image.open(output / "validation_grid.png"), np.int16))
    assert difference.max() <= 1  # the saved adapter is the trained student
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, with_lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = _generate(pipe, 1, guidance_scale=None, output_type="np")
    unfused = np.stack([np.asarray(image, np.float32) / 255 for image in with_lora])
    assert np.abs(fused - unfused).max() <= 1 / 255 + 1e-6


def test_teacher_lora_distils_the_personalised_teacher(assets, tmp_path):
    """--teacher_lora / --teacher_lora_scale: the run equals one whose teacher had the LoRA fused by diffusers."""
    from peft import LoraConfig

    teacher = SanaPipeline.from_pretrained(assets / "teacher")
    teacher.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in teacher.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    style = tmp_path / "style"
    SanaPipeline.save_lora_weights(style, transformer_lora_layers=get_peft_model_state_dict(teacher.transformer))
    fused = SanaPipeline.from_pretrained(assets / "teacher")  # the personalised teacher, made by diffusers alone
    fused.load_lora_weights(style)
    fused.fuse_lora(lora_scale=0.5)
    fused.unload_lora_weights()
    fused.save_pretrained(tmp_path / "fused_teacher")

    outputs = {}
    for name, flags in (
        ("flag", dict(teacher_lora=style, teacher_lora_scale=0.5)),
        ("fused by hand", {}),
    ):
        args = base_args(assets, tmp_path / name, 2, cache_latents=True, **LORA_FLAGS, **flags)
        if name == "fused by hand":
            args[args.index("--pretrained_teacher_model_name_or_path") + 1] = tmp_path / "fused_teacher"
        run_script(tmp_path, args)
        outputs[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert set(outputs["flag"]) == set(outputs["fused by hand"])
    for key, value in outputs["flag"].items():
        torch.testing.assert_close(value, outputs["fused by hand"][key], rtol=0, atol=1e-6)
    base = SanaPipeline.from_pretrained(assets / "teacher").transformer.state_dict()
    assert max((base[k] - v).abs().max() for k, v in fused.transformer.state_dict().items()) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# (4) two processes (gloo) vs one process, same global batch
# ---------------------------------------------------------------------------------------------------------------------


LORA_FLAGS = dict(lora_rank=4, lora_alpha=4, guidance_scales=[4.5])


@pytest.mark.parametrize("flags", [{}, LORA_FLAGS], ids=["full", "lora"])
def test_two_processes_match_one_process_with_the_same_global_batch(assets, tmp_path, flags):
    """Global batch 4 = 2 processes x 2 samples (accelerate DDP) vs 1 process x 2 samples x 2 accumulation steps, 3
    steps (crossing an epoch): same micro-batches and noise by construction; only float summation order differs.
    Seen on CPU: weights within 8.3e-7 (full) after 3 AdamW steps at lr 1e-3. Asserted: losses 1e-5 relative,
    weights 1e-4 absolute."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, base_args(assets, one, 3, gradient_accumulation_steps=2, random_flip=True, **flags))
    env = _env(tmp_path, ACCELERATE_USE_CPU="1")
    result = run_script(
        tmp_path,
        base_args(assets, two, 3, gradient_accumulation_steps=1, random_flip=True, **flags),
        launcher="accelerate",
        num_processes=2,
        env=env,
    )
    assert "MULTI_CPU" in result.stdout + result.stderr and "Num processes: 2" in result.stdout + result.stderr
    _assert_same_run(one, two, lora="lora_rank" in flags)


def test_compiled_two_processes_match_one_eager_process(assets, tmp_path):
    """`accelerate launch --dynamo_backend aot_eager` on 2 processes (prepare compiles the student and the heads, the
    script the teacher's blocks; aot_eager traces as Inductor does, without code generation) with a checkpoint at
    step 2 vs 1 eager process with accumulation 2: the same run, and Dynamo did compile graphs."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = dict(random_flip=True, checkpointing_steps=2)
    run_script(tmp_path, base_args(assets, one, 3, gradient_accumulation_steps=2, **flags))
    result = run_script(
        tmp_path,
        base_args(assets, two, 3, gradient_accumulation_steps=1, **flags),
        launcher="accelerate",
        num_processes=2,
        env=_env(tmp_path, ACCELERATE_USE_CPU="1"),
        dynamo_backend="aot_eager",
    )
    output = result.stdout + result.stderr
    assert "MULTI_CPU" in output and "Num processes: 2" in output
    graphs = re.search(r"torch.compile: (\d+) graphs compiled", output)
    assert graphs is not None and int(graphs.group(1)) > 0, output[-3000:]
    _assert_same_run(one, two)


def test_fsdp2_two_processes_match_one_process_and_resume_exactly(assets, tmp_path):
    """--fsdp (torch fully_shard of student, teacher and heads over gloo) on 2 processes vs 1 process with
    accumulation 2, both with the official full-batch LADD fake and an EMA (saved: the EMA weights); then a resume
    from the sharded (DCP) checkpoint-2, EMA shards included, redoes step 3 bit for bit on 2 processes, and to float
    error on 1 process with accumulation 2 (it used to read `transformer/` there: a 1-process run was unsharded)."""
    flags = dict(no_fake_from_scm_forward=True, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    flags = {key.replace("no_", "no-", 1) if key.startswith("no_") else key: value for key, value in flags.items()}
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(tmp_path, base_args(assets, one, 3, gradient_accumulation_steps=2, **flags))
    env = _env(tmp_path, ACCELERATE_USE_CPU="1")
    sharded = base_args(assets, two, 3, fsdp=True, **flags)
    result = run_script(tmp_path, sharded, launcher="accelerate", num_processes=2, env=env)
    assert "engine = FSDP2" in result.stdout + result.stderr and "Num processes: 2" in result.stdout + result.stderr
    assert list((two / "checkpoint-2" / "sharded").glob("*.distcp"))
    assert not (two / "checkpoint-2" / "transformer").exists()  # shards, not a gathered copy
    _assert_same_run(one, two)

    final = _final_weights(two, lora=False)
    on_one = tmp_path / "two_then_one"
    shutil.copytree(two, on_one)
    run_script(
        tmp_path, sharded + ["--resume_from_checkpoint", "latest"], launcher="accelerate", num_processes=2, env=env
    )
    resumed = _final_weights(two, lora=False)
    assert all(torch.equal(resumed[key], value) for key, value in final.items())

    resume_on_one = base_args(assets, on_one, 3, fsdp=True, gradient_accumulation_steps=2, **flags)
    result = run_script(tmp_path, resume_on_one + ["--resume_from_checkpoint", "latest"], env=env)
    assert "engine = FSDP2" in result.stdout + result.stderr
    resumed = _final_weights(on_one, lora=False)
    difference = max((resumed[key] - value).abs().max().item() for key, value in final.items())
    print(f"2 processes -> resumed on 1: max weight difference {difference:.1e}")
    assert difference < 1e-5  # seen: 7.5e-7 (the same update, other summation order)


# ---------------------------------------------------------------------------------------------------------------------
# (5) pull from and push to a local stand-in Hub
# ---------------------------------------------------------------------------------------------------------------------


def test_pull_teacher_from_and_push_result_to_the_hub(assets, tmp_path, stand_in_hub):
    """Teacher pulled by Hub id (`--revision main`), result pushed with a card and without checkpoints; also bf16
    autocast + gradient checkpointing, with the trained weights saved in fp32."""
    hub, port = stand_in_hub
    shutil.copytree(assets / "teacher", hub / "repos" / "stand-in-user" / "tiny-sana")
    output = tmp_path / "push"
    env = _env(
        tmp_path,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="hf_stand_in_token",
    )
    args = base_args(
        assets,
        output,
        2,
        checkpointing_steps=1,
        validation_prompts=PROMPTS[:1],
        push_to_hub=True,
        hub_model_id="stand-in-user/sana-sprint-tiny",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        revision="main",
    )
    args[args.index("--pretrained_teacher_model_name_or_path") + 1] = "stand-in-user/tiny-sana"
    run_script(tmp_path, args, env=env)
    repo = hub / "repos" / "stand-in-user" / "sana-sprint-tiny"
    uploaded = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert (output / "checkpoint-1").is_dir() and (output / "checkpoint-2").is_dir()
    assert not any(name.startswith("checkpoint-") for name in uploaded)
    for name in (
        "README.md",
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "validation_grid.png",
    ):
        assert name in uploaded, uploaded
    card = (repo / "README.md").read_text()
    assert "base_model: stand-in-user/tiny-sana" in card and "sana-sprint" in card
    assert "validation_grid.png" in card and "SanaSprintPipeline.from_pretrained" in card
    requests = [json.loads(line) for line in (hub / "requests.jsonl").read_text().splitlines()]
    assert all(request["known"] for request in requests)
    pulled = {
        r["path"].split("/resolve/")[1].split("/", 1)[1]
        for r in requests
        if r["method"] == "GET" and "/resolve/" in r["path"]
    }
    assert "transformer/diffusion_pytorch_model.safetensors" in pulled and "model_index.json" in pulled
    weights = load_file(repo / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert all(math.isfinite(row["generator_loss"]) for row in read_log(output))


# ---------------------------------------------------------------------------------------------------------------------
# Other recipe switches (smoke: they run and log what they should)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, present, absent",
    [
        (  # sCM only (no discriminator), RMS tangent, no adaptive weight, no CFG embedding at one scale, data/lr
            # options
            dict(
                adversarial_lambda=0,
                no_guidance_embeds=True,
                guidance_scales=[4.5],
                no_adaptive_weight=True,
                tangent_norm="rms",
                center_crop=True,
                dataloader_num_workers=2,
                max_train_samples=6,
                lr_scheduler="cosine",
                lr_warmup_steps=1,
                scale_lr=True,
                use_ema=True,
            ),
            ["scm_loss", "g_norm_mean"],
            ["discriminator_loss", "logvar_mean", "adversarial_loss"],
        ),
        (  # LADD only, BCE, R1, shared D times without misaligned pairs, custom heads, own D learning rate
            dict(
                scm_lambda=0,
                adversarial_loss="bce",
                r1_gamma=0.1,
                no_misaligned_pairs=True,
                share_discriminator_timesteps=True,
                max_time_probability=1.0,
                head_block_ids=[1],
                head_channels=8,
                discriminator_learning_rate=1e-4,
                log_gradient_norms_every=1,
            ),
            ["adversarial_loss", "discriminator_loss", "r1", "adversarial_grad_norm"],
            ["scm_loss", "scm_grad_norm"],
        ),
    ],
    ids=["scm_only", "ladd_only"],
)
def test_recipe_switches(assets, tmp_path, flags, present, absent):
    renamed = {key.replace("no_", "no-", 1) if key.startswith("no_") else key: value for key, value in flags.items()}
    output = tmp_path / "out"
    run_script(tmp_path, base_args(assets, output, 2, **renamed))
    log = read_log(output)
    assert len(log) == 2
    for row in log:
        assert all(key in row and math.isfinite(row[key]) for key in present), row
        assert not any(key in row for key in absent), row
    if flags.get("max_time_probability") == 1.0:
        assert all(row["max_time_fraction"] == 1.0 for row in log)
        assert all(row["discriminator_lr"] == 1e-4 for row in log)
    if flags.get("scale_lr"):
        assert log[0]["lr"] == pytest.approx(2e-3)  # lr x global batch 2, cosine after 1 warm-up step
    config = SanaSprintTransformer2DModel.from_pretrained(output / "transformer").config
    # the logvar head trains through the sCM term only (DDP would wait for its gradient in a LADD-only run)
    assert config.logvar_head == ("no_adaptive_weight" not in flags and flags.get("scm_lambda", 1) != 0)
    assert config.guidance_embeds == ("no_guidance_embeds" not in flags)


# ---------------------------------------------------------------------------------------------------------------------
# (6) flags
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [DISTILLATION, TEACHER_PREPARATION], ids=["distill", "teacher"])
def test_every_flag_has_help_and_is_read(recipe):
    script = SCRIPT if recipe is DISTILLATION else TEACHER_SCRIPT
    parser = recipe.parser()
    library = REPO / "src" / "diffusers_sprint" / "training"
    source = script.read_text() + "".join(path.read_text() for path in library.glob("*.py"))
    help_text = parser.format_help()
    settings = parser.setting_names()
    assert len(settings) > (80 if script == SCRIPT else 50)
    # a setting is read by the script or the library (directly, or as a library config field built by `values_of`)
    config_fields = {f.name for section in (SCMLossConfig, DistillationConfig) for f, _ in settings_of(section)}
    unread = [
        name
        for name in settings
        if name not in config_fields and not re.search(rf"\bargs\.{re.escape(name)}\b", source)
    ]
    assert unread == [], f"flags never read: {unread}"
    shown = [name for name, info in settings.items() if not info.advanced]
    assert len(shown) <= 75  # --help lists what a user or a release recipe needs; ablations live in recipe files
    for name, info in settings.items():
        assert info.help and info.help.strip(), name
        listed = re.search(rf"^  --{re.escape(name)}[ ,/\n]", help_text, flags=re.MULTILINE) is not None
        assert listed != info.advanced, name  # an option line of --help, not a mention in another's help
    if script == TEACHER_SCRIPT:
        args = parse_recipe(recipe, ["--pretrained_teacher_model_name_or_path", "x", "--dataset_name", "y"])
        assert args.validation_inference_steps == [20] and args.stage == "prepare_teacher"
        assert not hasattr(args, "lora_rank") and not hasattr(args, "scm_lambda")
        return
    official = {
        "sigma_data": 0.5,
        "p_mean": 0.2,
        "p_std": 1.6,
        "discriminator_p_mean": -0.6,
        "discriminator_p_std": 1.0,
        "tangent_warmup_steps": 4000,
        "tangent_norm": "l2",
        "tangent_norm_eps": 0.1,
        "guidance_scales": [4.0, 4.5, 5.0],
        "scm_lambda": 1.0,
        "adversarial_lambda": 0.5,
        "adversarial_loss": "hinge",
        "misaligned_pairs": True,
        "max_time_probability": 0.5,
        "max_grad_norm": 0.1,
        "adaptive_weight": True,
        "guidance_embeds_scale": 0.1,
        "report_to": "tensorboard",
    }
    args = parse_recipe(recipe, ["--pretrained_teacher_model_name_or_path", "x", "--dataset_name", "y"])
    assert {key: getattr(args, key) for key in official} == official
    assert args.validation_inference_steps == [1, 2]
    for bad, message in (
        ([], "exactly one"),
        (["--dataset_name", "y", "--train_data_dir", "z"], "exactly one"),
        (["--dataset_name", "y", "--fsdp", "--lora_rank", "4"], "lora_rank"),
        (["--dataset_name", "y", "--max_grad_norm", "0"], "max_grad_norm"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_recipe(recipe, ["--pretrained_teacher_model_name_or_path", "x"] + bad)
    for optimizer, package in (("adamw8bit", "bitsandbytes"), ("came", "came_pytorch")):
        flags = ["--pretrained_teacher_model_name_or_path", "x", "--dataset_name", "y", "--optimizer", optimizer]
        if importlib.util.find_spec(package) is None:  # optional packages: a clear error before anything loads
            with pytest.raises(ImportError, match="pip install"):
                parse_recipe(recipe, flags)
        else:
            assert parse_recipe(recipe, flags).optimizer == optimizer


@pytest.mark.parametrize(
    "flags, usage, cfg_row",
    [
        ([], "num_inference_steps=1).images[0]", "| CFG embedding | yes |"),
        (["--no-guidance_embeds", "--guidance_scales", "4.5"], "guidance_scale=None", "| CFG embedding | no |"),
        (["--lora_rank", "4"], "guidance_scale=None", "| CFG embedding | no |"),
    ],
    ids=["full", "no_cfg_embedding", "lora"],
)
def test_model_card_says_how_to_sample_the_student(tmp_path, flags, usage, cfg_row):
    """The card's usage line passes guidance_scale=None exactly when the student has no guidance embedder."""
    args = parse_recipe(
        DISTILLATION,
        [
            "--pretrained_teacher_model_name_or_path",
            "teacher",
            "--dataset_name",
            "emoji",
            "--output_dir",
            str(tmp_path),
        ]
        + flags,
    )
    save_model_card(args, "me/student", "distill", 10, 16, "no", has_grid=False)
    card = (tmp_path / "README.md").read_text()
    assert usage in card and cfg_row in card
    assert ("guidance_scale=None" in card) == (usage == "guidance_scale=None")


# ---------------------------------------------------------------------------------------------------------------------
# (8) a process killed (SIGKILL) while it writes a checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _kill_during(tmp_path, args, marker: Path, reset, attempts: int = 5) -> bool:
    """Start the script and SIGKILL it the moment `marker` (a folder being written) exists; True when it did.
    A run that finished before the marker was seen is undone by `reset()` and started again."""
    command = [sys.executable, str(SCRIPT)] + [str(a) for a in args]
    for _ in range(attempts):
        process = subprocess.Popen(
            command, cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while process.poll() is None and not marker.exists():
            time.sleep(0.0002)
        if process.poll() is None:
            process.kill()
            process.wait()
            return True
        reset()
    return False


def test_kill_during_a_checkpoint_save_then_resume_latest_is_exact(assets, tmp_path):
    """SIGKILL while checkpoint-3 is being written: `latest` resumes from checkpoint-2 and ends bit-identical."""
    flags = dict(use_ema=True, ema_decay=0.5, checkpointing_steps=1)
    straight = tmp_path / "straight"
    run_script(tmp_path, base_args(assets, straight, 4, **flags))

    killed = tmp_path / "killed"
    args = base_args(assets, killed, 4, **flags)
    assert _kill_during(tmp_path, args, killed / ".checkpoint-3.incomplete", lambda: shutil.rmtree(killed))
    names = sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name)
    assert "checkpoint-2" in names and "checkpoint-3" not in names, names  # the half-written save is not a checkpoint
    assert not (killed / "model_index.json").exists()

    run_script(tmp_path, base_args(assets, killed, 4, resume_from_checkpoint="latest", **flags))
    assert not (killed / ".checkpoint-3.incomplete").exists()  # cleaned up at start
    assert read_log(killed) == read_log(straight)  # steps 3 and 4 recomputed from checkpoint-2, bit for bit
    final = load_file(killed / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors").items():
        assert torch.equal(final[key], value), key


def test_kill_during_the_final_save_leaves_no_loadable_mix(assets, tmp_path):
    """SIGKILL while the final pipeline is written over an earlier one: the folder loads the earlier pipeline whole,
    or (killed while moving the new files in) does not load at all; never the old index over new weights."""
    output, first = tmp_path / "out", tmp_path / "first"
    run_script(tmp_path, base_args(assets, output, 1, adversarial_lambda=0))
    shutil.copytree(output, first)
    args = base_args(assets, output, 2, adversarial_lambda=0, learning_rate=1e-2)

    def reset():
        shutil.rmtree(output)
        shutil.copytree(first, output)

    assert _kill_during(tmp_path, args, output / ".pipeline-incomplete", reset)
    if (output / "model_index.json").exists():
        loaded = SanaSprintPipeline.from_pretrained(output).transformer.state_dict()
        expected = load_file(first / "transformer" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    else:
        with pytest.raises(OSError):
            SanaSprintPipeline.from_pretrained(output)


# ---------------------------------------------------------------------------------------------------------------------
# (9) failures a user meets: each one a clear error naming the flag, file or checkpoint, and a non-zero exit
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_run(assets, tmp_path_factory):
    """A 2-iteration sCM run with checkpoint-2, copied afresh for every test that damages it."""
    tmp_path = tmp_path_factory.mktemp("checkpointed")
    output = tmp_path / "run"
    run_script(tmp_path, base_args(assets, output, 2, adversarial_lambda=0, checkpointing_steps=2))
    return output


def _failing_run(tmp_path, args, script=SCRIPT):
    result = run_script(tmp_path, args, check=False, script=script)
    assert result.returncode != 0
    return result.stdout + result.stderr


def test_a_diverging_run_stops_with_an_error(assets, tmp_path):
    """lr 1e6: the first update overflows the weights, every later gradient is NaN; stopped after 2 skips, exit 1."""
    args = base_args(assets, tmp_path / "out", 6, max_consecutive_skips=2)
    args[args.index("--learning_rate") + 1] = 1e6
    output = _failing_run(tmp_path, args)
    assert re.search(r"Training diverged: the last 2 (generator|discriminator) updates", output), output[-2000:]
    assert "--max_consecutive_skips" in output
    assert not (tmp_path / "out" / "model_index.json").exists()  # nothing saved as if it were a result


@pytest.mark.parametrize(
    "damage, flags, message",
    [
        ("none", dict(learning_rate=1e-4), "--learning_rate: 0.001 in the checkpoint, 0.0001 now"),
        ("nan", {}, "diffusion_pytorch_model.safetensors: tensor"),
        ("truncate", {}, "Cannot read the checkpoint file"),
        ("state", {}, "training_state.json"),
        ("optimizer", {}, "Cannot resume from"),
    ],
    ids=["other_recipe", "nan_weights", "truncated_weights", "broken_state", "truncated_optimizer"],
)
def test_resume_refuses_a_checkpoint_it_cannot_trust(assets, checkpointed_run, tmp_path, damage, flags, message):
    output = tmp_path / "run"
    shutil.copytree(checkpointed_run, output)
    weights = output / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "nan":
        from safetensors.torch import save_file

        tensors = load_file(weights)
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, weights)
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "state":
        (output / "checkpoint-2" / "training_state.json").write_text("{")
    elif damage == "optimizer":
        optimizer = output / "checkpoint-2" / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[:64])
    args = base_args(assets, output, 3, adversarial_lambda=0, resume_from_checkpoint="latest", **flags)
    assert message in _failing_run(tmp_path, args)


def test_the_teacher_script_refuses_a_distillation_checkpoint(assets, checkpointed_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(checkpointed_run, output)
    args = base_args(assets, output, 3, resume_from_checkpoint=str(output / "checkpoint-2"))
    cut = args.index("--tangent_warmup_steps")
    text = _failing_run(tmp_path, args[:cut] + args[cut + 2 :], script=TEACHER_SCRIPT)
    assert "was written by --stage distill" in text or "belongs to a run with other settings" in text
