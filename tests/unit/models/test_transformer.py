"""SanaSprintTransformer2DModel: checkpoint compatibility, the TrigFlow transform, JVP, logvar head, LoRA."""

import copy
import math

import pytest
import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.embeddings import Timesteps
from peft import LoraConfig

from diffusers_sprint import SanaSprintTransformer2DModel
from diffusers_sprint.models import forward_ad_is_active


SIGMA_DATA = 0.5


def _load_ours(diffusers_model: SanaTransformer2DModel, tmp_path, **kwargs):
    diffusers_model.save_pretrained(tmp_path)
    return SanaSprintTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True, **kwargs)


def _direct_trigflow(model: SanaTransformer2DModel, x_scaled, t, embeds, mask, guidance, time_scale):
    """Prop. 3.1 written independently: x_s = x_t / (sigma_d (sin t + cos t)), F from the flow velocity v."""
    s = (torch.sin(t) / (torch.sin(t) + torch.cos(t))).view(-1, 1, 1, 1)
    x_s = x_scaled / (torch.sin(t) + torch.cos(t)).view(-1, 1, 1, 1)
    v = model(x_s, embeds, timestep=s.flatten() * time_scale, guidance=guidance, encoder_attention_mask=mask).sample
    return ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s**2) * v) * (torch.sin(t) + torch.cos(t)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("student", [True, False], ids=["sprint-student", "flow-teacher"])
def test_loads_diffusers_checkpoint_without_missing_keys_and_matches_forward(
    tmp_path, student, make_diffusers_transformer, text_conditioning
):
    reference = make_diffusers_transformer(student=student)
    ours, info = _load_ours(reference, tmp_path)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert set(ours.state_dict()) == set(reference.state_dict())

    x = torch.randn(2, 4, 16, 16)
    embeds, mask = text_conditioning()
    kwargs = dict(timestep=torch.tensor([0.3, 0.9]), encoder_attention_mask=mask)
    if student:
        kwargs["guidance"] = torch.tensor([0.45, 0.4])
    expected = reference(x, embeds, **kwargs).sample
    torch.testing.assert_close(ours(x, embeds, **kwargs).sample, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("student", [True, False], ids=["dense-time", "1000s-time"])
def test_trigflow_forward_matches_direct_transform(
    student, make_diffusers_transformer, text_conditioning, transformer_config
):
    reference = make_diffusers_transformer(student=student)
    ours = SanaSprintTransformer2DModel(**transformer_config(student=student)).eval()
    ours.load_state_dict(reference.state_dict())
    assert ours.effective_flow_time_scale == (1.0 if student else 1000.0)

    x_scaled = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0.05, 0.8, math.pi / 2])
    embeds, mask = text_conditioning(batch_size=3)
    w = torch.tensor([3.0, 4.5, 5.0]) if student else None
    guidance = None if w is None else w * 0.1
    expected = _direct_trigflow(reference, x_scaled, t, embeds, mask, guidance, ours.effective_flow_time_scale)
    with torch.no_grad():
        got = ours.trigflow_forward(x_scaled, t, embeds, mask, guidance_scale=w).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flow_time_scale_config_overrides_default(transformer_config):
    model = SanaSprintTransformer2DModel(**transformer_config(student=False), flow_time_scale=1.0)
    assert model.effective_flow_time_scale == 1.0
    model = SanaSprintTransformer2DModel(**transformer_config(student=False), timestep_scale=2.0)
    assert model.effective_flow_time_scale == 2000.0


