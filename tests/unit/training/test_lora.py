"""training.lora: teacher + adapter; trains through the sCM JVP; saved and loaded as diffusers LoRA."""

import pytest
import torch

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel, TrigFlowScheduler
from diffusers_sprint.training import (
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SCMLossConfig,
    generator_step,
)
from diffusers_sprint.training.lora import build_lora_student, lora_state_dict


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
