"""One-command GPU check of the released model sizes, with random weights (no downloads).

Checks (each one function, registered in `CHECKS`; more can be appended with `@register_check`):

- `pipeline_latency` (issue 15, item 4a): Sana-Sprint 0.6B and 1.6B transformers in their released configs plus the
  DC-AE f32c32 decoder (`benchmarks/sana_configs.py`), random weights, 1024 px, bf16. Ours
  (`diffusers_sprint.SanaSprintPipeline` on `SanaSprintTransformer2DModel`) against diffusers' `SanaSprintPipeline`
  on the **same weight tensors**, eager and `torch.compile`d (each transformer block compiled, diffusers' regional
  compilation; `--compile full` compiles the whole transformer), the transformer alone (one forward on identical
  inputs) and the pipeline end to end at 1 and 4 steps. Ours / diffusers ratios come from interleaved calls in the
  same run. The text encoder is a **one-layer random Gemma-2 at Gemma-2 2B's width** (2304) with a locally trained
  tokenizer, so "end to end" covers tokenisation, prompt encoding through that stand-in, sampling and VAE decoding,
  but not the 25 further layers of the real Gemma-2 2B; the prompt is encoded without Sana's
  `complex_human_instruction`. Images of both pipelines are compared (max abs difference of the `np` output).
- `jvp_math_kernel` (issue 15, item 4c): `torch.func.jvp` of our `trigflow_forward` (0.6B config, fp32, 1024 px,
  padded captions) called with default settings, i.e. no `sdpa_kernel` context from the caller: the model must pick
  the math SDPA kernel itself. The tangent is compared with a central finite difference, the JVP's primal with the
  plain forward (which may use the fused kernels), and the same JVP on diffusers' stock `SanaTransformer2DModel`
  with the same weights is run as a control (expected to fail on fused kernels). Also the JVP under bf16 autocast
  (the training precision) against the fp32 one. TF32 is switched off inside this check.
- `train_step` (issue 15, item 4b): the distillation step of `diffusers_sprint.training` on the 0.6B config at
  1024 px (32 x 32 latents), batch 2, 300-token padded captions: a random-weight Sprint teacher (fp32, no guidance
  embedder), `build_student(teacher, logvar_head=True)`, `SanaDiscriminator(teacher, default_head_block_ids(28))`,
  fp32 master weights, AdamW, `torch.autocast(bf16)` around `generator_step` / `discriminator_step` (backward, clip
  and `step_if_finite` outside it), as examples/train_sana_sprint.py and benchmarks/bench_train_step.py do. The G
  step, sCM only and sCM+LADD, with the exact JVP (math SDPA, picked by the model), `jvp="finite_difference"` (fp32
  forwards on the fused kernels; central under autocast) and `compile_jvp=True` (backend `--compile-backend`), and
  the D step: median wall time of `--train-repeats` interleaved steps (after `--warmup`), in ms and in
  forward-equivalents (the student's no-grad forward under the same autocast is the unit; target <= 9 for the
  sCM+LADD G step), and peak memory per step (CUDA). First, before any update, every G variant's loss and tangent
  statistics on the same weights and draws against the exact JVP's (finite difference within 5e-2, compiled JVP
  2e-2; also the finite difference with TF32 off), and the compile time of the first compiled call.

It prints one table and writes JSON (`--json`). `--smoke` runs the same code paths on tiny configs, on the CPU in
a few seconds (`torch.compile` with the `eager` backend: Dynamo traces, no Inductor code generation; the training
step under CPU bf16 autocast); `tests/tools/test_gpu_check.py` runs it.

    bash benchmarks/gpu_check.sh                       # full check on one GPU, <= 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --smoke             # tiny, CPU
    python benchmarks/gpu_check.py --checks jvp_math_kernel --json jvp.json
    python benchmarks/gpu_check.py --checks train_step --train-repeats 10
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import diffusers  # noqa: E402
import sana_configs  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from distillation_inputs import random_distillation_inputs, update  # noqa: E402
from transformers import Gemma2Config, Gemma2Model  # noqa: E402

import diffusers_sprint  # noqa: E402
from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.models import TrigFlowInputs, TrigFlowModel  # noqa: E402
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer  # noqa: E402
from diffusers_sprint.training import (  # noqa: E402
    DistillationBatch,
    DistillationConfig,
    DistillationState,
    SanaDiscriminator,
    SCMLossConfig,
    build_student,
    default_head_block_ids,
    discriminator_step,
    generator_step,
)
from diffusers_sprint.training import tangent as tangent_module  # noqa: E402
from diffusers_sprint.training.tangent import (  # noqa: E402
    DEFAULT_FINITE_DIFFERENCE_STEP,
    trigflow_velocity_finite_difference,
)


PROMPT = "a small red cat sitting on a blue house under the moon"
WORDS = (
    "a an the of on in with and under over red green blue yellow black white small big cat dog car tree house "
    "moon sun sitting standing photo painting"
).split()
GUIDANCE_SCALE = 4.5
# Paper (SANA-Sprint, H100, 1024 px, 1 step): ~0.1 s end to end, transformer ~0.03 s for the 1.6B model.
PAPER_REFERENCE = "paper, 1.6B on H100: 0.10 s end to end, transformer ~0.03 s"


@dataclasses.dataclass
class CheckContext:
    """What every check gets: the device, dtype, sizes and timing settings (tiny ones under `--smoke`)."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    models: list[str]
    image_size: int
    steps: list[int]
    repeats: int
    warmup: int
    compile_mode: str
    compile_backend: str
    jvp_model: str
    jvp_step: float
    train_model: str = "0.6B"
    train_batch: int = 2
    train_repeats: int = 5
    train_compile_jvp: bool = True
    seed: int = 0

    def transformer_config(self, name: str) -> dict:
        if self.smoke:
            return copy.deepcopy(sana_configs.TINY_TRANSFORMER)
        return sana_configs.transformer_config(name)

    def vae_config(self) -> dict:
        return copy.deepcopy(sana_configs.TINY_DC_AE if self.smoke else sana_configs.DC_AE_F32C32)

    def latent_side(self) -> int:
        """Latent side of `image_size`: the DC-AE halves the resolution per stage after the first."""
        return self.image_size // 2 ** (len(self.vae_config()["decoder_block_out_channels"]) - 1)


