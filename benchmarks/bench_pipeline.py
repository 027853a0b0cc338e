"""Latency of `diffusers_sprint.SanaSprintPipeline` against diffusers' `SanaSprintPipeline` on the same weights.

Everything is built offline from seeded random weights (a mid-size Sana-Sprint transformer, a small Gemma2 text
encoder, a 3-stage DC-AE and a locally trained BPE tokenizer in Gemma's layout), saved once as a diffusers
pipeline and loaded back with our `SanaSprintPipeline.from_pretrained`. For each step count the script

1. checks that both pipelines give the same image (max abs difference <= 1e-5 on the `np` output),
2. warms both up, then times them interleaved (A B A B ...) and reports the medians and their ratio,
3. times the text encoder, transformer and VAE decoder with forward hooks and reports the share of the pipeline's
   wall time spent outside them (tokenisation, scheduler, TrigFlow transform, checks, post-processing).

With `--compile`, it also compiles our transformer with `torch.compile(fullgraph=True)` (inductor), checks the
compiled pipeline's images against the eager ones (<= 1e-5), counts the graphs compiled over all step counts (1
expected: the time is a tensor) and reports the eager / compiled speed-up, timed interleaved in the same run; then
compiles diffusers' transformer the same way and repeats steps 1-3 for the two compiled pipelines (ours vs
diffusers, both compiled).

    python benchmarks/bench_pipeline.py                       # 1 and 2 steps, 128 px, 20 repeats
    python benchmarks/bench_pipeline.py --steps 1 2 4 --size 256 --repeats 20 --json bench.json
    python benchmarks/bench_pipeline.py --steps 1 2 4 --compile
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast  # noqa: E402

import diffusers_sprint  # noqa: E402
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer  # noqa: E402


PROMPTS = ["a small red cat sitting on a blue house under the moon"]
WORDS = (
    "a an the of on in with and under over red green blue yellow black white small big cat dog car tree house "
    "apple emoji icon photo drawing painting smiling face heart star moon sun flower bird fish boat sitting "
    "standing flying river mountain city street night day"
).split()
PARITY_TOLERANCE = 1e-5
TARGET_RATIO = 0.95
TARGET_OVERHEAD = 0.05

# Mid-size configuration: 4-layer, 128-wide Sana-Sprint transformer; 2-layer Gemma2 with 128 hidden units;
# a DC-AE with 3 stages (spatial compression 4) and 16 latent channels.
TEXT_HIDDEN = 128
TEXT_VOCAB = 512
LATENT_CHANNELS = 16
VAE_SCALE = 4


def make_tokenizer() -> GemmaTokenizerFast:
    """A BPE tokenizer trained on `WORDS`, in Gemma's layout (so it saves and loads as a Gemma tokenizer)."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tokenizer = train_gemma_layout_tokenizer(texts, vocab_size=TEXT_VOCAB - 16)
    return tokenizer


def make_text_encoder() -> Gemma2Model:
    config = Gemma2Config(
        vocab_size=TEXT_VOCAB,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def make_vae() -> diffusers.AutoencoderDC:
    return diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def make_transformer(size: int) -> diffusers.SanaTransformer2DModel:
    """diffusers' Sana transformer in the Sprint form (guidance embedder, QK-norm), non-trivial weights."""
    model = diffusers.SanaTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        num_cross_attention_heads=4,
        cross_attention_head_dim=32,
        cross_attention_dim=128,
        caption_channels=TEXT_HIDDEN,
        mlp_ratio=2.5,
        sample_size=size // VAE_SCALE,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=True,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def build_pipelines(size: int, folder: str):
    """diffusers' pipeline on fresh seeded weights, and ours loaded from its `save_pretrained` folder."""
    torch.manual_seed(0)
    reference = diffusers.SanaSprintPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=make_transformer(size),
        scheduler=diffusers.SCMScheduler(),
    )
    reference.save_pretrained(folder)
    ours = diffusers_sprint.SanaSprintPipeline.from_pretrained(folder)
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    return ours, reference


