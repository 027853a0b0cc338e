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

It prints one table and writes JSON (`--json`). `--smoke` runs the same code paths on tiny configs, on the CPU in
a few seconds (`torch.compile` with the `eager` backend: Dynamo traces, no Inductor code generation);
`tests/test_gpu_check.py` runs it.

    bash benchmarks/gpu_check.sh                       # full check on one GPU, <= 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --smoke             # tiny, CPU
    python benchmarks/gpu_check.py --checks jvp_math_kernel --json jvp.json
"""

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
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
from transformers import Gemma2Config, Gemma2Model  # noqa: E402

import diffusers_sprint  # noqa: E402
from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.models import TrigFlowModel  # noqa: E402
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer  # noqa: E402
from diffusers_sprint.training.scm import (  # noqa: E402
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


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(calls: dict[str, Callable[[], object]], context: CheckContext) -> dict[str, float]:
    """Median seconds of each call after `warmup` untimed calls, timed A B A B ... (load drift hits both alike)."""
    for _ in range(context.warmup):
        for fn in calls.values():
            fn()
    samples = {name: [] for name in calls}
    for _ in range(context.repeats):
        for name, fn in calls.items():
            samples[name].append(time_call(fn, context.device))
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
            TrigFlowModel(ours), sample, t, tangent_x, tangent_t, embeds, mask, guidance, base=plain
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write environment, settings and rows here.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks or []) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {unknown}; allowed: {list(CHECKS)}.")
    for name in [*args.models, args.jvp_model]:
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