def _jvp_relative_error(float64_timestep_projection, model, x, t, embeds, mask, w, tangent_x, tangent_t):
    def velocity(m, x_, t_):
        return m.trigflow_forward(x_, t_, embeds.to(x_.dtype), mask, guidance_scale=w).sample

    _, jvp = torch.func.jvp(lambda x_, t_: velocity(model, x_, t_), (x, t), (tangent_x, tangent_t))
    # Central differences on a float64 copy. diffusers embeds time in fp32 even in a float64 model, so the copy's
    # sinusoidal time projections are swapped for float64 ones; Sana's linear attention still casts to fp32, which
    # with the ReLU kinks puts the best step near h = 1e-4 (reference error ~1e-4, measured).
    model64 = copy.deepcopy(model).double()
    for module in model64.modules():
        if isinstance(module, Timesteps):
            module.forward = float64_timestep_projection(module)
    x64, t64, tx64, tt64 = (a.double() for a in (x, t, tangent_x, tangent_t))
    h = 1e-4
    with torch.no_grad():
        plus = velocity(model64, x64 + h * tx64, t64 + h * tt64)
        minus = velocity(model64, x64 - h * tx64, t64 - h * tt64)
    finite_difference = (plus - minus) / (2 * h)
    return ((jvp.double() - finite_difference).norm() / finite_difference.norm()).item()


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded-mask"])
def test_jvp_matches_finite_differences_with_default_settings(
    padded, float64_timestep_projection, make_sprint_transformer, text_conditioning
):
    model = make_sprint_transformer(student=True)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.4, 1.2])
    embeds, mask = text_conditioning(padded=padded)
    tangent_x, tangent_t = torch.randn_like(x), torch.cos(t) * torch.sin(t)
    error = _jvp_relative_error(
        float64_timestep_projection, model, x, t, embeds, mask, torch.tensor([4.0, 5.0]), tangent_x, tangent_t
    )
    assert error <= 1e-3


def test_jvp_with_lora_adapter_matches_finite_differences(
    float64_timestep_projection, make_sprint_transformer, text_conditioning
):
    model = make_sprint_transformer(student=True)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the function
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.7, 1.0])
    embeds, mask = text_conditioning()
    error = _jvp_relative_error(
        float64_timestep_projection,
        model,
        x,
        t,
        embeds,
        mask,
        torch.tensor([4.5, 4.5]),
        torch.randn_like(x),
        torch.tensor([0.3, -0.2]),
    )
    assert error <= 1e-3


def test_stock_diffusers_model_jvp_fails_on_cpu_but_ours_does_not(
    make_diffusers_transformer, text_conditioning, transformer_config
):
    """Guards the reason for the JVP-safe path: if PyTorch gains forward AD for fused SDPA, revisit the design."""
    reference = make_diffusers_transformer(student=False)
    x = torch.randn(1, 4, 16, 16)
    embeds, mask = text_conditioning(batch_size=1, padded=False)

    def stock(x_):
        return reference(x_, embeds, timestep=torch.tensor([500.0]), encoder_attention_mask=mask).sample

    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(stock, (x,), (torch.ones_like(x),))
    ours = SanaSprintTransformer2DModel(**transformer_config(student=False)).eval()
    ours.load_state_dict(reference.state_dict())
    primal, _ = torch.func.jvp(
        lambda x_: ours(x_, embeds, timestep=torch.tensor([500.0]), encoder_attention_mask=mask).sample,
        (x,),
        (torch.ones_like(x),),
    )
    torch.testing.assert_close(primal, stock(x), rtol=0, atol=1e-5)
    assert not forward_ad_is_active()