@dataclasses.dataclass
class Row:
    """One line of the table: `ours` against `baseline` (diffusers, a threshold or a reference), and a verdict."""

    check: str
    case: str
    metric: str
    ours: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    ok: bool | None = None
    note: str = ""


CHECKS: dict[str, Callable[[CheckContext], list[Row]]] = {}


def register_check(name: str):
    """Add a check `fn(context) -> list[Row]` under `name` (run in registration order)."""

    def decorator(fn):
        if name in CHECKS:
            raise ValueError(f"A check named {name!r} is already registered.")
        CHECKS[name] = fn
        return fn

    return decorator


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, peaks: list | None = None) -> float:
    """
    Wall seconds of `fn()`, the device synchronised before and after. CUDA with `peaks`: appends the call's peak
    memory in MiB, `max_memory_allocated` after a `reset_peak_memory_stats` minus the bytes allocated before.
    """
    synchronize(device)
    measure_memory = peaks is not None and device.type == "cuda"
    if measure_memory:
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    if measure_memory:
        peaks.append((torch.cuda.max_memory_allocated(device) - allocated) / 2**20)
    return seconds


def interleaved_medians(
    calls: dict[str, Callable[[], object]],
    context: CheckContext,
    repeats: int | None = None,
    peaks: dict[str, list] | None = None,
) -> dict[str, float]:
    """
    Median seconds of each call after `warmup` untimed calls, timed A B A B ... (load drift hits both alike), over
    `repeats` (default `context.repeats`). CUDA with `peaks` (a dict): `peaks[name]` gets each timed call's peak MiB.
    """
    for _ in range(context.warmup):
        for fn in calls.values():
            fn()
    samples = {name: [] for name in calls}
    if peaks is not None:
        peaks.update({name: [] for name in calls})
    for _ in range(repeats or context.repeats):
        for name, fn in calls.items():
            samples[name].append(time_call(fn, context.device, None if peaks is None else peaks[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def make_text_components(caption_channels: int, device, dtype):
    """A locally trained Gemma-layout tokenizer and a one-layer random Gemma-2 of hidden size `caption_channels`."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tokenizer = train_gemma_layout_tokenizer(texts, vocab_size=248)
    heads = 8 if caption_channels % 8 == 0 else 2
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=caption_channels,
        intermediate_size=2 * caption_channels,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=caption_channels // heads,
        max_position_embeddings=1024,
        attn_implementation="eager",
    )
    with torch.device(device):
        text_encoder = Gemma2Model(config)
    return tokenizer, text_encoder.to(dtype).eval().requires_grad_(False)


def make_transformers(config: dict, device, dtype):
    """diffusers' `SanaTransformer2DModel` with random weights, and ours holding the very same parameter tensors."""
    config = {key: value for key, value in config.items() if key != "logvar_head"}
    with torch.device(device):
        reference = diffusers.SanaTransformer2DModel(**config)
    reference = reference.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = SanaSprintTransformer2DModel(**config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    leftover = [name for name, tensor in [*ours.named_parameters(), *ours.named_buffers()] if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"Tensors left on the meta device after loading the reference weights: {leftover}.")
    return ours.eval().requires_grad_(False), reference


def make_vae(config: dict, device, dtype) -> diffusers.AutoencoderDC:
    with torch.device(device):
        vae = diffusers.AutoencoderDC(**config)
    return vae.to(dtype).eval().requires_grad_(False)


def compile_transformer(model: torch.nn.Module, context: CheckContext) -> None:
    """In place: every transformer block (diffusers' regional compilation) or the whole model."""
    if context.compile_mode == "blocks":
        for block in model.transformer_blocks:
            block.compile(backend=context.compile_backend)
    else:
        model.compile(backend=context.compile_backend)


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def uncompile_transformer(model: torch.nn.Module) -> None:
    for module in model.modules():
        module._compiled_call_impl = None


def pipeline_kwargs(steps: int, size: int, seed: int) -> dict:
    return dict(
        prompt=PROMPT,
        num_inference_steps=steps,
        # diffusers rejects an intermediate time for step counts other than 2; ours spaces 3+ steps the same way.
        intermediate_timesteps=1.3 if steps == 2 else None,
        guidance_scale=GUIDANCE_SCALE,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        complex_human_instruction=None,
        output_type="np",
    )


def transformer_inputs(pipe, config: dict, side: int, device, dtype, seed: int) -> dict:
    """What the pipelines feed the transformer at the first step: noise, the encoded prompt, t = pi/2."""
    embeds, mask = pipe.encode_prompt(PROMPT, device=device, complex_human_instruction=None)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, config["in_channels"], side, side, generator=generator).to(device)
    return dict(sample=sample, embeds=embeds.to(dtype), mask=mask)


def reference_transformer_call(reference, inputs: dict, dtype):
    """diffusers' pipeline step at t = pi/2 (flow time s = 1): the flow-matching forward in the model's dtype."""
    timestep = torch.ones(1, device=inputs["sample"].device, dtype=dtype)
    guidance = torch.full((1,), GUIDANCE_SCALE * reference.config.guidance_embeds_scale, device=timestep.device)
    return reference(
        inputs["sample"].to(dtype),
        encoder_hidden_states=inputs["embeds"],
        encoder_attention_mask=inputs["mask"],
        timestep=timestep,
        guidance=guidance.to(dtype),
        return_dict=False,
    )[0]


def ours_transformer_call(ours, inputs: dict):
    """Our pipeline step at t = pi/2: `trigflow_forward` (TrigFlow transform in fp32 around the same forward)."""
    return ours.trigflow_forward(
        inputs["sample"],
        torch.pi / 2,
        encoder_hidden_states=inputs["embeds"],
        encoder_attention_mask=inputs["mask"],
        guidance_scale=GUIDANCE_SCALE,
        return_dict=False,
    )[0]


# ---------------------------------------------------------------------------------------------------------------------
# (a) Pipeline latency
# ---------------------------------------------------------------------------------------------------------------------


@register_check("pipeline_latency")
def check_pipeline_latency(context: CheckContext) -> list[Row]:
    rows = []
    for name in context.models:
        rows += time_one_model(name, context)
        release_device_memory(context.device)
    return rows


def time_one_model(name: str, context: CheckContext) -> list[Row]:
    """Parity, then transformer-only and end-to-end latency of one config, eager then compiled."""
    device, dtype, size, seed = context.device, context.dtype, context.image_size, context.seed
    image_tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    config = context.transformer_config(name)
    torch.manual_seed(seed)
    tokenizer, text_encoder = make_text_components(config["caption_channels"], device, dtype)
    ours_model, reference_model = make_transformers(config, device, dtype)
    vae = make_vae(context.vae_config(), device, dtype)
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=diffusers.SCMScheduler())
    ours = diffusers_sprint.SanaSprintPipeline(transformer=ours_model, **shared)
    reference = diffusers.SanaSprintPipeline(transformer=reference_model, **shared)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    inputs = transformer_inputs(ours, config, context.latent_side(), device, dtype, seed)
    label = f"{'tiny' if context.smoke else name} {size}px {str(dtype).removeprefix('torch.')}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows = []
    with torch.no_grad():
        for steps in context.steps:
            image_ours = ours(**pipeline_kwargs(steps, size, seed)).images
            image_reference = reference(**pipeline_kwargs(steps, size, seed)).images
            difference = float(abs(image_ours - image_reference).max())
            rows.append(
                Row(
                    "pipeline_latency",
                    f"{label}, {steps} step(s), eager",
                    "max abs image diff",
                    ours=difference,
                    baseline=image_tolerance,
                    ok=difference <= image_tolerance,
                    note="same weights, seed and times; `np` images in [0, 1]",
                )
            )
        for mode in ("eager", "compiled"):
            if mode == "compiled":
                graphs_before = compiled_graph_count()
                compile_transformer(ours_model, context)
                compile_transformer(reference_model, context)
            calls = {
                "ours": lambda: ours_transformer_call(ours_model, inputs),
                "diffusers": lambda: reference_transformer_call(reference_model, inputs, dtype),
            }
            rows.append(
                _latency_row(f"{label}, transformer forward, {mode}", interleaved_medians(calls, context), context)
            )
            for steps in context.steps:
                calls = {
                    "ours": lambda steps=steps: ours(**pipeline_kwargs(steps, size, seed)),
                    "diffusers": lambda steps=steps: reference(**pipeline_kwargs(steps, size, seed)),
                }
                medians = interleaved_medians(calls, context)
                rows.append(_latency_row(f"{label}, pipeline {steps} step(s), {mode}", medians, context))
        graphs = compiled_graph_count() - graphs_before
        rows.append(
            Row(
                "pipeline_latency",
                f"{label}, torch.compile ({context.compile_mode}, {context.compile_backend})",
                "graphs compiled",
                ours=graphs,
                ok=graphs > 0,
                note="Dynamo graphs over all compiled calls (recompiles for new shapes included)",
            )
        )
        uncompile_transformer(ours_model)
        uncompile_transformer(reference_model)
    if device.type == "cuda":
        rows.append(
            Row(
                "pipeline_latency",
                f"{label}, peak memory",
                "GiB allocated",
                ours=torch.cuda.max_memory_allocated(device) / 2**30,
                note="both pipelines and all components (the transformer weights are shared)",
            )
        )
    return rows


def _latency_row(case: str, medians: dict[str, float], context: CheckContext) -> Row:
    compiled = "compiled" in case
    note = f"median of {context.repeats}, interleaved"
    if "transformer forward" in case:
        note += "; ours: trigflow_forward (TrigFlow transform included), diffusers: the flow forward"
    if compiled:
        note += f"; torch.compile {context.compile_mode}, backend {context.compile_backend}"
    return Row(
        "pipeline_latency",
        case,
        "ms (ours vs diffusers)",
        ours=1e3 * medians["ours"],
        baseline=1e3 * medians["diffusers"],
        ratio=medians["ours"] / medians["diffusers"],
        note=note,
    )


# ---------------------------------------------------------------------------------------------------------------------
# (c) JVP with default settings against finite differences
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_fp32_matmuls():
    """TF32 off for matmuls and convolutions (a finite difference at h ~ 1e-3 needs true fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@register_check("jvp_math_kernel")
def check_jvp_math_kernel(context: CheckContext) -> list[Row]:
    device = context.device
    config = context.transformer_config(context.jvp_model)
    torch.manual_seed(context.seed)
    ours, reference = make_transformers(config, device, torch.float32)
    side = context.latent_side()
    generator = torch.Generator().manual_seed(context.seed)
    batch, tokens = 2, 300 if not context.smoke else 12
    sample = torch.randn(batch, config["in_channels"], side, side, generator=generator).to(device)
    embeds = torch.randn(batch, tokens, config["caption_channels"], generator=generator).to(device)
    mask = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    mask[0, : tokens // 10 + 1] = 1  # padded captions, as in training: masked cross-attention
    mask[1, : tokens // 3 + 1] = 1
    t = torch.tensor([0.6, 1.2], device=device)
    tangent_x = torch.randn(sample.shape, generator=generator).to(device)
    tangent_t = torch.ones(batch, device=device)
    guidance = torch.full((batch,), GUIDANCE_SCALE, device=device)
    h = context.jvp_step

    def ours_call(x, time_):
        return ours.trigflow_forward(x, time_, embeds, mask, guidance_scale=guidance, return_dict=False)[0]

    def reference_call(x, time_):
        # diffusers' flow-matching forward, s = sin t / (sin t + cos t), dense time, guidance scaled by 0.1
        s = torch.sin(time_) / (torch.sin(time_) + torch.cos(time_))
        return reference(
            x,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=s,
            guidance=guidance * reference.config.guidance_embeds_scale,
            return_dict=False,
        )[0]

    rows = []
    where = f"{context.jvp_model if not context.smoke else 'tiny'} fp32 {device.type}"
    with torch.no_grad(), full_fp32_matmuls():
        plain = ours_call(sample, t)
        primal, tangent = torch.func.jvp(ours_call, (sample, t), (tangent_x, tangent_t))
        plus = ours_call(sample + h * tangent_x, t + h * tangent_t)
        minus = ours_call(sample - h * tangent_x, t - h * tangent_t)
        finite_difference = (plus - minus) / (2 * h)
        fd_error = relative_error(tangent, finite_difference)
        rows.append(
            Row(
                "jvp_math_kernel",
                f"{where}, torch.func.jvp(trigflow_forward), default settings",
                "tangent rel err vs central FD",
                ours=fd_error,
                baseline=2e-2,
                ok=fd_error <= 2e-2,
                note=f"h = {h:g}, t = {[round(v, 3) for v in t.tolist()]} rad, padded captions",
            )
        )
        primal_error = relative_error(primal, plain)
        rows.append(
            Row(
                "jvp_math_kernel",
                f"{where}, JVP primal vs plain forward",
                "rel diff",
                ours=primal_error,
                baseline=1e-4,
                ok=primal_error <= 1e-4,
                note="math kernel inside the JVP, default kernels outside",
            )
        )
        # The training option `SCMLossConfig(jvp="finite_difference")`: one-sided, the plain forward as base point,
        # the default step (3e-5 rad along a tangent with v_t = 1), fp32 forwards on the default (fused) kernels.
        one_sided = trigflow_velocity_finite_difference(
            TrigFlowModel(ours), TrigFlowInputs(sample, t, embeds, mask, guidance), tangent_x, tangent_t, base=plain
        )
        one_sided_error = relative_error(one_sided, tangent)
        rows.append(
            Row(
                "jvp_math_kernel",
                f"{where}, finite-difference tangent (training option) vs torch.func.jvp",
                "tangent rel err",
                ours=one_sided_error,
                baseline=5e-2,
                ok=one_sided_error <= 5e-2,
                note=f"one-sided, step {DEFAULT_FINITE_DIFFERENCE_STEP:g} rad, fp32, TF32 off (toy teacher: 2-7e-3)",
            )
        )
        try:
            torch.func.jvp(reference_call, (sample, t), (tangent_x, tangent_t))
            control, control_note = "ran", "the default kernels had a forward-mode rule here"
        except Exception as error:  # noqa: BLE001 (the control records whatever the stock model raises)
            control, control_note = "raised", f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        rows.append(
            Row(
                "jvp_math_kernel",
                f"{where}, control: torch.func.jvp on diffusers' stock transformer",
                f"stock model {control}",
                note=control_note,
            )
        )
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, tangent_bf16 = torch.func.jvp(ours_call, (sample, t), (tangent_x, tangent_t))
        bf16_error = relative_error(tangent_bf16.float(), tangent)
        rows.append(
            Row(
                "jvp_math_kernel",
                f"{where}, JVP under bf16 autocast vs fp32 JVP",
                "tangent rel diff",
                ours=bf16_error,
                baseline=0.1,
                ok=bf16_error <= 0.1,
                note="training precision (fp32 weights, bf16 autocast)",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# (b) Training step: time and peak memory
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_TARGET_FORWARD_EQUIVALENTS = 9.0  # issue 15: the sCM+LADD generator step, in student forwards
# First-call agreement with the exact JVP, relative, on the generator loss and the tangent statistics the step logs
# (`g_norm_mean`: per-sample L2 norm of the sCM tangent g before normalisation; `dF_dt_abs_mean`: mean |dF/dt|). The
# loss alone barely sees the tangent: it holds g / (||g||_2 + 0.1) over a sample's ~33k elements, whose squared norm
# is about 1 whatever g is once ||g||_2 >> 0.1. Under bf16 autocast the exact JVP is computed in bf16 while the finite
# difference runs fp32 forwards: their difference is the bf16 JVP's rounding (the jvp_math_kernel check allows 0.1
# on the tangent tensor; these are means, where it partly averages out) plus the difference's truncation error
# (2-7e-3 on the toy teacher, docs/performance.md), hence 5e-2. compile_jvp computes the same math in a different
# order and fusion (Inductor keeps fused intermediates in fp32 where eager rounds to bf16): bf16-rounding scale, 2e-2.
FINITE_DIFFERENCE_TOLERANCE = 5e-2
COMPILED_JVP_TOLERANCE = 2e-2
AGREEMENT_LOGS = ("generator_loss", "g_norm_mean", "dF_dt_abs_mean")
TRAIN_GUIDANCE = 4.5  # the unit forward's CFG scale (the steps draw theirs from SCMLossConfig.guidance_scales)


@dataclasses.dataclass
class TrainSetup:
    """The models, optimisers and batch of the training-step check (fp32 master weights)."""

    student: SanaSprintTransformer2DModel
    student_model: TrigFlowModel
    teacher_model: TrigFlowModel
    discriminator: SanaDiscriminator
    batch: DistillationBatch
    state: DistillationState
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    unit_inputs: tuple  # (x_t / sigma_d, t, w): the student forward everything is counted in


def build_train_setup(context: CheckContext) -> TrainSetup:
    """
    As benchmarks/bench_train_step.py and examples/train_sana_sprint.py: a random-weight Sprint teacher in the
    released config (no guidance embedder, dense time, fp32), `build_student(teacher, logvar_head=True)`,
    `SanaDiscriminator(teacher, default_head_block_ids(layers))`, AdamW on the student and on the heads, one batch
    of `train_batch` latents with padded captions (300 tokens; smoke 12) and a null caption for the teacher's CFG.
    """
    device, seed = context.device, context.seed
    config = sana_configs.teacher_config(context.transformer_config(context.train_model))
    config["flow_time_scale"] = 1.0  # the Sprint teacher's dense time (as bench_train_step and gpu_train_smoke)
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = SanaSprintTransformer2DModel(**config)
    teacher.eval().requires_grad_(False)
    student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(seed))
    student = student.to(device).train()
    teacher_model = TrigFlowModel(teacher)
    discriminator = SanaDiscriminator(teacher_model, default_head_block_ids(config["num_layers"])).to(device)

    sigma_data = SCMLossConfig().sigma_data
    generator = torch.Generator(device).manual_seed(seed)
    b, seq = context.train_batch, 12 if context.smoke else 300
    batch, x_t_scaled, t = random_distillation_inputs(
        b, config["in_channels"], context.latent_side(), seq, config["caption_channels"], sigma_data, generator, device
    )
    return TrainSetup(
        student=student,
        student_model=TrigFlowModel(student),
        teacher_model=teacher_model,
        discriminator=discriminator,
        batch=batch,
        # tangent warm-up over (r = 1): dF enters the tangent at full weight
        state=DistillationState(generator_steps=SCMLossConfig().tangent_warmup_steps),
        g_optimizer=torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0),
        d_optimizer=torch.optim.AdamW(discriminator.parameters(), lr=1e-6, weight_decay=0.0),
        unit_inputs=(x_t_scaled, t, torch.full((b,), TRAIN_GUIDANCE, device=device)),
    )


def training_autocast(device: torch.device):
    """The training script's precision: bf16 autocast over fp32 weights (`accelerate --mixed_precision bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _generator_loss(s: TrainSetup, config: DistillationConfig, generator: torch.Generator):
    """`generator_step` under the training autocast (the discriminator judged in eval mode, as the script does)."""
    s.discriminator.eval()  # spectral-norm power iterations advance on D steps only
    discriminator = s.discriminator if config.uses_discriminator else None
    with training_autocast(s.batch.latents.device):
        return generator_step(s.student_model, s.teacher_model, discriminator, s.batch, s.state, config, generator)


def _train_variants(compile_jvp: bool = True) -> dict[str, DistillationConfig]:
    """The G-step variants by name: sCM and sCM+LADD, each with the exact JVP, the finite difference, compile_jvp."""
    methods = [("exact JVP", dict(jvp="exact")), ("finite-difference JVP", dict(jvp="finite_difference"))]
    if compile_jvp:
        methods.append(("exact JVP, compile_jvp", dict(jvp="exact", compile_jvp=True)))
    variants = {}
    for recipe, ladd in (("sCM", False), ("sCM+LADD", True)):
        for jvp, options in methods:
            scm = SCMLossConfig(**options)
            variants[f"G {recipe}, {jvp}"] = DistillationConfig(scm=scm, adversarial_lambda=0.5 if ladd else 0.0)
    return variants


def _relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), torch.finfo(torch.float32).tiny)