def call_kwargs(steps: int, size: int, seed: int) -> dict:
    return dict(
        prompt=PROMPTS,
        num_inference_steps=steps,
        # diffusers rejects an intermediate time for step counts other than 2; ours ignores it there.
        intermediate_timesteps=1.3 if steps == 2 else None,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        complex_human_instruction=None,
        output_type="np",
    )


def timed_call(pipe, steps: int, size: int, seed: int):
    """`(wall seconds, process CPU seconds, images)` of one pipeline call."""
    gc.collect()
    cpu_start, start = time.process_time(), time.perf_counter()
    images = pipe(**call_kwargs(steps, size, seed)).images
    return time.perf_counter() - start, time.process_time() - cpu_start, images


class ComponentTimer:
    """Sums the wall time spent inside the forwards of given modules (outermost calls only)."""

    def __init__(self, modules: dict):
        self.total = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles = []
        for module in modules.values():
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start

    def remove(self):
        for handle in self._handles:
            handle.remove()


def component_modules(pipe) -> dict:
    # `vae.decode` is not `forward`; its work is in the decoder module.
    return {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer, "vae_decoder": pipe.vae.decoder}


def measure_overhead(pipe, steps: int, size: int, seed: int, repeats: int) -> float:
    """Median share of the wall time spent outside the text encoder, transformer and VAE decoder."""
    timer = ComponentTimer(component_modules(pipe))
    shares = []
    try:
        for _ in range(repeats):
            timer.total = 0.0
            elapsed, _, _ = timed_call(pipe, steps, size, seed)
            shares.append(1.0 - timer.total / elapsed)
    finally:
        timer.remove()
    return statistics.median(shares)


def bench(ours, reference, steps: int, size: int, repeats: int, warmup: int, seed: int, label: str = "") -> dict:
    ours_images = timed_call(ours, steps, size, seed)[-1]
    reference_images = timed_call(reference, steps, size, seed)[-1]
    max_diff = float(abs(ours_images.astype("float64") - reference_images.astype("float64")).max())
    print(f"[{steps} step(s){label}] parity: max |ours - diffusers| = {max_diff:.3e}", flush=True)
    if not max_diff <= PARITY_TOLERANCE:
        raise SystemExit(f"Parity check failed: max abs image difference {max_diff:.3e} > {PARITY_TOLERANCE}.")

    for _ in range(warmup):
        timed_call(ours, steps, size, seed)
        timed_call(reference, steps, size, seed)
    ours_times, reference_times, ours_cpu, reference_cpu = [], [], [], []
    for _ in range(repeats):
        wall, cpu, _ = timed_call(ours, steps, size, seed)
        ours_times.append(wall)
        ours_cpu.append(cpu)
        wall, cpu, _ = timed_call(reference, steps, size, seed)
        reference_times.append(wall)
        reference_cpu.append(cpu)

    ours_median = statistics.median(ours_times)
    reference_median = statistics.median(reference_times)
    result = dict(
        steps=steps,
        max_abs_diff=max_diff,
        ours_median_s=ours_median,
        diffusers_median_s=reference_median,
        ratio=ours_median / reference_median,
        # Robust to slow drifts of the machine's load: each timed pair ran back to back.
        paired_ratio_median=statistics.median(a / b for a, b in zip(ours_times, reference_times)),
        # Process CPU time (all threads): less sensitive to other processes than wall time.
        cpu_ratio=statistics.median(ours_cpu) / statistics.median(reference_cpu),
        ours_overhead=measure_overhead(ours, steps, size, seed, repeats),
        diffusers_overhead=measure_overhead(reference, steps, size, seed, repeats),
        ours_times_s=ours_times,
        diffusers_times_s=reference_times,
        ours_cpu_times_s=ours_cpu,
        diffusers_cpu_times_s=reference_cpu,
    )
    print(
        f"[{steps} step(s){label}] ours {1e3 * ours_median:.1f} ms, diffusers {1e3 * reference_median:.1f} ms, "
        f"ratio {result['ratio']:.3f} (paired {result['paired_ratio_median']:.3f}, "
        f"CPU time {result['cpu_ratio']:.3f}), "
        f"overhead ours {100 * result['ours_overhead']:.1f}% / diffusers {100 * result['diffusers_overhead']:.1f}%",
        flush=True,
    )
    return result


