"""models.TrigFlowInputs (one model call), DistillationBatch.model_inputs, and models.unwrap_model."""

import pytest
import torch

from diffusers_sprint.models import TrigFlowInputs, TrigFlowModel, unwrap_model, unwrap_transformer
from diffusers_sprint.training import DistillationBatch


class RecordingModel(torch.nn.Module):
    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return (args[0] * 2,)


def _inputs(batch_size=3, control=True, mask=True, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return TrigFlowInputs(
        torch.randn(batch_size, 4, 2, 2, generator=generator, dtype=dtype),
        torch.linspace(0.1, 1.5, batch_size, dtype=dtype),
        torch.randn(batch_size, 5, 8, generator=generator, dtype=dtype),
        torch.ones(batch_size, 5, dtype=torch.long) if mask else None,
        torch.arange(batch_size, dtype=dtype) + 4,
        torch.randn(batch_size, 4, 2, 2, generator=generator, dtype=dtype) if control else None,
    )


@pytest.mark.parametrize("control", [False, True])
def test_call_passes_the_control_latents_only_when_there_are_some(control):
    inputs, model = _inputs(control=control), RecordingModel()
    (out,) = inputs.call(model, return_logvar=True)
    assert torch.equal(out, 2 * inputs.x_t_scaled)
    assert model.args == (inputs.x_t_scaled, inputs.t, inputs.prompt_embeds, inputs.prompt_attention_mask)
    expected = {"guidance_scale", "return_logvar"} | ({"controlnet_cond"} if control else set())
    assert set(model.kwargs) == expected and model.kwargs["guidance_scale"] is inputs.guidance
    if control:
        assert model.kwargs["controlnet_cond"] is inputs.control


def test_rows_and_cat_are_inverse_and_cast_to_the_first_calls_dtypes():
    inputs = _inputs(batch_size=4)
    first, rest = inputs.rows(torch.tensor([0, 1])), inputs.rows(slice(2, None))
    assert first.x_t_scaled.shape == (2, 4, 2, 2) and torch.equal(first.control, inputs.control[:2])
    joined = first.cat(rest)
    for name in ("x_t_scaled", "t", "prompt_embeds", "prompt_attention_mask", "guidance", "control"):
        assert torch.equal(getattr(joined, name), getattr(inputs, name)), name
    mixed = first.cat(_inputs(batch_size=1, dtype=torch.float64))
    assert mixed.x_t_scaled.dtype == mixed.guidance.dtype == torch.float32 and mixed.t.shape == (3,)
    assert inputs.replace(guidance=4.5).rows(slice(0, 1)).guidance == 4.5  # a float guidance is not per row


def test_cat_refuses_a_field_given_on_one_side_only():
    with pytest.raises(ValueError) as error:
        _inputs(mask=True).cat(_inputs(mask=False))
    assert str(error.value) == (
        "`TrigFlowInputs.cat`: `prompt_attention_mask` must be a per-row tensor in both inputs or `None` in both, "
        "got Tensor and NoneType."
    )
    with pytest.raises(ValueError, match="`guidance` must be a per-row tensor in both inputs"):
        _inputs().replace(guidance=4.5).cat(_inputs())


def test_batch_model_inputs_select_the_captions_and_control_of_rows():
    inputs = _inputs(batch_size=3)
    batch = DistillationBatch(
        inputs.x_t_scaled, inputs.prompt_embeds, inputs.prompt_attention_mask, inputs.prompt_embeds[:1], None,
        control_latents=inputs.control,
    )  # fmt: skip
    rows = torch.tensor([2, 0])
    picked = batch.model_inputs(inputs.x_t_scaled[rows], inputs.t[rows], inputs.guidance[rows], rows)
    expected = inputs.rows(rows)
    for name in ("x_t_scaled", "t", "prompt_embeds", "prompt_attention_mask", "guidance", "control"):
        assert torch.equal(getattr(picked, name), getattr(expected, name)), name
    assert batch.model_inputs(inputs.x_t_scaled, inputs.t).guidance is None


class DuckWrapper(torch.nn.Module):
    """A DDP-like wrapper: the wrapped module is the submodule `module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_unwrap_model_peels_compile_and_ddp_like_wrappers_at_any_nesting(make_sprint_transformer):
    transformer = make_sprint_transformer()
    model = TrigFlowModel(transformer)
    wrapped = torch.compile(DuckWrapper(torch.compile(DuckWrapper(model))))  # compile(DDP(compile(DDP(model))))
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    assert unwrap_transformer(wrapped) is transformer and unwrap_transformer(transformer) is transformer
    assert unwrap_model(transformer) is transformer