@register_check("train_step")
def check_train_step(context: CheckContext) -> list[Row]:
    saved_backend = tangent_module.JVP_COMPILE_BACKEND
    tangent_module.JVP_COMPILE_BACKEND = context.compile_backend
    try:
        return _train_step_rows(context)
    finally:
        tangent_module.JVP_COMPILE_BACKEND = saved_backend


def _train_step_rows(context: CheckContext) -> list[Row]:
    device, seed = context.device, context.seed
    s = build_train_setup(context)
    variants = _train_variants(context.train_compile_jvp)
    d_config = DistillationConfig()  # sCM+LADD defaults: misaligned pairs, max-time probability 0.5
    b = s.batch.latents.shape[0]
    label = f"{'tiny' if context.smoke else context.train_model} {context.image_size}px batch {b} bf16 autocast"
    tf32 = ""
    if device.type == "cuda":
        tf32 = f"; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}"
    rows = []

    # 1. First calls, before any optimizer step: every variant on the same weights and the same random draws
    #    (a fresh generator per call; scm_loss draws nothing, so the JVP method does not move the draws). The
    #    compiled variants compile here; no backward.
    first, first_seconds = {}, {}
    graphs_before = compiled_graph_count()

    def first_call(name: str, config: DistillationConfig):
        synchronize(device)
        start = time.perf_counter()
        out = _generator_loss(s, config, torch.Generator(device).manual_seed(seed + 1))
        values = {key: float(out.logs[key]) for key in AGREEMENT_LOGS}
        first_seconds[name] = time.perf_counter() - start  # float() synchronised
        first[name] = values

    for name, config in list(variants.items()):
        if name.endswith(", exact JVP"):  # the baseline: without it there is nothing to compare or count in
            first_call(name, config)
            continue
        try:
            first_call(name, config)
        except Exception:  # noqa: BLE001 (e.g. an Inductor failure: reported, and the other variants still run)
            error = traceback.format_exc().strip().splitlines()[-1]
            rows.append(Row("train_step", f"{label}, {name}, first call", "crashed", ok=False, note=error[:200]))
            del variants[name]
            release_device_memory(device)
    compile_graphs = compiled_graph_count() - graphs_before
    diagnostic = "G sCM, finite-difference JVP, TF32 off"  # the difference's fp32 forwards without TF32 rounding
    if "G sCM, finite-difference JVP" in variants:
        with full_fp32_matmuls():
            first_call(diagnostic, variants["G sCM, finite-difference JVP"])
    s.discriminator.train()
    d_generator = torch.Generator(device).manual_seed(seed + 1)
    with training_autocast(device):
        d_first = discriminator_step(s.student_model, s.discriminator, s.batch, d_config, d_generator).loss.detach()

    for name in first:  # the variants that ran, then the diagnostic
        if name.endswith(", exact JVP"):
            continue
        recipe = name.split(",")[0]
        exact = first[f"{recipe}, exact JVP"]
        differences = {key: _relative_difference(first[name][key], exact[key]) for key in AGREEMENT_LOGS}
        worst = max(differences.values())
        finite = all(math.isfinite(v) for v in (*first[name].values(), *exact.values()))
        tolerance = COMPILED_JVP_TOLERANCE if "compile_jvp" in name else FINITE_DIFFERENCE_TOLERANCE
        rows.append(
            Row(
                "train_step",
                f"{label}, {name} vs exact JVP, first call",
                "max rel diff (loss, tangent stats)",
                ours=worst,
                baseline=tolerance,
                ok=finite and worst <= tolerance,
                note="same weights and draws; " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()),
            )
        )
    compiled_name = "G sCM, exact JVP, compile_jvp"
    compile_row = None  # baseline: the same step once compiled (set after the timed phase); ratio: compile in steps
    if compiled_name in variants:
        compile_row = Row(
            "train_step",
            f"{label}, {compiled_name}, first call (compiles) vs a timed call",
            "s",
            ours=first_seconds[compiled_name],
            ok=compile_graphs > 0,
            note=f"torch.compile backend {context.compile_backend}: {compile_graphs} Dynamo graph(s) for both recipes"
            " (first calls)",
        )
        rows.append(compile_row)
    graphs_before_timing = compiled_graph_count()

    # 2. Timed steps, interleaved: generator_step / discriminator_step under autocast, backward, clip, AdamW step.
    generator = torch.Generator(device).manual_seed(seed + 2)
    losses = {name: [] for name in [*variants, "D step"]}
    losses["D step"].append(d_first)

    def g_step(name: str, config: DistillationConfig):
        out = _generator_loss(s, config, generator)
        s.state.record("generator", update(out.loss, s.g_optimizer, s.student.parameters()))
        losses[name].append(out.loss.detach())

    def d_step():
        s.discriminator.train()
        with training_autocast(device):
            out = discriminator_step(s.student_model, s.discriminator, s.batch, d_config, generator)
        s.state.record("discriminator", update(out.loss, s.d_optimizer, s.discriminator.parameters()))
        losses["D step"].append(out.loss.detach())

    def unit():
        x, t, w = s.unit_inputs
        with torch.no_grad(), training_autocast(device):
            s.student.trigflow_forward(x, t, s.batch.prompt_embeds, s.batch.prompt_attention_mask, guidance_scale=w)

    calls = {"student forward (no grad)": unit}
    calls.update({name: functools.partial(g_step, name, config) for name, config in variants.items()})
    calls["D step"] = d_step
    peaks = {}
    medians = interleaved_medians(calls, context, repeats=context.train_repeats, peaks=peaks)
    unit_seconds = medians.pop("student forward (no grad)")
    if compile_row is not None:
        compile_row.baseline = medians[compiled_name]
        compile_row.ratio = compile_row.ours / compile_row.baseline
        recompiles = compiled_graph_count() - graphs_before_timing
        compile_row.note += f"; {recompiles} more during the timed steps (recompiles)"
    note = f"median of {context.train_repeats} after {context.warmup} warm-up(s), interleaved{tf32}"
    rows.append(
        Row("train_step", f"{label}, student forward (no grad), the unit", "ms", ours=1e3 * unit_seconds, note=note)
    )
    for name, seconds in medians.items():
        values = [float(v) for v in losses[name]]
        finite = bool(values) and all(math.isfinite(v) for v in values)
        ratio = seconds / unit_seconds
        extra = f"ok: {len(values)} losses finite" if finite else f"non-finite loss in {values}"
        if name.startswith("G sCM+LADD"):
            met = "met" if ratio <= TRAIN_TARGET_FORWARD_EQUIVALENTS else "MISSED"
            extra += f"; target <= {TRAIN_TARGET_FORWARD_EQUIVALENTS:g} forward-equivalents {met}"
        exact = name.split(",")[0] + ", exact JVP"
        if name.startswith("G ") and name != exact:
            extra += f"; {seconds / medians[exact]:.2f}x the exact-JVP step"
        if "finite-difference" in name:
            extra += " (under autocast the difference is central: two fp32 no-grad forwards)"
        rows.append(
            Row(
                "train_step",
                f"{label}, {name}",
                "ms (ratio: forward-equivalents)",
                ours=1e3 * seconds,
                baseline=1e3 * unit_seconds,
                ratio=ratio,
                ok=finite,
                note=f"{extra}; {note}",
            )
        )
    if device.type == "cuda":
        peak = {name: max(values) for name, values in peaks.items()}
        for name, value in peak.items():
            exact = peak.get(name.split(",")[0] + ", exact JVP") if name.startswith("G ") else None
            exact = None if exact is None or name.endswith(", exact JVP") else exact
            rows.append(
                Row(
                    "train_step",
                    f"{label}, {name}",
                    "peak MiB",
                    ours=value,
                    baseline=exact,
                    ratio=None if exact is None else value / exact,
                    note="max over the timed calls of max_memory_allocated - allocated before the call"
                    + ("; baseline: the exact-JVP step" if exact is not None else ""),
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and (abs(value) < 1e-2 and value != 0):
        return f"{value:.2e}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[Row]) -> str:
    lines = [
        "| check | case | metric | ours | baseline | ratio | ok | note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        ok = "" if row.ok is None else ("yes" if row.ok else "**NO**")
        cells = [
            row.check,
            row.case,
            row.metric,
            *map(format_value, (row.ours, row.baseline, row.ratio)),
            ok,
            row.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(context: CheckContext) -> dict:
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        device=str(context.device),
        machine=platform.machine(),
    )
    if context.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(context.device)
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny configs, a few seconds on a CPU.")
    parser.add_argument("--checks", nargs="+", default=None, help=f"Subset of {list(CHECKS)} (default: all).")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="Latency dtype (bf16).")
    parser.add_argument("--models", nargs="+", default=["0.6B", "1.6B"], help="Transformer configs to time.")
    parser.add_argument("--image-size", type=int, default=None, help="Pixels, a multiple of 32 (1024; smoke 32).")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4], help="Pipeline step counts.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed calls per variant (10; smoke 2).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed calls per variant (2; smoke 1).")
    parser.add_argument("--compile", dest="compile_mode", default="blocks", choices=("blocks", "full"))
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; smoke eager).")
    parser.add_argument("--jvp-model", default="0.6B", help="Transformer config of the JVP check.")
    parser.add_argument("--jvp-step", type=float, default=1e-3, help="Finite-difference step h (fp32).")
    parser.add_argument("--train-model", default="0.6B", help="Transformer config of the training-step check.")
    parser.add_argument("--train-batch", type=int, default=2, help="Batch of the training-step check.")
    parser.add_argument("--train-repeats", type=int, default=None, help="Timed steps per variant (5; smoke 2).")
    parser.add_argument(
        "--train-compile-jvp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Include the compile_jvp variants of the training step (one compile of the JVP).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write environment, settings and rows here.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks or []) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {unknown}; allowed: {list(CHECKS)}.")
    if args.train_batch < 1:
        parser.error(f"--train-batch must be >= 1, got {args.train_batch}.")
    for name in [*args.models, args.jvp_model, args.train_model]:
        try:
            sana_configs.resolve_model_name(name)
        except ValueError as error:
            parser.error(str(error))
    return args


