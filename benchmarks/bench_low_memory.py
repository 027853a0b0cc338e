"""Memory and latency of `SanaSprintPipeline`'s low-memory options against the plain pipeline, in one run.

Options (`OPTIONS`), each applied to a freshly loaded pipeline:

- `plain`: fp32, no hooks (the baseline).
- `torchao-int8`: the transformer loaded with diffusers' `quantization_config=TorchAoConfig(Int8WeightOnlyConfig())`
  (int8 weights with a per-row scale; the time embedding kept unquantised with `modules_to_not_convert`).
- `layerwise-fp8`: `transformer.enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=float32)`.
- `group-offload`: `pipe.enable_group_offload(onload_device=cpu, offload_type="block_level")`. With the CPU as both
  onload and offload device this only exercises the hooks (nothing moves, nothing is saved): on a GPU the idle
  blocks wait in CPU memory.
- `group-offload-disk`: the same with `offload_to_disk_path`: idle blocks are read back from safetensors files, so
  their RAM is released between uses (visible in the resident memory, not in the parameter bytes). The DC-AE is
  offloaded by its encoder and decoder (`SanaSprintPipeline.enable_group_offload`, diffusers #12319).
- `vae-tiling`: `pipe.vae.enable_tiling(...)` with tiles half the image side (the decoder sees one tile at a time).

Each option runs in its own process (peak RSS is per process) on the same saved pipeline and the same seed. Reported
per option: the transformer's parameter bytes (a torchao tensor counts its int8 data and scales), the resident memory
after loading and the peak over the run (MB, `/proc/self/statm` and `ru_maxrss`), the median latency of
`--repeats` calls after one warm-up, and the largest absolute difference of its `np` image from `plain`'s.

The toy model: the Sana-Sprint 0.6B transformer widths (1152 wide, 36 heads) with `--layers` blocks, random weights,
with `bench_pipeline.py`'s small Gemma2 text encoder, BPE tokenizer and 3-stage DC-AE (spatial compression 4, 16
latent channels). `--smoke` uses `sana_configs.tiny_config` widths instead (seconds; for the tests).

    python benchmarks/bench_low_memory.py                         # 128 px, 2 layers, 1 step, 3 repeats
    python benchmarks/bench_low_memory.py --size 256 --layers 4 --json low_memory.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import sana_configs  # noqa: E402
import torch  # noqa: E402
from bench_pipeline import LATENT_CHANNELS, TEXT_HIDDEN, VAE_SCALE, make_text_encoder, make_tokenizer, make_vae  # noqa: E402
from diffusers import SanaSprintPipeline as DiffusersSanaSprintPipeline  # noqa: E402
from diffusers import SCMScheduler  # noqa: E402

from diffusers_sprint import SanaSprintPipeline, SanaSprintTransformer2DModel  # noqa: E402


OPTIONS = ("plain", "torchao-int8", "layerwise-fp8", "group-offload", "group-offload-disk", "vae-tiling")
PROMPT = "a small red cat sitting on a blue house under the moon"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor`'s data; a tensor subclass (torchao's `Int8Tensor`) counts the inner tensors it flattens to."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by `module`'s parameters (each counted once)."""
    return sum(tensor_bytes(parameter) for parameter in module.parameters())


def transformer_config(smoke: bool, layers: int, size: int) -> dict:
    """The toy student transformer: 0.6B widths with `layers` blocks, or `tiny_config`'s with `smoke`."""
    config = sana_configs.student_config(sana_configs.transformer_config("0.6B"), logvar_head=False)
    if smoke:
        config = sana_configs.tiny_config(config)
    config.update(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, caption_channels=TEXT_HIDDEN)
    config.update(sample_size=size // VAE_SCALE, num_layers=layers)
    return config


def write_pipeline(folder: str, smoke: bool, layers: int, size: int) -> None:
    """A random-weight Sprint pipeline folder in diffusers' layout (non-trivial weights, seeded)."""
    torch.manual_seed(0)
    transformer = SanaSprintTransformer2DModel(**transformer_config(smoke, layers, size))
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    DiffusersSanaSprintPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_text_encoder(),
        vae=make_vae(),
        transformer=transformer,
        scheduler=SCMScheduler(),
    ).save_pretrained(folder)


