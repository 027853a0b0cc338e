"""training.recipe / training.fingerprint: range checks of the training settings and the run fingerprint."""

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from diffusers_sprint.training.fingerprint import (
    compare_fingerprints,
    read_fingerprint,
    run_fingerprint,
    write_fingerprint,
)
from diffusers_sprint.training.recipe import (
    DISTILLATION,
    TEACHER_PREPARATION,
    distillation_config,
    validate_training_args,
)


@pytest.fixture(scope="module")
def parser():
    return DISTILLATION.parser()


@pytest.fixture(scope="module")
def teacher_parser():
    return TEACHER_PREPARATION.parser()


def script_args(parser, *extra, stage="distill", **overrides) -> Namespace:
    """The script's defaults (as its parser gives them), with `overrides` set on the namespace."""
    args = parser.parse_args(["--pretrained_teacher_model_name_or_path", "teacher", "--dataset_name", "data", *extra])
    args.stage = stage  # what each script's parse_args sets
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


NAN, INF = math.nan, math.inf
BAD = [
    # (overrides, text the message must hold: the flag and its allowed range)
    (dict(max_grad_norm=0.0), "--max_grad_norm must be > 0 (inf: no clipping) (got 0.0)"),
    (dict(max_grad_norm=-1.0), "--max_grad_norm must be > 0"),
    (dict(finite_difference_step=0.0), "--finite_difference_step must be in (0, 0.1] radians (got 0.0)"),
    (dict(finite_difference_step=0.5), "--finite_difference_step must be in (0, 0.1] radians"),
    (dict(max_grad_norm=NAN), "--max_grad_norm must be a finite number (got nan)"),
    (dict(max_grad_norm=-INF), "--max_grad_norm must be a finite number"),
    (dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha must be > 0 (the LoRA scale is alpha / rank) (got 0.0)"),
    (dict(lora_rank=4, lora_alpha=-8.0), "--lora_alpha must be > 0"),
    (dict(lora_alpha=4.0), "--lora_alpha applies only with --lora_rank"),
    (dict(teacher_lora_scale=0.5), "--teacher_lora_scale applies only with --teacher_lora"),
    (dict(compile_jvp=True, jvp="finite_difference"), "--compile_jvp applies only with --jvp exact"),
    (dict(lora_rank=0), "--lora_rank must be >= 1 (got 0)"),
    (dict(learning_rate=0.0), "--learning_rate must be > 0 (got 0.0)"),
    (dict(learning_rate=-1e-4), "--learning_rate must be > 0"),
    (dict(learning_rate=NAN), "--learning_rate must be a finite number"),
    (dict(learning_rate=INF), "--learning_rate must be a finite number (got inf)"),
    (dict(discriminator_learning_rate=0.0), "--discriminator_learning_rate must be > 0"),
    (dict(guidance_scales=[0.0]), "--guidance_scales must be >= 1 (each value; 1 is the conditional teacher"),
    (dict(guidance_scales=[4.0, -2.0]), "--guidance_scales must be >= 1"),
    (dict(guidance_scales=[0.5]), "--guidance_scales must be >= 1"),
    (dict(guidance_scales=[4.0, INF]), "--guidance_scales must be a finite number (got [4.0, inf])"),
    (dict(p_mean=NAN), "--p_mean must be a finite number"),
    (dict(adam_epsilon=INF), "--adam_epsilon must be a finite number"),
    (dict(ema_decay=1.5), "--ema_decay must be in [0, 1] (got 1.5)"),
    (dict(ema_decay=-0.1), "--ema_decay must be in [0, 1]"),
    (dict(resolution=0), "--resolution must be >= 1 pixel (got 0)"),
    (dict(resolution=-32), "--resolution must be >= 1 pixel"),
    (dict(max_sequence_length=0), "--max_sequence_length must be >= 1 token"),
    (dict(max_consecutive_skips=0), "--max_consecutive_skips must be >= 1"),
    (dict(checkpoints_total_limit=0), "--checkpoints_total_limit must be >= 1"),
    (dict(max_train_steps=0), "--max_train_steps must be >= 1"),
    (dict(checkpointing_steps=0), "--checkpointing_steps must be >= 1"),
    (dict(validation_steps=-1), "--validation_steps must be >= 1"),
    (dict(train_batch_size=0), "--train_batch_size must be >= 1"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1"),
    (dict(tangent_norm_eps=0.0), "--tangent_norm_eps must be > 0"),
    (dict(sigma_data=0.0), "--sigma_data must be > 0"),
    (dict(sigma_data=-0.5), "--sigma_data must be > 0"),
    (dict(max_time_probability=1.5), "--max_time_probability must be in [0, 1]"),
    (dict(max_time_probability=-0.5), "--max_time_probability must be in [0, 1]"),
    (dict(caption_dropout_prob=1.1), "--caption_dropout_prob must be in [0, 1]"),
    (dict(caption_dropout_prob=-0.1), "--caption_dropout_prob must be in [0, 1]"),
    (dict(adam_beta2=1.0), "--adam_beta2 must be in [0, 1)"),
    (dict(adam_weight_decay=-0.01), "--adam_weight_decay must be >= 0"),
    (dict(head_channels=0), "--head_channels must be >= 1 (got 0)"),
    (dict(max_train_samples=0), "--max_train_samples must be >= 1"),
    (dict(validation_inference_steps=[1, 0]), "--validation_inference_steps must be >= 1"),
    (dict(scm_lambda=-1.0), "--scm_lambda must be >= 0"),
    (dict(scm_lambda=0.0, adversarial_lambda=0.0), "one of --scm_lambda and --adversarial_lambda must be > 0"),
    # checked late before (issue 25): a rising polynomial lr then ZeroDivisionError; a crash at the first validation
    (dict(lr_scheduler="polynomial", lr_power=-1.0), "--lr_power must be > 0 (got -1.0)"),
    (dict(lr_power=0.0), "--lr_power must be > 0"),
    (dict(validation_guidance_scale=-3.0), "--validation_guidance_scale must be >= 0 (got -3.0)"),
    (dict(lr_scheduler="foo"), "--lr_scheduler must be one of ('linear', 'cosine'"),
    (dict(share_discriminator_timesteps=True), "--share_discriminator_timesteps needs equal real/fake batches"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD])
def test_bad_flags_raise_naming_the_flag_and_range(parser, overrides, message):
    args = script_args(parser, **overrides)
    with pytest.raises(ValueError) as error:
        validate_training_args(args)
    text = str(error.value)
    assert message in text, text
    assert text.count("\n") == 1, text  # exactly one offending flag, one line


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(max_grad_norm=INF),
        dict(max_grad_norm=None),
        dict(guidance_scales=[1.0]),
        dict(ema_decay=0.0),
        dict(ema_decay=1.0),
        dict(lora_rank=1, lora_alpha=0.5),
        dict(max_time_probability=0.0, caption_dropout_prob=1.0),
        dict(scm_lambda=0.0),
        dict(adversarial_lambda=0.0),
        dict(stage="prepare_teacher", scm_lambda=0.0, adversarial_lambda=0.0),
    ],
)
def test_valid_flags_pass(parser, overrides):
    validate_training_args(script_args(parser, **overrides))