def make_context(args: argparse.Namespace) -> CheckContext:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("fp32" if args.smoke else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    image_size = args.image_size or (32 if args.smoke else 1024)
    if image_size % 32:  # diffusers' SanaSprintPipeline demands it whatever the VAE scale
        raise SystemExit(f"--image-size must be a multiple of 32, got {image_size}.")
    return CheckContext(
        device=device,
        dtype=dtype,
        smoke=args.smoke,
        models=[args.models[0]] if args.smoke else list(args.models),
        image_size=image_size,
        steps=list(args.steps),
        repeats=args.repeats or (2 if args.smoke else 10),
        warmup=args.warmup or (1 if args.smoke else 2),
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend or ("eager" if args.smoke else "inductor"),
        jvp_model=args.jvp_model,
        jvp_step=args.jvp_step,
        train_model=args.train_model,
        train_batch=args.train_batch,
        train_repeats=args.train_repeats or (2 if args.smoke else 5),
        train_compile_jvp=args.train_compile_jvp,
        seed=args.seed,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    context = make_context(args)
    diffusers.utils.logging.set_verbosity_error()  # the `.to(bf16)` casts of random-weight models warn each time
    if context.smoke and context.device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: OpenMP spin-waiting across threads costs more than it gives
    names = args.checks or list(CHECKS)
    rows, failures, durations = [], {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            rows += CHECKS[name](context)
        except Exception:  # noqa: BLE001 (one broken check must not hide the others' numbers)
            failures[name] = traceback.format_exc()
            rows.append(Row(name, "the check itself", "crashed", ok=False, note=failures[name].splitlines()[-1]))
        release_device_memory(context.device)
        durations[name] = time.perf_counter() - start
        print(f"[{name}] {durations[name]:.1f} s", flush=True)
    print()
    print(format_table(rows))
    if not context.smoke and "pipeline_latency" in names:
        print(f"\nreference: {PAPER_REFERENCE}")
    report = dict(
        environment=environment(context),
        settings={**vars(args), "resolved": {k: str(v) for k, v in dataclasses.asdict(context).items()}},
        configs={name: context.transformer_config(name) for name in context.models},
        vae_config=context.vae_config(),
        durations_s=durations,
        rows=[dataclasses.asdict(row) for row in rows],
        failures=failures,
        all_ok=not failures and all(row.ok is not False for row in rows),
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
