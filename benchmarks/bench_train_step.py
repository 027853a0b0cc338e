"""Cost of one SANA-Sprint distillation iteration, in units of one student forward ("forward-equivalents").

A mid-size Sprint teacher (random weights, dense time, QK-norm, no guidance embedder) is built offline; the student
comes from `build_student` (guidance embedder + logvar head) and the discriminator is `SanaDiscriminator` on the
teacher with `default_head_block_ids(layers)` (4 heads from 4 layers up). The script times, interleaved:

- the units: one student `trigflow_forward` under `torch.no_grad()` on the batch ("fwd", the unit everything is
  divided by) and one grad-enabled forward + backward of the same call ("fwd+bwd", for reference);
- the generator step (`generator_step`, backward, clip, `step_if_finite`; AdamW on the student) for sCM only and
  sCM + LADD, each with the exact JVP and with `jvp="finite_difference"`, plus sCM + LADD with
  `max_time_probability=0` (the LADD fake then reuses the sCM forward, no fresh student forward), exact and
  finite-difference;
- the discriminator step (`discriminator_step`, backward, clip, `step_if_finite`; AdamW on the heads; misaligned
  pairs on);
- sCM + LADD with the fake's fresh rows in a second student call (`single_student_forward=False`; the default joins
  them to the sCM forward);
- with `--compile` (compiled during the untimed pass; in the memory table only when `--only` names them, since each
  forked memory child compiles its variant anew, minutes per variant): the finite-difference G steps with
  the student's `TrigFlowModel` under `torch.compile`, and G and D steps with the frozen teacher's blocks compiled
  too (each block's `Module.compile()`, diffusers' regional compilation: the discriminator's forward hooks stay
  outside the compiled code and keep firing), and the exact-JVP G step with `SCMLossConfig(compile_jvp=True)`
  (`torch.compile` around `torch.func.jvp`, checked against the eager tangent first), alone and with the rest
  compiled; and the layout the training script compiles under `accelerate launch --dynamo_backend` (the student,
  the teacher's blocks and the whole discriminator);
- the pieces the G step is made of (teacher CFG forward on 2B, JVP without grad, the one-sided finite-difference
  tangent's shifted forward,
  discriminator forward + backward through the frozen teacher to its input, student fwd+bwd on half the batch,
  clip + AdamW step), so that the G step can be accounted for.

Time. CPU: `time.process_time()` (user + system CPU time) of this single-threaded process (`torch.set_num_threads(1)`),
which a machine shared with other jobs inflates far less than wall-clock time. CUDA: wall clock around
`torch.cuda.synchronize()`. After one untimed pass over everything, each repeat runs
`fwd, v1, fwd, v2, ..., fwd, vn, fwd` with the variants in a rotated order; a variant's forward-equivalents are its
time divided by the mean of the two unit forwards around it (this cancels slow load drifts), and the table gives the
median and inter-quartile range of those ratios over the repeats, plus the median raw time.

Memory. Peak memory of one call per variant, after one untimed warm-up call of the same variant (which creates the
optimizer states). CPU: each variant runs in a fresh `fork()`ed child of this process (a private copy of the built
models, before this process has run any backward), which pins glibc's mmap threshold (`mallopt(M_MMAP_THRESHOLD,
64 KiB)`, so that freed tensor buffers are unmapped at once and RSS tracks live memory), resets the resident-set
high-water mark (`echo 5 > /proc/self/clear_refs`), and reports `VmHWM - VmRSS` from `/proc/self/status` after the
call: the peak resident growth, i.e. everything the call allocates and touches at its peak (activations, saved
tensors, gradients, temporaries) plus allocator slack. `resource.ru_maxrss` cannot be reset and `tracemalloc` does
not see torch's allocations, hence this method. CUDA: `torch.cuda.max_memory_allocated()` minus the allocated bytes
before the call, in this process. Without `/proc` (not Linux) memory is not reported.

    python benchmarks/bench_train_step.py            # 8 layers, dim 128, 16x16 latent, batch 4: ~2 CPU-minutes
    python benchmarks/bench_train_step.py --layers 6 --dim 256 --latent 16 --batch 8 --repeats 3 --json out.json
    python benchmarks/bench_train_step.py --compile --only g_ladd g_ladd_fd g_ladd_fd_compiled_all --no-memory
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import torch  # noqa: E402
from distillation_inputs import random_distillation_inputs, update  # noqa: E402

from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.models import TrigFlowInputs, TrigFlowModel  # noqa: E402
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
    teacher_cfg_velocity,
)
from diffusers_sprint.training.tangent import _shifted_velocity, trigflow_velocity_jvp  # noqa: E402


SIGMA_DATA = 0.5
HEAD_DIM = 32
LATENT_CHANNELS = 32
GUIDANCE = 4.5
TARGET_G_STEP = 9.0  # forward-equivalents (issue 3); the official loop is about 13
M_MMAP_THRESHOLD = -3  # mallopt parameter
MMAP_THRESHOLD = 65536


# ---------------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    teacher: SanaSprintTransformer2DModel
    student: SanaSprintTransformer2DModel
    discriminator: SanaDiscriminator
    batch: DistillationBatch
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    state: DistillationState
    generator: torch.Generator
    x_t_scaled: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor
    features: list
    compiled_student: torch.nn.Module | None = None
    # (block, compiled call) of the teacher's blocks, switched on by `teacher_compiled` (empty without --compile)
    compiled_teacher_blocks: list = field(default_factory=list)
    compiled_heads: list = field(default_factory=list)  # (head, compiled call) of the discriminator's heads
    # the whole discriminator under torch.compile, as the training script's G phase runs it under --dynamo_backend
    compiled_discriminator: torch.nn.Module | None = None


def build(args) -> Setup:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    heads = args.dim // HEAD_DIM
    with torch.device(device):
        teacher = SanaSprintTransformer2DModel(
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=args.layers,
            num_attention_heads=heads,
            attention_head_dim=HEAD_DIM,
            num_cross_attention_heads=heads,
            cross_attention_head_dim=HEAD_DIM,
            cross_attention_dim=args.dim,
            caption_channels=args.caption_channels,
            sample_size=args.latent,
            patch_size=1,
            qk_norm="rms_norm_across_heads",
            flow_time_scale=1.0,
        )
    teacher.eval().requires_grad_(False)
    student = build_student(teacher, logvar_head=True, generator=torch.Generator().manual_seed(args.seed))
    student.train()
    discriminator = SanaDiscriminator(
        teacher, head_block_ids=default_head_block_ids(args.layers), head_channels=args.head_channels
    ).to(device)

    generator = torch.Generator(device).manual_seed(args.seed)
    b = args.batch
    batch, x_t_scaled, t = random_distillation_inputs(
        b, LATENT_CHANNELS, args.latent, args.seq_len, args.caption_channels, SIGMA_DATA, generator, device
    )
    w = torch.full((b,), GUIDANCE, device=device)
    with torch.no_grad():
        features = discriminator.extract_features(x_t_scaled, t, batch.prompt_embeds, batch.prompt_attention_mask)
    compiled_teacher_blocks, compiled_heads = [], []
    if args.compile:
        teacher.compile_repeated_blocks()  # regional: the discriminator's forward hooks run outside the compiled call
        for block in teacher.transformer_blocks:
            compiled_teacher_blocks.append((block, block._compiled_call_impl))
            block._compiled_call_impl = None  # eager unless a variant switches it on
        for head in discriminator.heads:  # the discriminator's heads, switched on with the teacher's blocks
            head.compile()
            compiled_heads.append((head, head._compiled_call_impl))
            head._compiled_call_impl = None
    return Setup(
        teacher=teacher,
        student=student,
        discriminator=discriminator,
        batch=batch,
        g_optimizer=torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0),
        d_optimizer=torch.optim.AdamW(discriminator.parameters(), lr=1e-6, weight_decay=0.0),
        state=DistillationState(generator_steps=1000),
        generator=generator,
        x_t_scaled=x_t_scaled,
        t=t,
        w=w,
        features=features,
        compiled_student=torch.compile(TrigFlowModel(student)) if args.compile else None,
        compiled_teacher_blocks=compiled_teacher_blocks,
        compiled_heads=compiled_heads,
        compiled_discriminator=torch.compile(discriminator) if args.compile else None,
    )


@contextmanager
def teacher_compiled(s: Setup, enabled: bool = True, heads: bool = False):
    """The teacher's blocks (and with `heads` the discriminator's heads) run their compiled call inside the module
    (eager again afterwards)."""
    if not enabled:
        yield
        return
    if not s.compiled_teacher_blocks:
        raise RuntimeError("the compiled teacher variants need --compile")
    modules = s.compiled_teacher_blocks + (s.compiled_heads if heads else [])
    for module, compiled in modules:
        module._compiled_call_impl = compiled
    try:
        yield
    finally:
        for module, _ in modules:
            module._compiled_call_impl = None


# ---------------------------------------------------------------------------------------------------------------------
# Variants: each is a function of the setup doing one complete unit of work
# ---------------------------------------------------------------------------------------------------------------------


def _config(
    ladd: bool, max_time_probability: float = 0.5, jvp: str = "exact", single: bool = True, compile_jvp: bool = False
) -> DistillationConfig:
    return DistillationConfig(
        scm=SCMLossConfig(jvp=jvp, compile_jvp=compile_jvp),
        adversarial_lambda=0.5 if ladd else 0.0,
        max_time_probability=max_time_probability,
        single_student_forward=single,
    )


def generator_variant(
    ladd: bool,
    max_time_probability: float = 0.5,
    jvp: str = "exact",
    compiled: bool = False,
    single: bool = True,
    compiled_teacher: bool = False,
    compile_jvp: bool = False,
    compiled_heads: bool = False,
    compiled_discriminator: bool = False,
):
    config = _config(ladd, max_time_probability, jvp, single, compile_jvp)

    def run(s: Setup):
        s.discriminator.eval()  # spectral-norm power iterations advance on D steps only (docs/training/ladd.md)
        student = s.compiled_student if compiled else s.student
        discriminator = (s.compiled_discriminator if compiled_discriminator else s.discriminator) if ladd else None
        with teacher_compiled(s, compiled_teacher, compiled_heads):
            out = generator_step(student, s.teacher, discriminator, s.batch, s.state, config, s.generator)
            s.state.record("generator", update(out.loss, s.g_optimizer, s.student.parameters()))

    return run


def discriminator_variant(compiled_teacher: bool = False):
    config = _config(ladd=True)

    def run(s: Setup):
        s.discriminator.train()
        with teacher_compiled(s, compiled_teacher):
            out = discriminator_step(s.student, s.discriminator, s.batch, config, s.generator)
            s.state.record("discriminator", update(out.loss, s.d_optimizer, s.discriminator.parameters()))

    return run


def _student_call(s: Setup, rows: slice = slice(None)):
    b = s.batch
    return s.student.trigflow_forward(
        s.x_t_scaled[rows], s.t[rows], b.prompt_embeds[rows], b.prompt_attention_mask[rows], guidance_scale=s.w[rows]
    ).sample


def unit_forward(s: Setup):
    with torch.no_grad():
        _student_call(s)


def unit_forward_backward(s: Setup, rows: slice = slice(None)):
    _student_call(s, rows).square().mean().backward()
    s.student.zero_grad(set_to_none=True)


def half_forward_backward(s: Setup):
    unit_forward_backward(s, slice(0, max(1, s.batch.latents.shape[0] // 2)))


def one_and_a_half_forward_backward(s: Setup):
    """The sCM forward with the max-time rows joined (B + B/2 rows, one call) + backward."""
    b, half = s.batch, max(1, s.batch.latents.shape[0] // 2)

    def rows(x):
        return torch.cat([x, x[:half]])

    s.student.trigflow_forward(
        rows(s.x_t_scaled), rows(s.t), rows(b.prompt_embeds), rows(b.prompt_attention_mask), guidance_scale=rows(s.w)
    ).sample.square().mean().backward()
    s.student.zero_grad(set_to_none=True)


def teacher_cfg(s: Setup):
    b = s.batch
    teacher_cfg_velocity(
        s.teacher,
        s.x_t_scaled,
        s.t,
        b.prompt_embeds,
        b.prompt_attention_mask,
        b.null_prompt_embeds,
        b.null_prompt_attention_mask,
        s.w,
        SIGMA_DATA,
    )


def _jvp(s: Setup, compile: bool = False):
    b = s.batch
    cos_sin = torch.cos(s.t) * torch.sin(s.t)
    tangent_x = torch.ones_like(s.x_t_scaled) * cos_sin[:, None, None, None]
    inputs = TrigFlowInputs(s.x_t_scaled, s.t, b.prompt_embeds, b.prompt_attention_mask, s.w)
    return trigflow_velocity_jvp(s.student, inputs, tangent_x, cos_sin, compile=compile)


def jvp_no_grad(s: Setup):
    _jvp(s)


def compiled_jvp_no_grad(s: Setup):
    _jvp(s, compile=True)


def finite_difference_tangent(s: Setup):
    """The one-sided finite-difference tangent given the base point: one shifted no-grad fp32 forward."""
    b = s.batch
    cos_sin = torch.cos(s.t) * torch.sin(s.t)
    tangent_x = torch.ones_like(s.x_t_scaled) * cos_sin[:, None, None, None]
    inputs = TrigFlowInputs(s.x_t_scaled, s.t, b.prompt_embeds, b.prompt_attention_mask, s.w)
    _shifted_velocity(s.student, inputs, tangent_x, cos_sin, 3e-5)


def discriminator_to_input(s: Setup):
    """The LADD G-phase discriminator: teacher forward with graph + heads, backward to the (fake) input."""
    s.discriminator.eval()
    fake = s.x_t_scaled.detach().requires_grad_(True)
    b = s.batch
    logits = s.discriminator(fake, s.t, b.prompt_embeds, b.prompt_attention_mask)
    (-logits.mean()).backward()
    s.discriminator.zero_grad(set_to_none=True)


def discriminator_heads(s: Setup):
    """The heads alone on cached teacher features (B samples): forward + backward to the features and head weights."""
    s.discriminator.eval()
    features = [feature.detach().requires_grad_(True) for feature in s.features]
    (-s.discriminator.forward_heads(features).mean()).backward()
    s.discriminator.zero_grad(set_to_none=True)


def optimizer_only(s: Setup):
    """clip_grad_norm_ + AdamW step on the student (gradients kept from the previous call)."""
    params = [p for p in s.student.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    s.g_optimizer.step()


# name -> (label, function)
STEPS = {
    "g_scm": ("G step, sCM only", generator_variant(ladd=False)),
    "g_ladd": ("G step, sCM+LADD", generator_variant(ladd=True)),
    "g_ladd_two_calls": (
        "G step, sCM+LADD, single_student_forward=False (fake rows: 2nd call)",
        generator_variant(ladd=True, single=False),
    ),
    "g_ladd_pmax0": (
        "G step, sCM+LADD, max_time_probability=0 (fake from the sCM forward)",
        generator_variant(ladd=True, max_time_probability=0.0),
    ),
    "g_scm_fd": ("G step, sCM only, jvp=finite_difference", generator_variant(False, jvp="finite_difference")),
    "g_ladd_fd": ("G step, sCM+LADD, jvp=finite_difference", generator_variant(True, jvp="finite_difference")),
    "g_ladd_fd_pmax0": (
        "G step, sCM+LADD, jvp=finite_difference, max_time_probability=0",
        generator_variant(True, max_time_probability=0.0, jvp="finite_difference"),
    ),
    "d_step": ("D step (misaligned pairs)", discriminator_variant()),
}
UNITS = {
    "fwd": ("student forward, no grad (the unit)", unit_forward),
    "fwd_bwd": ("student forward + backward", unit_forward_backward),
}
PIECES = {
    "teacher_cfg": ("teacher CFG forward on 2B, no grad", teacher_cfg),
    "jvp": ("student JVP, no grad", jvp_no_grad),
    "fd_tangent": ("finite-difference tangent, one-sided (one shifted fp32 forward)", finite_difference_tangent),
    "disc_to_input": ("discriminator fwd + bwd through the teacher to the input", discriminator_to_input),
    "disc_heads": ("discriminator heads only, fwd + bwd (B samples)", discriminator_heads),
    "fwd_bwd_half": ("student forward + backward on B/2", half_forward_backward),
    "fwd_bwd_one_and_half": ("student forward + backward on B + B/2 (one call)", one_and_a_half_forward_backward),
    "optimizer": ("clip_grad_norm_ + AdamW step (student)", optimizer_only),
}
# --compile: the student's TrigFlowModel under torch.compile (Inductor), finite-difference tangent (the JVP does not
# run through a compiled module), and the teacher's blocks compiled (regional). Their memory is measured only when
# --only names them: a forked memory child compiles its variant again.
COMPILED = {
    "g_scm_fd_compiled": (
        "G step, sCM only, jvp=finite_difference, student torch.compile'd",
        generator_variant(False, jvp="finite_difference", compiled=True),
    ),
    "g_ladd_fd_compiled": (
        "G step, sCM+LADD, jvp=finite_difference, student torch.compile'd",
        generator_variant(True, jvp="finite_difference", compiled=True),
    ),
    "g_scm_fd_compiled_all": (
        "G step, sCM only, jvp=finite_difference, student + teacher blocks compiled",
        generator_variant(False, jvp="finite_difference", compiled=True, compiled_teacher=True),
    ),
    "g_ladd_fd_compiled_all": (
        "G step, sCM+LADD, jvp=finite_difference, student + teacher blocks compiled",
        generator_variant(True, jvp="finite_difference", compiled=True, compiled_teacher=True),
    ),
    "g_ladd_compiled_teacher": (
        "G step, sCM+LADD (exact JVP), teacher blocks compiled",
        generator_variant(True, compiled_teacher=True),
    ),
    "d_step_compiled_teacher": ("D step, teacher blocks compiled", discriminator_variant(compiled_teacher=True)),
    "jvp_compiled": ("student JVP, no grad, compile_jvp", compiled_jvp_no_grad),
    "g_ladd_compiled_jvp": ("G step, sCM+LADD (exact JVP), compile_jvp", generator_variant(True, compile_jvp=True)),
    "g_ladd_compiled_jvp_all": (
        "G step, sCM+LADD (exact JVP), compile_jvp + student + teacher blocks compiled",
        generator_variant(True, compiled=True, compiled_teacher=True, compile_jvp=True),
    ),
    "g_ladd_compiled_jvp_all_heads": (
        "G step, sCM+LADD (exact JVP), compile_jvp + student + teacher blocks + D heads compiled",
        generator_variant(True, compiled=True, compiled_teacher=True, compile_jvp=True, compiled_heads=True),
    ),
    # What `accelerate launch --dynamo_backend inductor examples/train_sana_sprint.py` compiles: the student, the
    # teacher's blocks (regional) and the whole discriminator (teacher pass and heads) for the G phase.
    "g_ladd_compiled_jvp_script": (
        "G step, sCM+LADD (exact JVP), compile_jvp + student + teacher blocks + whole discriminator compiled",
        generator_variant(True, compiled=True, compiled_teacher=True, compile_jvp=True, compiled_discriminator=True),
    ),
    "g_ladd_fd_compiled_script": (
        "G step, sCM+LADD, jvp=finite_difference, student + teacher blocks + whole discriminator compiled",
        generator_variant(
            True, jvp="finite_difference", compiled=True, compiled_teacher=True, compiled_discriminator=True
        ),
    ),
    "g_ladd_fd_compiled_all_heads": (
        "G step, sCM+LADD, jvp=finite_difference, student + teacher blocks + D heads compiled",
        generator_variant(True, jvp="finite_difference", compiled=True, compiled_teacher=True, compiled_heads=True),
    ),
}
ALL = {**UNITS, **STEPS, **PIECES, **COMPILED}


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def _clock(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_variants(s: Setup, names: list[str], repeats: int, warmup: int):
    """
    Per repeat: `fwd, v1, fwd, v2, ..., fwd, vn, fwd` with the variants in a rotated order. Each variant's sample is
    divided by the mean of the two unit forwards around it (bracketing cancels slow drifts of a shared machine).

    Returns `(seconds, ratios)`: per variant, the raw times and the forward-equivalents; `seconds["fwd"]` holds every
    bracketing forward.
    """
    device = s.batch.latents.device

    def timed(function) -> float:
        start = _clock(device)
        function(s)
        return _clock(device) - start

    for _ in range(warmup):
        for name in ["fwd", *names]:
            ALL[name][1](s)
    seconds = {name: [] for name in ["fwd", *names]}
    ratios = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        before = timed(unit_forward)
        seconds["fwd"].append(before)
        for name in names[shift:] + names[:shift]:  # rotated: no variant always follows the same one
            elapsed = timed(ALL[name][1])
            after = timed(unit_forward)
            seconds[name].append(elapsed)
            seconds["fwd"].append(after)
            ratios[name].append(elapsed / ((before + after) / 2))
            before = after
        print(f"  repeat {repeat + 1}/{repeats}: fwd {statistics.median(seconds['fwd']) * 1e3:.0f} ms", flush=True)
    return seconds, ratios


# ---------------------------------------------------------------------------------------------------------------------
# Memory (fresh subprocess per variant)
# ---------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _measure_call(s: Setup, run) -> dict:
    """One warm-up call (optimizer states, allocator pools), then the measured call."""
    run(s)
    gc.collect()
    if s.batch.latents.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(s)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "cuda max_memory_allocated", "peak_mib": (peak - base) / 2**20, "base_mib": base / 2**20}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM to the current RSS
    base = _proc_status_kib("VmRSS")
    run(s)
    peak = _proc_status_kib("VmHWM")
    return {"method": "peak RSS growth (VmHWM - VmRSS)", "peak_mib": (peak - base) / 1024, "base_mib": base / 1024}


def _pin_malloc_mmap_threshold() -> None:
    """glibc: a fixed mmap threshold, so freed large buffers are unmapped at once (RSS tracks live memory)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def measure_memory(s: Setup, names: list[str]) -> dict[str, dict | None]:
    """
    Peak memory of one call of each variant.

    CUDA: in this process, variant after variant. CPU: each variant in a fresh `fork()`ed child holding a private
    copy of the built setup. This process must not have run a backward before: autograd refuses to run in a child
    forked after it started its thread pool.
    """
    if s.batch.latents.device.type == "cuda":
        return {name: _measure_call(s, ALL[name][1]) for name in names}
    if not os.path.exists("/proc/self/clear_refs") or not hasattr(os, "fork"):
        return dict.fromkeys(names)
    results = {}
    for name in names:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_end)
            status = 0
            _pin_malloc_mmap_threshold()  # here only: it costs page faults, i.e. time, in the timed parent
            try:
                payload = json.dumps(_measure_call(s, ALL[name][1]))
            except BaseException as error:  # reported by the parent
                payload, status = json.dumps({"error": repr(error)}), 1
            with os.fdopen(write_end, "w") as f:
                f.write(payload)
            os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            payload = f.read()
        os.waitpid(pid, 0)
        result = json.loads(payload) if payload else {"error": "the child died"}
        if "error" in result:
            print(f"  memory of {name} failed: {result['error']}", file=sys.stderr)
            result = None
        results[name] = result
        print(f"  {name}: {result['peak_mib']:.1f} MiB" if result else f"  {name}: -", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def breakdown(fe: dict[str, float]) -> dict[str, dict]:
    """
    The G step rebuilt from its measured pieces (forward-equivalents), against the measured step. Steps or pieces
    left out by `--only` are skipped.
    """
    pieces = {
        "teacher CFG forward (2B, no grad)": "teacher_cfg",
        "JVP (no grad)": "jvp",
        "finite-difference tangent (one shifted fp32 forward)": "fd_tangent",
        "student forward + backward (sCM F)": "fwd_bwd",
        "student forward + backward, sCM rows + max-time rows (B + ~B/2, one call)": "fwd_bwd_one_and_half",
        "LADD fresh student forward + backward, max-time rows (~B/2, own call)": "fwd_bwd_half",
        "discriminator: teacher fwd + bwd to input": ("disc_to_input", "disc_heads"),
        "discriminator: heads fwd + bwd": "disc_heads",
        "clip + AdamW": "optimizer",
    }
    teacher, tail = ["teacher CFG forward (2B, no grad)"], ["clip + AdamW"]
    discriminator = ["discriminator: teacher fwd + bwd to input", "discriminator: heads fwd + bwd"]
    fresh_call = ["LADD fresh student forward + backward, max-time rows (~B/2, own call)"]
    sCM_F = ["student forward + backward (sCM F)"]
    accounts = {
        "g_scm": teacher + ["JVP (no grad)"] + sCM_F + tail,
        "g_scm_fd": teacher + ["finite-difference tangent (one shifted fp32 forward)"] + sCM_F + tail,
        # default: the max-time rows join the sCM forward (single_student_forward)
        "g_ladd": teacher
        + ["JVP (no grad)", "student forward + backward, sCM rows + max-time rows (B + ~B/2, one call)"]
        + discriminator
        + tail,
        "g_ladd_two_calls": teacher + ["JVP (no grad)"] + sCM_F + fresh_call + discriminator + tail,
        # the one-sided finite difference keeps the max-time rows in their own call (see scm_loss)
        "g_ladd_fd": teacher
        + ["finite-difference tangent (one shifted fp32 forward)"]
        + sCM_F
        + fresh_call
        + discriminator
        + tail,
    }

    def value(key):
        if isinstance(key, tuple):
            return fe[key[0]] - fe[key[1]]
        return fe[key]

    result = {}
    for step, labels in accounts.items():
        keys = [pieces[label] for label in labels]
        flat = [k for key in keys for k in (key if isinstance(key, tuple) else (key,))]
        if step in fe and all(k in fe for k in flat):
            result[step] = {label: value(key) for label, key in zip(labels, keys)}
    return result


def what_if(fe: dict[str, float], layers: int, official_layers: int = 20) -> dict[str, float]:
    """
    The sCM+LADD G step under each option, measured, and at the official depth (estimate: the heads' cost
    does not grow with depth while every other piece does, so in forward-equivalents it shrinks by
    `layers / official_layers`). Options left out by `--only` are skipped.
    """
    measured = {
        "exact JVP (default), measured": "g_ladd",
        "exact JVP, fake rows in a 2nd student call, measured": "g_ladd_two_calls",
        "exact JVP, teacher blocks compiled, measured": "g_ladd_compiled_teacher",
        "exact JVP, compile_jvp, measured": "g_ladd_compiled_jvp",
        "exact JVP, compile_jvp + student + teacher blocks compiled, measured": "g_ladd_compiled_jvp_all",
        "exact JVP, compile_jvp, all compiled incl. D heads, measured": "g_ladd_compiled_jvp_all_heads",
        "finite-difference tangent, all compiled incl. D heads, measured": "g_ladd_fd_compiled_all_heads",
        "finite-difference tangent, measured": "g_ladd_fd",
        "finite-difference tangent, student compiled, measured": "g_ladd_fd_compiled",
        "finite-difference tangent, student + teacher blocks compiled, measured": "g_ladd_fd_compiled_all",
        "exact JVP, max_time_probability=0 (no fresh forward), measured": "g_ladd_pmax0",
        "finite-difference tangent, max_time_probability=0, measured": "g_ladd_fd_pmax0",
    }
    options = {label: fe[name] for label, name in measured.items() if name in fe}
    if "disc_heads" in fe:
        heads = fe["disc_heads"] * (1 - layers / official_layers)
        for label, name in (("exact JVP", "g_ladd"), ("finite-difference tangent", "g_ladd_fd")):
            if name in fe:
                options[f"{label} at {official_layers} layers (heads rescaled, estimate)"] = fe[name] - heads
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of teacher and student")
    parser.add_argument("--dim", type=int, default=128, help="inner dim (heads x 32)")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width (32 channels, patch 1)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="caption tokens (half the captions half padded)")
    parser.add_argument("--caption-channels", type=int, default=256)
    parser.add_argument(
        "--head-channels", type=int, default=None, help="discriminator head width (default: inner dim, official)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory measurement")
    parser.add_argument(
        "--compile", action="store_true", help="also time G steps with the student under torch.compile (slow start)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time (and measure) only these variants besides the unit; names: "
        + ", ".join(name for name in ALL if name != "fwd"),
    )
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.dim % HEAD_DIM:
        parser.error(f"--dim must be a multiple of {HEAD_DIM}")
    if args.only is not None:
        unknown = sorted(set(args.only) - set(ALL) - {"fwd"})
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; choose from {[n for n in ALL if n != 'fwd']}")
        needs_compile = sorted(set(args.only) & set(COMPILED))
        if needs_compile and not args.compile:
            parser.error(f"--only: {needs_compile} need --compile")
    torch.set_num_threads(1)

    environment = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "clock": "cuda-synchronised wall clock" if args.device.startswith("cuda") else "process_time (1 thread)",
    }
    keys = ("layers", "dim", "latent", "batch", "seq_len", "caption_channels", "head_channels")
    config = {key: getattr(args, key) for key in keys}
    print("environment:", json.dumps(environment), flush=True)
    print("config:", json.dumps(config), flush=True)

    s = build(args)
    config["student_params_m"] = round(sum(p.numel() for p in s.student.parameters()) / 1e6, 3)
    config["head_block_ids"] = list(s.discriminator.head_block_ids)
    config["disc_head_params_m"] = round(sum(p.numel() for p in s.discriminator.parameters()) / 1e6, 3)

    memory = {}
    if not args.no_memory:  # first: the CPU path forks, which must happen before this process runs a backward
        print("memory: warm-up call + measured call per variant, each in a fresh forked child on CPU ...", flush=True)
        selected = [n for n in list(UNITS) + list(STEPS) if args.only is None or n in {*args.only, "fwd"}]
        selected += [n for n in COMPILED if args.only is not None and n in args.only]
        memory = measure_memory(s, selected)

    if args.compile:  # the compiled JVP must be the eager one up to float rounding before it is timed
        with torch.no_grad():
            (_, eager), (_, compiled) = _jvp(s), _jvp(s, compile=True)
        error = ((compiled - eager).norm() / eager.norm()).item()
        print(f"compile_jvp: tangent relative error vs eager {error:.1e}", flush=True)
        if error > 1e-4:
            print("compile_jvp parity FAILED (> 1e-4)")
            return 1
    names = [name for name in ALL if name != "fwd" and (args.compile or name not in COMPILED)]
    if args.only is not None:
        names = [name for name in names if name in args.only]
    print(f"timing {len(names)} variants x {args.repeats} repeats, bracketed by unit forwards ...", flush=True)
    seconds, ratios = time_variants(s, names, args.repeats, args.warmup)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    unit = median["fwd"]
    ratios["fwd"] = [value / unit for value in seconds["fwd"]]
    fe = {name: statistics.median(values) for name, values in ratios.items()}
    skipped = s.state.skipped_generator_updates + s.state.skipped_discriminator_updates

    fwd_bwd_mem = (memory.get("fwd_bwd") or {}).get("peak_mib")

    rows = []
    print()
    print(f"unit: student forward (no grad, batch {args.batch}) = {unit * 1e3:.1f} ms median ({environment['clock']})")
    header = f"{'variant':<72} {'ms':>8} {'fwd-eq':>7} {'IQR':>11} {'peak MiB':>9} {'x fwd+bwd':>9}"
    print(header)
    print("-" * len(header))
    for name in ["fwd", *names]:
        label = ALL[name][0]
        values = sorted(ratios[name])
        q1, q3 = values[len(values) // 4], values[(3 * len(values)) // 4]
        mem = (memory.get(name) or {}).get("peak_mib")
        mem_s = f"{mem:9.1f}" if mem is not None else f"{'':>9}"
        ratio_s = f"{mem / fwd_bwd_mem:9.2f}" if mem is not None and fwd_bwd_mem else f"{'':>9}"
        print(f"{label:<72} {median[name] * 1e3:8.1f} {fe[name]:7.2f} {q1:5.2f}-{q3:<5.2f} {mem_s} {ratio_s}")
        rows.append(
            {
                "name": name,
                "label": label,
                "median_ms": median[name] * 1e3,
                "forward_equivalents": fe[name],
                "samples_ms": [v * 1e3 for v in seconds[name]],
                "samples_forward_equivalents": ratios[name],
                "memory": memory.get(name),
            }
        )
        if name in ("fwd_bwd", "d_step"):
            print()

    print()
    print("G step accounted for by its pieces (forward-equivalents):")
    accounts = breakdown(fe)
    for name, parts in accounts.items():
        total = sum(parts.values())
        print(f"  {ALL[name][0]}: measured {fe[name]:.2f}, sum of pieces {total:.2f}")
        for part, value in parts.items():
            print(f"    {value:6.2f}  {part}")
    print()
    options = what_if(fe, args.layers)
    print("G step (sCM+LADD) options, forward-equivalents:")
    for label, value in options.items():
        print(f"  {value:6.2f}  {label}")
    print()
    target_met = {name: fe[name] <= TARGET_G_STEP for name in names if name.startswith("g_")}
    for name, met in target_met.items():
        verdict = "met" if met else "MISSED"
        print(f"  target G <= {TARGET_G_STEP:g} fwd-eq: {verdict} ({fe[name]:.2f})  {ALL[name][0]}")
    if skipped:
        print(f"  note: {skipped} updates were skipped (non-finite gradients)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    environment=environment,
                    config=config,
                    repeats=args.repeats,
                    unit_ms=unit * 1e3,
                    results=rows,
                    breakdown=accounts,
                    options=options,
                    target_forward_equivalents=TARGET_G_STEP,
                    target_met=target_met,
                ),
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