def test_absent_flags_are_skipped_and_every_error_is_listed():
    validate_training_args(Namespace(learning_rate=1e-4, resolution=32))  # a script with few flags
    with pytest.raises(ValueError) as error:
        validate_training_args(Namespace(learning_rate=0.0, resolution=0, ema_decay=NAN, output_dir="x"))
    lines = str(error.value).splitlines()
    assert lines[0] == "Invalid training arguments:"
    assert lines[1:] == [
        "  --ema_decay must be a finite number (got nan).",
        "  --resolution must be >= 1 pixel (got 0).",
        "  --learning_rate must be > 0 (got 0.0).",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------------------------


# The settings of each script that enter the fingerprint at the defaults (each declared with its setting). A setting
# whose classification changes must change here too: resuming across such a change is refused or silently allowed.
DISTILL_FINGERPRINT = """stage pretrained_teacher_model_name_or_path revision variant dataset_name dataset_config_name
train_data_dir image_column caption_column max_train_samples resolution center_crop random_flip cache_latents
max_sequence_length complex_human_instruction sigma_data p_mean p_std tangent_warmup_steps tangent_norm
tangent_norm_eps guidance_scales adaptive_weight detach_logvar_embedding jvp null_branch_mask scm_lambda
adversarial_lambda adversarial_loss discriminator_p_mean discriminator_p_std max_time_probability misaligned_pairs
share_discriminator_timesteps r1_gamma fake_from_scm_forward guidance_embeds guidance_embeds_scale head_block_ids
head_block_layout head_channels discriminator_learning_rate discriminator_lr_schedule lora_rank
train_batch_size gradient_accumulation_steps learning_rate max_grad_norm scale_lr optimizer adam_beta1 adam_beta2
came_beta3 adam_weight_decay adam_epsilon lr_scheduler use_ema ema_decay mixed_precision fsdp""".split()
TEACHER_ONLY = """teacher_qk_norm dense_time dense_time_init calibrate_qk_norm finetune_logit_mean finetune_logit_std
finetune_weighting caption_dropout_prob""".split()
NEVER = """cache_dir feature_cache_dir precompute_only dataloader_num_workers validate_data max_consecutive_skips
gradient_checkpointing allow_tf32 seed output_dir checkpointing_steps checkpoints_total_limit resume_from_checkpoint
validation_prompts validation_steps validation_inference_steps validation_guidance_scale logging_dir report_to
tracker_project_name push_to_hub hub_token hub_model_id fp32_linear_attention teacher_fp32 compile_jvp
log_gradient_norms_every""".split()


def test_fingerprint_classification_of_every_setting(parser, teacher_parser):
    distill = run_fingerprint(script_args(parser))
    assert sorted(distill) == sorted(DISTILL_FINGERPRINT)
    teacher = run_fingerprint(script_args(teacher_parser, stage="prepare_teacher"))
    shared = [name for name in DISTILL_FINGERPRINT if hasattr(script_args(teacher_parser), name)]
    assert sorted(teacher) == sorted(shared + TEACHER_ONLY)
    for name in NEVER:  # declared fingerprint=False: never recorded, whatever the value
        settings = parser.setting_names() | teacher_parser.setting_names()
        assert settings[name].fingerprint is False, name
    # conditional ones: recorded exactly when their condition holds
    on = script_args(
        parser,
        "--lr_scheduler",
        "cosine_with_restarts",
        "--lora_rank",
        "4",
        "--jvp",
        "finite_difference",
        "--train_shards",
        "a.tar",
        "--streaming",
        "--controlnet_model_name_or_path",
        "c",
        "--pretrained_student_model_name_or_path",
        "s",
        "--discriminator_shared_norm_groups",
        "--no-teacher_cfg_without_guidance_embeds",
        "--multi_scale",
    )
    conditional = set(run_fingerprint(on)) - set(DISTILL_FINGERPRINT)
    assert conditional == set(
        """lr_warmup_steps max_train_steps lr_num_cycles lora_alpha lora_target_modules finite_difference_step
        train_shards streaming shuffle_buffer_size caption_fallback_columns skip_bad_shards
        controlnet_model_name_or_path student_controlnet_model_name_or_path pretrained_student_model_name_or_path
        conditioning_image_column
        controlnet_training_mode controlnet_conditioning_scale discriminator_shared_norm_groups
        teacher_cfg_without_guidance_embeds multi_scale""".split()
    )
    assert "lr_power" in run_fingerprint(script_args(parser, "--lr_scheduler", "polynomial"))


def test_fingerprint_holds_the_math_flags_of_the_stage(parser, teacher_parser):
    distill = run_fingerprint(script_args(parser))
    assert distill["learning_rate"] == 2e-6 and distill["guidance_scales"] == [4.0, 4.5, 5.0]
    assert "caption_dropout_prob" not in distill and "seed" not in distill and "output_dir" not in distill
    assert "max_train_steps" not in distill and "lora_alpha" not in distill  # constant lr; no LoRA
    teacher = run_fingerprint(script_args(teacher_parser, stage="prepare_teacher"))
    assert teacher["caption_dropout_prob"] == 0.1 and "guidance_scales" not in teacher
    assert json.loads(json.dumps(distill)) == distill
    assert compare_fingerprints(json.loads(json.dumps(distill)), distill) == []


def test_compare_fingerprints_lists_each_difference(parser):
    saved = run_fingerprint(script_args(parser))
    same = script_args(
        parser, "--output_dir", "elsewhere", "--seed", "3", "--validation_steps", "7", "--max_train_steps", "9"
    )
    assert compare_fingerprints(saved, run_fingerprint(same)) == []
    changed = script_args(parser, "--learning_rate", "1e-3", "--guidance_scales", "4", "--lora_rank", "4")
    assert compare_fingerprints(saved, run_fingerprint(changed)) == [
        "--guidance_scales: [4.0, 4.5, 5.0] in the checkpoint, [4.0] now",
        "--learning_rate: 2e-06 in the checkpoint, 0.001 now",
        "--lora_alpha: not recorded in the checkpoint, None now",
        "--lora_rank: None in the checkpoint, 4 now",
        "--lora_target_modules: not recorded in the checkpoint, "
        f"{run_fingerprint(changed)['lora_target_modules']!r} now",
    ]
    cosine = run_fingerprint(script_args(parser, "--lr_scheduler", "cosine"))
    longer = run_fingerprint(script_args(parser, "--lr_scheduler", "cosine", "--max_train_steps", "30000"))
    assert compare_fingerprints(cosine, longer) == ["--max_train_steps: 20000 in the checkpoint, 30000 now"]
    # --head_kernel_size / --head_virtual_batch_size are gone (always 9 and 8): checkpoints at those values resume
    older = {**saved, "head_kernel_size": 9, "head_virtual_batch_size": 8}
    assert compare_fingerprints(older, saved) == []
    assert compare_fingerprints({**older, "head_kernel_size": 3}, saved) == [
        "--head_kernel_size: 3 in the checkpoint, a removed flag (always 9 now)"
    ]


def test_fingerprint_keeps_the_global_batch_across_layouts(parser):
    one = run_fingerprint(script_args(parser, "--train_batch_size", "2", "--gradient_accumulation_steps", "2"), 1)
    two = run_fingerprint(script_args(parser, "--train_batch_size", "2"), num_processes=2)
    assert one["global_batch_size"] == two["global_batch_size"] == 4 and "gradient_accumulation_steps" not in one
    assert compare_fingerprints(one, two) == []
    four = run_fingerprint(script_args(parser, "--train_batch_size", "4"), num_processes=1)
    assert compare_fingerprints(one, four) == ["--train_batch_size: 2 in the checkpoint, 4 now"]


def test_fingerprint_file_round_trip(tmp_path, parser):
    fingerprint = run_fingerprint(script_args(parser), num_processes=1)
    assert read_fingerprint(str(tmp_path)) is None
    path = write_fingerprint(str(tmp_path), fingerprint)
    assert read_fingerprint(str(tmp_path)) == fingerprint
    Path(path).write_text('{"learning_rate": 1e-4')  # truncated
    with pytest.raises(ValueError, match=r"run fingerprint .*run_fingerprint.json cannot be read .*damaged"):
        read_fingerprint(str(tmp_path))


def test_jvp_flags_reach_the_scm_config(parser):
    """--jvp / --jvp_step (alias of --finite_difference_step) / --compile_jvp become `SCMLossConfig.jvp` /
    `finite_difference_step` / `compile_jvp`; a bad --jvp is refused by argparse."""
    args = script_args(parser, "--jvp", "finite_difference", "--jvp_step", "1e-4", sigma_data=0.5)
    scm = distillation_config(args, sharded=False).scm
    assert (scm.jvp, scm.finite_difference_step) == ("finite_difference", 1e-4)
    assert distillation_config(script_args(parser, sigma_data=0.5), sharded=False).scm.jvp == "exact"
    with pytest.raises(SystemExit):
        script_args(parser, "--jvp", "fd")
    assert "finite_difference_step" in run_fingerprint(args)
    assert "finite_difference_step" not in run_fingerprint(script_args(parser))
    compiled = script_args(parser, "--compile_jvp", sigma_data=0.5)
    assert distillation_config(compiled, sharded=False).scm.compile_jvp
    assert not distillation_config(script_args(parser, sigma_data=0.5), sharded=False).scm.compile_jvp
    assert run_fingerprint(compiled) == run_fingerprint(script_args(parser, sigma_data=0.5))  # float rounding only


def test_new_data_flags_enter_the_fingerprint_only_when_on(parser):
    plain = run_fingerprint(script_args(parser), num_processes=1)
    for name in ("multi_scale", "streaming", "train_shards", "shuffle_buffer_size", "caption_fallback_columns"):
        assert name not in plain  # a checkpoint written before these flags existed still matches
    buckets = run_fingerprint(script_args(parser, "--multi_scale"), num_processes=1)
    assert buckets["multi_scale"] is True
    assert compare_fingerprints(plain, buckets) == ["--multi_scale: not recorded in the checkpoint, True now"]
    stream = run_fingerprint(
        script_args(parser, streaming=True, train_shards=["a-*.tar"], shuffle_buffer_size=7), num_processes=1
    )
    assert (stream["streaming"], stream["train_shards"], stream["shuffle_buffer_size"]) == (True, ["a-*.tar"], 7)
    assert stream["caption_fallback_columns"] is None
    assert "feature_cache_dir" not in run_fingerprint(script_args(parser, feature_cache_dir="/c"), num_processes=1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--lr_scheduler", "foo"],
            "--lr_scheduler/--lr-scheduler: invalid choice: 'foo' (choose from 'linear', 'cosine'",
        ),
        (["--optimizer", "sgd"], "--optimizer: invalid choice: 'sgd' (choose from 'adamw', 'adamw8bit', 'came')"),
        (["--jvp", "fd"], "argument --jvp: invalid choice: 'fd'"),
        (["--train_batch_size", "two"], "argument --train_batch_size/--train-batch-size: invalid int value: 'two'"),
        (["--misaligned_pairs", "maybe"], "--misaligned_pairs/--misaligned-pairs: expected true or false, got 'maybe"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    ],
)
def test_the_command_line_refuses_bad_values_naming_the_flag_and_choices(parser, capsys, flags, message):
    """Refused by the parser itself, before anything is loaded (before: `--lr_scheduler foo` failed after the models
    loaded, without the list of schedulers)."""
    with pytest.raises(SystemExit):
        script_args(parser, *flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--no-misaligned_pairs", "--no_misaligned_pairs", "--no-misaligned-pairs"])
def test_every_negation_of_a_boolean_works(parser, flag):
    assert script_args(parser).misaligned_pairs is True
    assert script_args(parser, flag).misaligned_pairs is False
    assert script_args(parser, "--misaligned_pairs", "false").misaligned_pairs is False
    assert script_args(parser, "--streaming").streaming is True


def test_old_flag_names_and_fingerprints_still_work(parser):
    """`--jvp_step` / `--cfg_null_mask` (the names before the settings were declared once) still parse, and a
    checkpoint that recorded them compares under the new names."""
    args = script_args(parser, "--jvp", "finite_difference", "--jvp_step", "1e-4", "--cfg_null_mask", "null")
    assert (args.finite_difference_step, args.null_branch_mask) == (1e-4, "null")
    current = run_fingerprint(args)
    older = {k: v for k, v in current.items() if k not in ("finite_difference_step", "null_branch_mask")}
    older.update(jvp_step=1e-4, cfg_null_mask="null")
    assert compare_fingerprints(older, current) == []
    assert compare_fingerprints({**older, "jvp_step": 1e-3}, current) == [
        "--finite_difference_step: 0.001 in the checkpoint, 0.0001 now"
    ]