def bench_compile(ours, compiled, steps: int, size: int, repeats: int, warmup: int, seed: int) -> dict:
    """Eager vs `torch.compile`d transformer in our pipeline: parity, first-call time, interleaved medians."""
    start = time.perf_counter()
    compiled_images = timed_call(compiled, steps, size, seed)[-1]  # compiles on the first step count only
    first_call = time.perf_counter() - start
    eager_images = timed_call(ours, steps, size, seed)[-1]
    max_diff = float(abs(compiled_images.astype("float64") - eager_images.astype("float64")).max())
    if not max_diff <= PARITY_TOLERANCE:
        raise SystemExit(f"Compiled parity failed: max abs image difference {max_diff:.3e} > {PARITY_TOLERANCE}.")
    for _ in range(warmup):
        timed_call(ours, steps, size, seed)
        timed_call(compiled, steps, size, seed)
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times.append(timed_call(ours, steps, size, seed)[0])
        compiled_times.append(timed_call(compiled, steps, size, seed)[0])
    result = dict(
        steps=steps,
        max_abs_diff=max_diff,
        first_call_s=first_call,
        eager_median_s=statistics.median(eager_times),
        compiled_median_s=statistics.median(compiled_times),
        speedup=statistics.median(eager_times) / statistics.median(compiled_times),
        paired_speedup_median=statistics.median(a / b for a, b in zip(eager_times, compiled_times)),
        graphs_so_far=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
    )
    print(
        f"[{steps} step(s), compiled] parity {max_diff:.1e}, first call {result['first_call_s']:.1f} s, "
        f"eager {1e3 * result['eager_median_s']:.1f} ms, compiled {1e3 * result['compiled_median_s']:.1f} ms, "
        f"speed-up {result['speedup']:.2f}x (paired {result['paired_speedup_median']:.2f}x), "
        f"graphs compiled so far {result['graphs_so_far']}",
        flush=True,
    )
    return result