def test_logvar_head_is_initialised_when_checkpoint_lacks_it(tmp_path, make_diffusers_transformer, text_conditioning):
    reference = make_diffusers_transformer(student=True)
    ours, info = _load_ours(reference, tmp_path, logvar_head=True)
    assert sorted(info["missing_keys"]) == ["logvar_linear.bias", "logvar_linear.weight"]
    assert not ours.logvar_linear.weight.is_meta
    assert torch.count_nonzero(ours.logvar_linear.weight) == 0 and torch.count_nonzero(ours.logvar_linear.bias) == 0
    x = torch.randn(2, 4, 16, 16)
    embeds, mask = text_conditioning()
    out = ours.trigflow_forward(x, torch.tensor([0.3, 1.0]), embeds, mask, guidance_scale=4.5, return_logvar=True)
    assert out.logvar.shape == (2, 1)
    torch.testing.assert_close(out.logvar, torch.zeros(2, 1))

    # Trained head values survive a save/load round trip, and diffusers' class still loads the folder.
    with torch.no_grad():
        ours.logvar_linear.bias.fill_(0.25)
    ours.save_pretrained(tmp_path / "ours")
    again = SanaSprintTransformer2DModel.from_pretrained(tmp_path / "ours")
    assert again.config.logvar_head and again.logvar_linear.bias.item() == 0.25
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_trigflow_forward_argument_errors(text_conditioning, transformer_config):
    student = SanaSprintTransformer2DModel(**transformer_config(student=True))
    teacher = SanaSprintTransformer2DModel(**transformer_config(student=False))
    x = torch.randn(1, 4, 16, 16)
    embeds, mask = text_conditioning(batch_size=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        student.trigflow_forward(x, 1.0, embeds, mask)
    with pytest.raises(ValueError, match="guidance_scale"):
        teacher.trigflow_forward(x, 1.0, embeds, mask, guidance_scale=4.5)
    with pytest.raises(ValueError, match="logvar_head"):
        teacher.trigflow_forward(x, 1.0, embeds, mask, return_logvar=True)


def test_lora_scale_changes_output_and_zero_restores_base(make_sprint_transformer, text_conditioning):
    model = make_sprint_transformer(student=True)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([1.0, 0.5])
    embeds, mask = text_conditioning()
    with torch.no_grad():
        base = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5).sample
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
        full = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5).sample
        half = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5, attention_kwargs={"scale": 0.5}).sample
        off = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5, attention_kwargs={"scale": 0.0}).sample
    assert (full - base).abs().max() > 1e-3
    assert (half - base).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("student", [True, False], ids=["guidance-embedder", "adaln-single"])
def test_time_embedding_stays_fp32_under_bf16_autocast(student, make_diffusers_transformer, transformer_config):
    reference = make_diffusers_transformer(student=student)
    ours = SanaSprintTransformer2DModel(**transformer_config(student=student)).eval()
    ours.load_state_dict(reference.state_dict())
    timestep = torch.tensor([0.31, 0.77]) * (1.0 if student else 1000.0)
    kwargs = dict(guidance=torch.tensor([0.45, 0.4])) if student else dict(batch_size=2)
    with torch.no_grad():
        exact = [o.to(torch.bfloat16) for o in ours.time_embed(timestep, hidden_dtype=torch.float32, **kwargs)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_autocast = ours.time_embed(timestep, hidden_dtype=torch.bfloat16, **kwargs)
            diffusers_autocast = reference.time_embed(timestep, hidden_dtype=torch.bfloat16, **kwargs)
    for got, want, half in zip(ours_autocast, exact, diffusers_autocast):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)  # only the final rounding to bf16
        assert not torch.equal(half, want)  # diffusers' path rounds inside the MLP too


def test_compile_repeated_blocks_compiles_each_block_and_keeps_the_output(text_conditioning, transformer_config):
    """`_repeated_blocks` (unset on diffusers' Sana) makes diffusers' regional compilation work: every block gets
    a compiled call, Dynamo captures one graph per block and none for the rest of the model (a whole-model compile
    would give one), a second call reuses them, and the output is eager's."""
    torch._dynamo.reset()
    model = SanaSprintTransformer2DModel(**transformer_config(student=True)).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 1.2])
    embeds, mask = text_conditioning(batch_size=2)
    with torch.no_grad():
        eager = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5).sample
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        model.compile_repeated_blocks(backend=counting_backend)
        compiled = model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5).sample
        graphs_after_first_call = len(graphs)
        model.trigflow_forward(x, t, embeds, mask, guidance_scale=4.5)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)
    assert len(model.transformer_blocks) == 2 and graphs_after_first_call == 2 and len(graphs) == 2
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
