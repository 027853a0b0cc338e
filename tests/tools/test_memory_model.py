"""benchmarks/memory_model.py: parameter counts against hand arithmetic, and what FSDP2 divides by the rank count."""

import json
import math

import pytest
import torch
from fixtures.parameter_counts import hand_count_transformer

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.training.teacher import build_student


@pytest.fixture(scope="module")
def memory_model(load_module):
    return load_module("benchmarks/memory_model.py")


@pytest.fixture(scope="module")
def sana_configs(load_module):
    return load_module("benchmarks/sana_configs.py")


@pytest.fixture(scope="module")
def tiny_config(sana_configs):
    return sana_configs.TINY_TRANSFORMER


def hand_count_head(channels: int, kernel: int = 9) -> tuple[int, int]:
    """(parameters, spectral-norm buffers) of one DiscriminatorHead as wide as its input."""
    params = (channels * channels + channels) + 2 * channels  # conv_in, BatchNormLocal affine
    params += (channels * channels * kernel + channels) + 2 * channels  # residual conv, its norm
    params += channels + 1  # conv_out to one channel
    buffers = (channels + channels) + (channels + channels * kernel) + (1 + channels)  # (u, v) per conv
    return params, buffers


def test_parameter_counts_match_hand_arithmetic(memory_model, tiny_config):
    models = memory_model.build_training_models(tiny_config, "tiny")
    assert models.student.numel == hand_count_transformer(tiny_config, guidance=True, logvar=True)
    assert models.teacher.numel == hand_count_transformer(tiny_config, guidance=False, logvar=False)
    width = tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]
    head_params, head_buffers = hand_count_head(width)
    assert len(models.head_block_ids) == tiny_config["num_layers"]  # 2 layers -> heads on blocks 0 and 1
    assert models.heads.numel == len(models.head_block_ids) * head_params
    assert models.heads.buffer_numel == len(models.head_block_ids) * head_buffers
    assert len(models.student.units) == tiny_config["num_layers"]


def test_meta_student_matches_build_student(memory_model, sana_configs, tiny_config):
    """The meta-built student (teacher config + guidance embedder + logvar head) is the one training builds."""
    teacher = SanaSprintTransformer2DModel(
        **sana_configs.teacher_config(tiny_config), flow_time_scale=1.0
    )  # dense time
    student = build_student(teacher)
    models = memory_model.build_training_models(tiny_config)
    assert models.student.numel == sum(parameter.numel() for parameter in student.parameters())
    assert sorted(models.student.all) == sorted(parameter.shape for parameter in student.parameters())


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_sharded_numel_is_fsdp2_dim0_chunking(world_size, memory_model, sana_configs, tiny_config):
    """`torch.chunk` along dim 0 gives the largest shard; FSDP2 pads every rank to it."""
    model = SanaSprintTransformer2DModel(**sana_configs.student_config(tiny_config))
    expected = sum(torch.chunk(parameter, world_size, dim=0)[0].numel() for parameter in model.parameters())
    assert memory_model.sharded_numel([parameter.shape for parameter in model.parameters()], world_size) == expected


def test_fsdp2_divides_student_states_and_optionally_teacher_and_heads(memory_model, tiny_config):
    models = memory_model.build_training_models(tiny_config)
    student_shard = memory_model.sharded_numel(models.student.all, 4)
    ddp = memory_model.memory_per_rank(models, "ddp", 4, memory_model.MemoryOptions())
    fsdp = memory_model.memory_per_rank(models, "fsdp2", 4, memory_model.MemoryOptions())
    assert ddp["student_params"] == 4 * models.student.numel
    assert (fsdp["student_params"], fsdp["student_grads"], fsdp["adam_states"]) == (
        4 * student_shard,
        4 * student_shard,
        8 * student_shard,
    )
    assert fsdp["teacher"] == ddp["teacher"] == 2 * models.teacher.numel  # bf16, replicated
    assert fsdp["heads"] == ddp["heads"]
    sharded = memory_model.memory_per_rank(
        models, "fsdp2", 4, memory_model.MemoryOptions(shard_teacher=True, shard_heads=True)
    )
    assert sharded["teacher"] == 2 * memory_model.sharded_numel(models.teacher.all, 4)
    assert sharded["heads"] == 16 * memory_model.sharded_numel(models.heads.all, 4) + 4 * models.heads.buffer_numel
    fp32 = memory_model.memory_per_rank(models, "ddp", 4, memory_model.MemoryOptions(teacher_dtype="fp32"))
    assert fp32["teacher"] == 2 * ddp["teacher"]
    # DDP: a gradient bucket per replicated trainable parameter, none with one process or with bucket views.
    assert ddp["comm"] == 4 * (models.student.numel + models.heads.numel)
    assert memory_model.memory_per_rank(models, "ddp", 1, memory_model.MemoryOptions())["comm"] == 0
    assert (
        memory_model.memory_per_rank(models, "ddp", 4, memory_model.MemoryOptions(ddp_bucket_view=True))["comm"] == 0
    )
    assert ddp["total"] == sum(value for key, value in ddp.items() if key != "total")


@pytest.mark.parametrize("world_size", [8, 32])
def test_released_1_6b_fsdp2_divides_by_rank_count(world_size, memory_model, sana_configs):
    """On the real 1.6B config, the sharded student states are 1/N of DDP's up to FSDP2's padding (< 0.1 %)."""
    models = memory_model.build_training_models(sana_configs.transformer_config("1.6B"))
    assert models.student.numel == pytest.approx(1.610e9, rel=5e-3)  # 1,610.2 M (docs/performance.md)
    ddp = memory_model.memory_per_rank(models, "ddp", world_size, memory_model.MemoryOptions())
    fsdp = memory_model.memory_per_rank(models, "fsdp2", world_size, memory_model.MemoryOptions(shard_teacher=True))
    for key in ("student_params", "student_grads", "adam_states", "teacher"):
        assert fsdp[key] >= ddp[key] / world_size
        assert fsdp[key] == pytest.approx(ddp[key] / world_size, rel=1e-3)
    assert fsdp["heads"] == ddp["heads"]


def test_bad_arguments_are_named(memory_model, sana_configs, tiny_config):
    models = memory_model.build_training_models(tiny_config)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        memory_model.memory_per_rank(models, "zero3", 8, memory_model.MemoryOptions())
    with pytest.raises(ValueError, match="`world_size` must be >= 1"):
        memory_model.memory_per_rank(models, "ddp", 0, memory_model.MemoryOptions())
    with pytest.raises(ValueError, match="`teacher_dtype` must be one of"):
        memory_model.MemoryOptions(teacher_dtype="int8")
    with pytest.raises(ValueError, match="Unknown model '2B'"):
        sana_configs.resolve_model_name("2B")


def test_cli_writes_json(tmp_path, capsys, memory_model):
    path = tmp_path / "memory.json"
    memory_model.main(["--models", "0.6B", "--ranks", "1", "8", "--json", str(path)])
    report = json.loads(path.read_text())
    assert len(report["rows"]) == 3 * 2  # DDP, FSDP2 teacher replicated, FSDP2 teacher sharded x 2 rank counts
    row = next(r for r in report["rows"] if r["layout"] == "fsdp2" and r["world_size"] == 8)
    assert math.isclose(row["gib"]["total"], row["bytes"]["total"] / 2**30)
    assert "| sana-sprint-0.6b | DDP | 8 |" in capsys.readouterr().out
