"""The frozen components of a run (text encoder, VAE, the teacher pipeline's files) and the teacher's transformer."""

import importlib
import importlib.util
import json
import os

from diffusers import DiffusionPipeline, SanaPipeline

from .. import (
    SanaSprintTransformer2DModel,
)
from ..models import unwrap_transformer
from ..pipelines.pipeline_sana_sprint import DEFAULT_COMPLEX_HUMAN_INSTRUCTION
from .data import (
    PromptEncoder,
)
from .feature_cache import (
    CachedPromptEncoder,
    FeatureCache,
    model_digest,
)
from .lora import fuse_teacher_lora
from .run import Run
from .sharding import full_model_state_dict
from .training_data import TrainingData, _writer_name


def load_teacher_transformer(args) -> SanaSprintTransformer2DModel:
    """The teacher pipeline's transformer, with `--teacher_lora` fused into it at `--teacher_lora_scale`."""
    teacher = SanaSprintTransformer2DModel.from_pretrained(
        args.pretrained_teacher_model_name_or_path,
        subfolder="transformer",
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )
    if args.teacher_lora is not None:
        fuse_teacher_lora(teacher, args.teacher_lora, args.teacher_lora_scale)
    return teacher


def load_pipeline_without_transformer(args) -> SanaPipeline:
    """A fresh copy of the teacher pipeline's other components (for the output folder)."""
    return SanaPipeline.from_pretrained(
        args.pretrained_teacher_model_name_or_path,
        transformer=None,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )


def gather_transformer(model, sharded: bool, is_main_process: bool):
    """The trained transformer, unsharded: itself, or under FSDP2 a full copy on the main process (None elsewhere)."""
    transformer = unwrap_transformer(model)  # through DDP
    if not sharded:
        return transformer
    state = full_model_state_dict(model)  # collective: every process calls it
    if not is_main_process:
        return None
    prefix = "transformer."
    copy = SanaSprintTransformer2DModel.from_config(transformer.config)
    copy.load_state_dict({key[len(prefix) :]: value for key, value in state.items()})
    return copy.to(transformer.device)


class FrozenComponents:
    """
    The teacher pipeline's `tokenizer`, `text_encoder` (frozen, `weight_dtype`), `vae` (frozen, fp32) and
    `scheduler`, each constructed at its first use (from the classes `model_index.json` names, as `SanaPipeline`
    loads them): with complete feature caches (`--feature_cache_dir`) a run never constructs the text encoder, and
    the VAE only to decode validation images. `constructed` lists what was built, in order.
    """

    NAMES = ("tokenizer", "text_encoder", "vae", "scheduler")

    def __init__(self, args, device, weight_dtype):
        self._args, self._device, self.weight_dtype = args, device, weight_dtype
        self._root = self._index = None
        self.constructed = []

    @property
    def root(self) -> str:
        """The teacher pipeline's local folder: the given path, or the Hub snapshot (downloaded as `from_pretrained`
        downloads it)."""
        if self._root is None:
            args = self._args
            root = args.pretrained_teacher_model_name_or_path
            if not os.path.isdir(root):
                root = DiffusionPipeline.download(
                    root, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
                )
            self._root = root
        return self._root

    def model_index(self) -> dict:
        if self._index is None:
            self._index = DiffusionPipeline.load_config(self.root)
        return self._index

    def _class(self, name: str):
        library, class_name = self.model_index()[name]
        return getattr(importlib.import_module(library), class_name)

    def config(self, name: str) -> dict:
        """The config of component `name` (e.g. the VAE's), read without constructing it."""
        return self._class(name).load_config(self.root, subfolder=name)

    def identity(self, name: str) -> str:
        """What a cache keys component `name` by: a digest of its files (`model_digest`), never constructing it."""
        return model_digest(os.path.join(self.root, name))

    def __getattr__(self, name):
        if name not in FrozenComponents.NAMES:
            raise AttributeError(name)
        kwargs = dict(subfolder=name)
        if name in ("text_encoder", "vae") and self._args.variant is not None:
            kwargs["variant"] = self._args.variant
        value = self._class(name).from_pretrained(self.root, **kwargs)
        if name == "vae":
            value.requires_grad_(False).eval().to(self._device)  # DC-AE stays fp32
        elif name == "text_encoder":
            value.requires_grad_(False).eval().to(self._device, dtype=self.weight_dtype)
        self.constructed.append(name)
        setattr(self, name, value)
        return value


def load_text_and_vae(args, device, weight_dtype) -> FrozenComponents:
    """The teacher pipeline's tokenizer, text encoder, VAE and scheduler, each loaded at its first use."""
    return FrozenComponents(args, device, weight_dtype)


def make_prompt_encoder(args, base):
    """Sana's prompt encoding (`PromptEncoder`); with `--feature_cache_dir` behind the on-disk text cache."""
    instruction = DEFAULT_COMPLEX_HUMAN_INSTRUCTION if args.complex_human_instruction else None

    def build():
        return PromptEncoder(base.tokenizer, base.text_encoder, args.max_sequence_length, instruction)

    if not args.feature_cache_dir:
        return build()
    namespace = dict(
        tokenizer=base.identity("tokenizer"),
        text_encoder=base.identity("text_encoder"),
        max_sequence_length=args.max_sequence_length,
        instruction=json.dumps(instruction),
        dtype=str(base.weight_dtype),
    )
    cache = FeatureCache(args.feature_cache_dir, "text", namespace, writer=_writer_name())
    return CachedPromptEncoder(cache, build, args.max_sequence_length)


def load_frozen_and_data(args, run: Run, patch_size: int, logger):
    r"""
    The frozen text encoder and VAE (`FrozenComponents`), the validation prompts' embeddings (or `None`) and the
    [`TrainingData`] of a run, as `(base, validation_embeds, data)`. With `--precompute_only` the feature caches are
    filled instead and `None` is returned: the run is then over.
    """
    accelerator = run.accelerator
    base = load_text_and_vae(args, accelerator.device, run.weight_dtype)
    prompt_encoder = make_prompt_encoder(args, base)
    validation_embeds = (
        prompt_encoder(args.validation_prompts, accelerator.device) if args.validation_prompts else None
    )
    data = TrainingData(args, accelerator, base, prompt_encoder, run.seed, patch_size, logger)
    if args.precompute_only:
        data.precompute(accelerator, args.validation_prompts, logger)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return None
    return base, validation_embeds, data
