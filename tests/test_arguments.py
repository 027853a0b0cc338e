"""training.arguments: range checks of the training flags and the run fingerprint."""

import importlib.util
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from diffusers_sprint.training.arguments import (
    _SCHEDULER_FLAGS,
    FINGERPRINT_COMMON,
    FINGERPRINT_DISTILL,
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_TEACHER,
    compare_fingerprints,
    read_fingerprint,
    run_fingerprint,
    validate_training_args,
    write_fingerprint,
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _parser(name: str):
    sys.path.insert(0, str(EXAMPLES))  # the scripts import training_common.py from their folder
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_for_arguments", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module.build_parser()


@pytest.fixture(scope="module")
def parser():
    return _parser("train_sana_sprint")


@pytest.fixture(scope="module")
def teacher_parser():
    return _parser("prepare_sana_sprint_teacher")


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
    (dict(jvp_step=0.0), "--jvp_step must be in (0, 0.1] radians (got 0.0)"),
    (dict(jvp_step=0.5), "--jvp_step must be in (0, 0.1] radians"),
    (dict(max_grad_norm=NAN), "--max_grad_norm must be a finite number (got nan)"),
    (dict(max_grad_norm=-INF), "--max_grad_norm must be a finite number"),
    (dict(lora_rank=4, lora_alpha=0.0), "--lora_alpha must be > 0 (the LoRA scale is alpha / rank) (got 0.0)"),
    (dict(lora_rank=4, lora_alpha=-8.0), "--lora_alpha must be > 0"),
    (dict(lora_alpha=4.0), "--lora_alpha applies only with --lora_rank"),
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


def test_every_script_flag_is_classified_once(parser, teacher_parser):
    dests = {action.dest for p in (parser, teacher_parser) for action in p._actions if action.dest != "help"}
    lists = [
        FINGERPRINT_COMMON,
        FINGERPRINT_DISTILL,
        FINGERPRINT_TEACHER,
        tuple(_SCHEDULER_FLAGS),
        FINGERPRINT_EXCLUDED,
    ]
    listed = [name for names in lists for name in names]
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    assert dests - set(listed) == set(), "classify the new flags in training/arguments.py"
    assert set(listed) - dests <= {"stage"}, "fingerprint lists name unknown flags"  # stage: set by each script


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
    """--jvp / --jvp_step / --compile_jvp become `SCMLossConfig.jvp` / `finite_difference_step` / `compile_jvp`; a bad
    --jvp is refused by argparse."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("train_sana_sprint_for_jvp", EXAMPLES / "train_sana_sprint.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    args = script_args(parser, "--jvp", "finite_difference", "--jvp_step", "1e-4", sigma_data=0.5)
    scm = module.distillation_config(args, sharded=False).scm
    assert (scm.jvp, scm.finite_difference_step) == ("finite_difference", 1e-4)
    assert module.distillation_config(script_args(parser, sigma_data=0.5), sharded=False).scm.jvp == "exact"
    with pytest.raises(SystemExit):
        script_args(parser, "--jvp", "fd")
    assert "jvp_step" in run_fingerprint(args) and "jvp_step" not in run_fingerprint(script_args(parser))
    compiled = script_args(parser, "--compile_jvp", sigma_data=0.5)
    assert module.distillation_config(compiled, sharded=False).scm.compile_jvp
    assert not module.distillation_config(script_args(parser, sigma_data=0.5), sharded=False).scm.compile_jvp
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
