"""torch.compile: no graph breaks in `forward` / `trigflow_forward`, same images, one graph for 1, 2 and 4 steps.

Kept fast: dynamo captures the graph (fullgraph) and AOTAutograd's `aot_eager` runs it, so everything but inductor's
code generation is exercised; `benchmarks/bench_pipeline.py --compile` checks inductor's images and speed.
"""

import numpy as np
import pytest
import torch
from diffusers import SCMScheduler
from torch._dynamo.backends.registry import lookup_backend

from diffusers_sprint import SanaSprintImg2ImgPipeline, SanaSprintPipeline, SanaSprintTransformer2DModel


FAST = dict(complex_human_instruction=None, output_type="np", height=32, width=32, use_resolution_binning=False)
PROMPTS = ["a red cat", "a small blue car on the big tree"]


@pytest.fixture(scope="module")
def transformer(make_diffusers_transformer):
    reference = make_diffusers_transformer(student=True)
    model = SanaSprintTransformer2DModel.from_config(reference.config)
    model.load_state_dict(reference.state_dict())
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """`aot_eager`, counting the graphs dynamo hands over (each one is a compilation)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)


def test_forward_and_trigflow_forward_have_no_graph_breaks(transformer, text_conditioning):
    embeds, mask = text_conditioning(2, seq_len=6)
    sample, time, guidance = torch.randn(2, 4, 16, 16), torch.tensor([1.2, 0.4]), torch.full((2,), 4.5)
    with torch.no_grad():
        trigflow = torch._dynamo.explain(
            lambda x, t: transformer.trigflow_forward(x, t, embeds, mask, guidance_scale=guidance).sample
        )(sample, time)
        forward = torch._dynamo.explain(
            lambda x, s: (
                transformer(
                    x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=s, guidance=0.45 * guidance
                ).sample
            )
        )(sample, time / 2)
    for explained in (trigflow, forward):
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_transformer_gives_the_same_images_with_one_graph_for_1_2_and_4_steps(
    transformer, make_text_encoder, make_tokenizer, make_vae
):
    pipe = SanaSprintPipeline(make_tokenizer(), make_text_encoder(), make_vae(), transformer, SCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    eager = {
        steps: pipe(**FAST, prompt=PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        for steps in (1, 2, 4)
    }
    backend = CountingBackend()
    pipe.transformer = torch.compile(transformer, fullgraph=True, backend=backend)
    assert type(pipe.transformer) is not SanaSprintTransformer2DModel  # the OptimizedModule is used as is
    for steps in (1, 2, 4, 2):
        got = pipe(**FAST, prompt=PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        assert np.abs(got.images - eager[steps].images).max() <= 1e-5, steps
    assert len(backend.graphs) == 1  # times are tensors: no recompilation across calls and step counts

    # Image-to-image on the same shapes reuses the graph at any strength.
    img2img = SanaSprintImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    for strength in (0.3, 0.35, 1.0):
        img2img(**FAST, prompt=PROMPTS, image=image, strength=strength, num_inference_steps=2)
    assert len(backend.graphs) == 1
