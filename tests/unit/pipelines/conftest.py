"""Fixtures of the pipeline tests."""

import pytest
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers import SCMScheduler


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory, make_diffusers_transformer, make_text_encoder, make_tokenizer, make_vae):
    """A folder written by diffusers' own SanaSprintPipeline.save_pretrained (diffusers class names inside), on the
    tiny components."""
    reference = DiffusersSanaSprintPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=make_diffusers_transformer(student=True),
        scheduler=SCMScheduler(),
    )
    folder = tmp_path_factory.mktemp("diffusers_sprint_pipeline")
    reference.save_pretrained(folder)
    return folder