def lookup_costs(ours, repeats: int = 200) -> dict:
    """Microseconds per call of the per-call look-ups ours replaces, against diffusers' versions, same run."""
    import timeit

    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from diffusers_sprint.pipelines.pipeline_sana_sprint import _model_dtype

    pairs = {
        "_execution_device": (lambda: DiffusionPipeline._execution_device.fget(ours), lambda: ours._execution_device),
        "transformer dtype": (lambda: ours.transformer.dtype, lambda: ours.transformer.compute_dtype),
        "vae dtype": (lambda: ours.vae.dtype, lambda: _model_dtype(ours.vae)),
    }
    costs = {}
    for name, (theirs, mine) in pairs.items():
        assert theirs() == mine(), name
        best = [min(timeit.repeat(fn, number=repeats, repeat=5)) / repeats * 1e6 for fn in (theirs, mine)]
        costs[name] = dict(diffusers_us=best[0], ours_us=best[1])
        print(f"[look-up] {name}: diffusers {best[0]:.1f} us, ours {best[1]:.1f} us", flush=True)
    return costs


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="step counts to time (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per pipeline and step count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per pipeline before timing")
    parser.add_argument("--size", type=int, default=128, help="image height and width in pixels (multiple of 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--compile", action="store_true", help="also time our pipeline with torch.compile(transformer, fullgraph=True)"
    )
    args = parser.parse_args(argv)
    if args.size % VAE_SCALE != 0:
        parser.error(f"--size must be a multiple of {VAE_SCALE}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        ours, reference = build_pipelines(args.size, folder)
    # Move the many long-lived objects of the models and libraries out of the collector's reach: otherwise a full
    # collection (hundreds of ms here) lands inside random timed calls.
    gc.collect()
    gc.freeze()
    environment = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        # Other processes on the machine inflate and scatter the timings; the load average says how busy it was.
        loadavg_start=os.getloadavg()[0],
    )
    config = dict(
        size=args.size,
        latent_tokens=(args.size // VAE_SCALE) ** 2,
        batch=len(PROMPTS),
        max_sequence_length=300,
        transformer_params=parameter_count(ours.transformer),
        text_encoder_params=parameter_count(ours.text_encoder),
        vae_params=parameter_count(ours.vae),
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print("environment:", json.dumps(environment), flush=True)
    print("config:", json.dumps(config), flush=True)

    lookups = lookup_costs(ours)
    results = []
    for steps in args.steps:
        results.append(bench(ours, reference, steps, args.size, args.repeats, args.warmup, args.seed))

    compile_results, compiled_results = [], []
    if args.compile:
        compiled = diffusers_sprint.SanaSprintPipeline(**ours.components)
        compiled.transformer = torch.compile(ours.transformer, fullgraph=True)
        compiled.set_progress_bar_config(disable=True)
        torch._dynamo.utils.counters.clear()
        for steps in args.steps:
            compile_results.append(
                bench_compile(ours, compiled, steps, args.size, args.repeats, args.warmup, args.seed)
            )
        reference_compiled = diffusers.SanaSprintPipeline(**reference.components)
        reference_compiled.transformer = torch.compile(reference.transformer, fullgraph=True)
        reference_compiled.set_progress_bar_config(disable=True)
        for steps in args.steps:
            compiled_results.append(
                bench(
                    compiled,
                    reference_compiled,
                    steps,
                    args.size,
                    args.repeats,
                    args.warmup,
                    args.seed,
                    label=", both compiled",
                )
            )

    environment["loadavg_end"] = os.getloadavg()[0]
    print()
    print(
        "| steps | ours (ms) | diffusers (ms) | ours / diffusers | paired ratio | CPU-time ratio | overhead ours "
        "| overhead diffusers | max abs diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results + compiled_results:
        if r is (compiled_results or [None])[0]:
            print("| both transformers torch.compile'd | | | | | | | | |")
        print(
            f"| {r['steps']} | {1e3 * r['ours_median_s']:.1f} | {1e3 * r['diffusers_median_s']:.1f} "
            f"| {r['ratio']:.3f} | {r['paired_ratio_median']:.3f} | {r['cpu_ratio']:.3f} "
            f"| {100 * r['ours_overhead']:.1f}% | {100 * r['diffusers_overhead']:.1f}% | {r['max_abs_diff']:.1e} |"
        )
    print(
        f"(1-minute load average: {environment['loadavg_start']:.2f} at start, "
        f"{environment['loadavg_end']:.2f} at end)"
    )
    if compile_results:
        print("\n| steps | eager (ms) | compiled (ms) | speed-up | paired speed-up | first call (s) | max abs diff |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in compile_results:
            print(
                f"| {r['steps']} | {1e3 * r['eager_median_s']:.1f} | {1e3 * r['compiled_median_s']:.1f} "
                f"| {r['speedup']:.2f}x | {r['paired_speedup_median']:.2f}x | {r['first_call_s']:.1f} "
                f"| {r['max_abs_diff']:.1e} |"
            )
        print(f"graphs compiled over steps {args.steps}: {compile_results[-1]['graphs_so_far']}")
    if compiled_results:
        print(f"graphs compiled in all: {int(torch._dynamo.utils.counters['stats']['unique_graphs'])}")
    missed = [r["steps"] for r in results if r["ratio"] > TARGET_RATIO or r["ours_overhead"] > TARGET_OVERHEAD]
    print(
        f"\ntargets: ratio <= {TARGET_RATIO}, overhead <= {100 * TARGET_OVERHEAD:.0f}%: "
        + ("met" if not missed else f"missed for steps {missed}")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    environment=environment,
                    config=config,
                    results=results,
                    compile=compile_results,
                    compiled_vs_diffusers=compiled_results,
                    lookups=lookups,
                ),
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