def load_with_option(folder: str, option: str, size: int, offload_dir: str | None = None) -> SanaSprintPipeline:
    """The pipeline of `folder` with one low-memory `option` applied (see the module docstring)."""
    if option not in OPTIONS:
        raise ValueError(f"Unknown option {option!r}; allowed: {', '.join(OPTIONS)}.")
    kwargs = {}
    if option == "torchao-int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["time_embed"])
        kwargs["transformer"] = SanaSprintTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=config, torch_dtype=torch.float32
        )
    pipe = SanaSprintPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if option == "layerwise-fp8":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    elif option in ("group-offload", "group-offload-disk"):
        disk = {"offload_to_disk_path": offload_dir} if option == "group-offload-disk" else {}
        pipe.enable_group_offload(
            onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, **disk
        )
    elif option == "vae-tiling":
        tile = size // 2
        pipe.vae.enable_tiling(
            tile_sample_min_height=tile,
            tile_sample_min_width=tile,
            tile_sample_stride_height=tile - 16,
            tile_sample_stride_width=tile - 16,
        )
    return pipe


def generate(pipe: SanaSprintPipeline, size: int, steps: int) -> np.ndarray:
    """`PROMPT` at `size` px, seed 0, CFG scale 4.5: the `(1, size, size, 3)` image in [0, 1]."""
    kwargs = dict(height=size, width=size, use_resolution_binning=False, complex_human_instruction=None)
    generator = torch.Generator().manual_seed(0)
    output = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=4.5, generator=generator, output_type="np", **kwargs
    )
    return output.images


def _resident_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(folder: str, option: str, size: int, steps: int, repeats: int, image_path: str) -> dict:
    """Runs one option in this process; saves its image to `image_path` (`.npy`)."""
    with tempfile.TemporaryDirectory() as offload_dir:
        pipe = load_with_option(folder, option, size, offload_dir)
        transformer_bytes = parameter_bytes(pipe.transformer)
        resident_after_load = _resident_mb()
        image = generate(pipe, size, steps)  # warm-up (and, for disk offload, the first write)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(pipe, size, steps)
            seconds.append(time.perf_counter() - start)
        resident_after_run = _resident_mb()
    np.save(image_path, image)
    return {
        "option": option,
        "transformer_parameter_bytes": transformer_bytes,
        "resident_mb_after_load": round(resident_after_load, 1),
        "resident_mb_after_run": round(resident_after_run, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "median_seconds": statistics.median(seconds),
    }


def run_all(args) -> list[dict]:
    """Every option of `args.options` on one saved pipeline, each in its own process unless `args.in_process`
    (then the memory columns are those of the shared process); differences against `plain`."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "pipeline")
        write_pipeline(folder, args.smoke, args.layers, args.size)
        for option in args.options:
            image_path = os.path.join(root, f"{option}.npy")
            if args.in_process:
                rows.append(measure(folder, option, args.size, args.steps, args.repeats, image_path))
            else:
                command = [sys.executable, os.path.abspath(__file__), "--child", option, "--folder", folder]
                command += ["--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
                command += ["--image", image_path]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(output.strip().splitlines()[-1]))
            rows[-1]["image"] = np.load(image_path)
    plain = next((row["image"] for row in rows if row["option"] == "plain"), None)
    for row in rows:
        image = row.pop("image")
        row["max_abs_diff_vs_plain"] = None if plain is None else float(np.abs(image - plain).max())
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--size", type=int, default=128, help="Image side in pixels (a multiple of 32).")
    parser.add_argument("--layers", type=int, default=2, help="Transformer blocks of the toy model.")
    parser.add_argument("--steps", type=int, default=1, help="Sampling steps per call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per option (after one warm-up).")
    parser.add_argument("--smoke", action="store_true", help="Tiny widths (tests).")
    parser.add_argument("--in_process", action="store_true", help="All options in this process (tests; no RSS).")
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32, got {args.size}.")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child is not None:
        print(json.dumps(measure(args.folder, args.child, args.size, args.steps, args.repeats, args.image)))
        return []
    rows = run_all(args)
    plain_bytes = next((row["transformer_parameter_bytes"] for row in rows if row["option"] == "plain"), None)
    print(
        f"{'option':<20}{'params MB':>10}{'x plain':>9}{'RSS load':>10}{'RSS peak':>10}{'s/call':>9}{'max diff':>10}"
    )
    for row in rows:
        ratio = row["transformer_parameter_bytes"] / plain_bytes if plain_bytes else float("nan")
        print(
            f"{row['option']:<20}{row['transformer_parameter_bytes'] / 2**20:>10.2f}{ratio:>9.3f}"
            f"{row['resident_mb_after_load']:>10.0f}{row['peak_rss_mb']:>10.0f}{row['median_seconds']:>9.3f}"
            f"{row['max_abs_diff_vs_plain']:>10.4f}"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    return rows


if __name__ == "__main__":
    main()
