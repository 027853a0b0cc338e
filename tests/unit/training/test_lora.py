"""training.lora: teacher + adapter; trains through the sCM JVP; saved and loaded as diffusers LoRA."""

import pytest
import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from safetensors.torch import save_file

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.training import (
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SCMLossConfig,
    generator_step,
)
from diffusers_sprint.training.lora import build_lora_student, fuse_teacher_lora, lora_state_dict


@pytest.fixture(scope="module")
def teacher(transformer_config):
    torch.manual_seed(0)
    model = SanaSprintTransformer2DModel(**transformer_config(student=False, sample_size=8), flow_time_scale=1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval().requires_grad_(False)


def _inputs(text_conditioning, batch=2):
    embeds, mask = text_conditioning(batch, seq_len=6)
    return torch.randn(batch, 4, 8, 8), torch.tensor([0.4, 1.2])[:batch], embeds, mask


def test_lora_student_starts_as_the_teacher_and_trains_only_the_adapter_and_logvar(teacher, text_conditioning):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_lora_student(teacher, rank=4, alpha=8)
    x, t, embeds, mask = _inputs(text_conditioning)
    with torch.no_grad():
        torch.testing.assert_close(
            student.trigflow_forward(x, t, embeds, mask).sample, teacher.trigflow_forward(x, t, embeds, mask).sample
        )
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("logvar_linear") for name in trainable)
    assert any(name.startswith("logvar_linear") for name in trainable)
    assert not student.config.guidance_embeds and student.config.logvar_head
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in teacher_storage for p in student.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_lora_student_gets_sCM_gradients_through_the_jvp(teacher, text_conditioning):
    student = build_lora_student(teacher, rank=2)
    embeds, mask = text_conditioning(2, seq_len=6)
    batch = DistillationBatch(torch.randn(2, 4, 8, 8) * 0.5, embeds, mask, torch.zeros(1, 6, 16), mask[1:])
    config = DistillationConfig(
        scm=SCMLossConfig(tangent_warmup_steps=1, guidance_scales=(4.5,)), adversarial_lambda=0
    )
    out = generator_step(student, teacher, None, batch, DistillationState(3), config, generator=torch.Generator())
    out.loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
    assert all(p.grad is None for p in teacher.parameters())


def test_saved_adapter_loads_onto_the_teacher_pipeline_and_fuses(
    teacher, tmp_path, make_text_encoder, make_tokenizer, make_vae, text_conditioning
):
    student = build_lora_student(teacher, rank=4)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    SanaSprintPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora_state_dict(student))
    pipe = SanaSprintPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=SanaSprintTransformer2DModel.from_config(teacher.config),
        scheduler=TrigFlowScheduler(),
    )
    pipe.transformer.load_state_dict(teacher.state_dict())
    pipe.load_lora_weights(tmp_path)
    x, t, embeds, mask = _inputs(text_conditioning)
    with torch.no_grad():
        expected = student.trigflow_forward(x, t, embeds, mask).sample
        torch.testing.assert_close(pipe.transformer.trigflow_forward(x, t, embeds, mask).sample, expected)
        assert (expected - teacher.trigflow_forward(x, t, embeds, mask).sample).abs().max() > 1e-3
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = pipe.transformer.trigflow_forward(x, t, embeds, mask).sample
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_errors(teacher, transformer_config):
    student_like = SanaSprintTransformer2DModel(**transformer_config(student=True, sample_size=8))
    with pytest.raises(ValueError, match="guidance embedder"):
        build_lora_student(student_like, rank=4)
    with pytest.raises(ValueError, match="rank"):
        build_lora_student(teacher, rank=0)


def _random_lora(teacher, folder, rank=4, seed=1):
    """A diffusers-format LoRA of `teacher` with random `lora_B` (a stand-in for a user's style LoRA) in `folder`."""
    adapted = build_lora_student(teacher, rank=rank, logvar_head=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    SanaSprintPipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(adapted))
    return folder


def _copy(teacher):
    copy = SanaSprintTransformer2DModel.from_config(teacher.config)
    copy.load_state_dict(teacher.state_dict())
    return copy.eval().requires_grad_(False)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_fused_teacher_lora_equals_the_adapter_at_its_scale_and_leaves_no_adapter(
    teacher, text_conditioning, tmp_path, scale
):
    style = _random_lora(teacher, tmp_path / "style")
    with_adapter = _copy(teacher)
    with_adapter.load_lora_adapter(
        str(style), weight_name=LORA_WEIGHT_NAME_SAFE, prefix="transformer", adapter_name="style"
    )
    with_adapter.set_adapters(["style"], [scale])
    fused = fuse_teacher_lora(_copy(teacher), str(style), scale)
    x, t, embeds, mask = _inputs(text_conditioning)
    with torch.no_grad():
        expected = with_adapter.trigflow_forward(x, t, embeds, mask).sample
        got = fused.trigflow_forward(x, t, embeds, mask).sample
        assert (expected - teacher.trigflow_forward(x, t, embeds, mask).sample).abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-5
    assert not any("lora" in key for key in fused.state_dict())
    assert set(fused.state_dict()) == set(teacher.state_dict())
    # a LoRA student built on the personalised teacher starts as it (no clash with the teacher's adapter)
    student = build_lora_student(fused, rank=2)
    with torch.no_grad():
        assert (student.trigflow_forward(x, t, embeds, mask).sample - got).abs().max() <= 1e-6


def test_fused_teacher_lora_errors_name_the_argument(teacher, transformer_config, tmp_path):
    missing = tmp_path / "no_such_lora"
    with pytest.raises(ValueError, match=r"`--teacher_lora` '.*no_such_lora' is not a readable diffusers LoRA"):
        fuse_teacher_lora(_copy(teacher), str(missing))
    not_lora = tmp_path / "model.safetensors"
    save_file(teacher.state_dict(), str(not_lora))
    with pytest.raises(ValueError, match=r"`--teacher_lora` '.*model.safetensors' .*holds no LoRA weights"):
        fuse_teacher_lora(_copy(teacher), str(not_lora))
    wider = dict(num_attention_heads=4, num_cross_attention_heads=4, cross_attention_dim=32)
    other = SanaSprintTransformer2DModel(**transformer_config(student=False, sample_size=8, **wider))
    wrong_size = _random_lora(other.eval(), tmp_path / "wrong_size")
    with pytest.raises(ValueError, match=r"`--teacher_lora` '.*wrong_size' does not fit the teacher transformer"):
        fuse_teacher_lora(_copy(teacher), str(wrong_size))
    style = _random_lora(teacher, tmp_path / "style")
    with pytest.raises(ValueError, match=r"`--teacher_lora_scale` must be > 0, got 0.0"):
        fuse_teacher_lora(_copy(teacher), str(style), 0.0)
