"""Fixtures of the pipeline tests."""

import pytest
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline
from diffusers import SCMScheduler


@pytest.fixture(scope="module")
def save_diffusers_pipeline(tmp_path_factory, make_diffusers_transformer, make_text_encoder, make_tokenizer, make_vae):
    """`save(pipeline_class)`: a folder written by one of diffusers' own Sprint pipelines' `save_pretrained`
    (diffusers class names inside), on the tiny components."""

    def save(pipeline_class):
        reference = pipeline_class(
            tokenizer=make_tokenizer(),
            text_encoder=make_text_encoder(),
            vae=make_vae(),
            transformer=make_diffusers_transformer(student=True),
            scheduler=SCMScheduler(),
        )
        folder = tmp_path_factory.mktemp(pipeline_class.__name__)
        reference.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="module")
def diffusers_dir(save_diffusers_pipeline):
    """A folder written by diffusers' own SanaSprintPipeline."""
    return save_diffusers_pipeline(DiffusersSanaSprintPipeline)
