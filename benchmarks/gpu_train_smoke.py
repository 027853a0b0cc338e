"""Multi-GPU smoke runs of `examples/train_sana_sprint.py`: DDP and FSDP2 on a random-weight Sana config.

    python benchmarks/gpu_train_smoke.py                 # GPU machine: 0.6B teacher at 512 px, bf16, all GPUs
    python benchmarks/gpu_train_smoke.py --smoke         # CPU: tiny configs, 2 gloo processes (the test runs this)

What it does, with nothing downloaded:

1. Writes a diffusers `SanaPipeline` folder with random weights: the released Sana-Sprint 0.6B transformer config as
   the (flow-matching, QK-norm) teacher, the DC-AE f32c32 config, a one-layer Gemma-2 at the real caption width with
   a locally trained tokenizer (`benchmarks/sana_configs.py`), and an image folder of random captioned images.
2. Runs the distillation script three times through `accelerate launch` on N processes (N = the GPU count, at least
   2; 2 gloo processes with `--smoke`): DDP, FSDP2 (`--fsdp`: student, teacher and heads sharded), and FSDP2 resumed
   from its step-2 checkpoint. All with the official full-batch LADD fake (`--no-fake_from_scm_forward`), so DDP and
   FSDP2 compute the same math.
3. Prints one table (seconds per iteration, peak GPU memory per rank, final losses, DDP-vs-FSDP2 and resume
   differences) and writes JSON. Exit status 1 when a run fails or the runs disagree beyond the tolerance (bf16 on
   GPU: relative 5e-2 on the losses; fp32 on CPU: 1e-4), or the resume is not exact.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

import sana_configs  # noqa: E402
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Gemma2Config, Gemma2Model  # noqa: E402

from diffusers_sprint import SanaSprintTransformer2DModel  # noqa: E402
from diffusers_sprint.toy.tokenizer import train_gemma_layout_tokenizer  # noqa: E402


WORDS = "a red blue green small big cat dog house tree car moon sun star flower bird".split()


def write_teacher(folder: Path, smoke: bool) -> dict:
    """A random-weight Sana pipeline folder; returns its sizes."""
    torch.manual_seed(0)
    if smoke:
        transformer = dict(sana_configs.TINY_TRANSFORMER)
        vae_config = dict(sana_configs.TINY_DC_AE)
    else:
        transformer = sana_configs.teacher_config(sana_configs.transformer_config("0.6B"))
        vae_config = dict(sana_configs.DC_AE_F32C32)
    transformer.update(qk_norm="rms_norm_across_heads", guidance_embeds=False, flow_time_scale=1.0)
    caption_channels = transformer["caption_channels"]
    heads = 8 if caption_channels % 8 == 0 else 2
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=256,
            hidden_size=caption_channels,
            intermediate_size=2 * caption_channels,
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=caption_channels // heads,
            max_position_embeddings=1024,
            attn_implementation="eager",
        )
    )
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    SanaPipeline(
        tokenizer=train_gemma_layout_tokenizer(texts, vocab_size=200),
        text_encoder=text_encoder,
        vae=AutoencoderDC(**vae_config),
        transformer=SanaSprintTransformer2DModel(**transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    ).save_pretrained(folder)
    return {"caption_channels": caption_channels, "layers": transformer["num_layers"]}


def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": " ".join(rng.choice(WORDS, 4))})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def launch(args, root: Path, name: str, extra: list[str], num_processes: int) -> dict:
    output = root / name
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--num_processes", str(num_processes), "--multi_gpu", "--main_process_port", str(args.port)]
    command += ["--mixed_precision", "no" if args.smoke else "bf16", str(REPO / "examples" / "train_sana_sprint.py")]
    command += ["--pretrained_teacher_model_name_or_path", str(root / "teacher"), "--train_data_dir"]
    command += [str(root / "images"), "--cache_dir", str(root / "hf_cache"), "--resolution", str(args.resolution)]
    command += ["--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps)]
    command += ["--checkpointing_steps", "2", "--max_sequence_length", "16", "--no-complex_human_instruction"]
    command += ["--no-fake_from_scm_forward", "--learning_rate", "1e-4", "--tangent_warmup_steps", "2"]
    command += ["--report_to", "none", "--seed", "0", "--output_dir", str(output)]
    command += ([] if args.smoke else ["--gradient_checkpointing"]) + extra
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.smoke:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"name": name, "ok": False, "error": (result.stdout + result.stderr)[-3000:]}
    log = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    weights = output / "transformer" / "diffusion_pytorch_model.safetensors"
    return {
        "name": name,
        "ok": True,
        "seconds": seconds,
        "log": log,
        "peak_memory_gb": max(row.get("peak_memory_gb", 0.0) for row in log),
        "weights": str(weights),
    }


def max_relative(a: list[dict], b: list[dict], keys=("generator_loss", "discriminator_loss")) -> float:
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b) for k in keys)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny configs, 2 gloo processes on the CPU.")
    parser.add_argument("--resolution", type=int, default=None, help="Pixels (default 512; 32 with --smoke).")
    parser.add_argument("--batch_size", type=int, default=1, help="Samples per process and micro-batch.")
    parser.add_argument("--steps", type=int, default=3, help="Iterations per run (a checkpoint at 2).")
    parser.add_argument("--num_processes", type=int, default=None, help="Default: the GPU count (2 with --smoke).")
    parser.add_argument("--port", type=int, default=29533, help="Rendezvous port of the launches.")
    parser.add_argument("--timeout", type=int, default=900, help="Seconds per run.")
    parser.add_argument("--workdir", type=str, default=None, help="Where the assets and runs go (default: temp).")
    parser.add_argument("--json", type=str, default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (32 if args.smoke else 512)
    num_processes = args.num_processes or (2 if args.smoke else torch.cuda.device_count())
    if num_processes < 2:
        print(f"gpu_train_smoke: needs at least 2 processes (found {num_processes} GPUs); nothing run.")
        return 1
    root = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_train_smoke_"))
    write_teacher(root / "teacher", args.smoke)
    write_images(root / "images", count=4 * num_processes * args.batch_size, size=args.resolution)
    runs = [
        launch(args, root, "ddp", [], num_processes),
        launch(args, root, "fsdp2", ["--fsdp"], num_processes),
    ]
    resumed = {"name": "fsdp2 resumed", "ok": False, "error": "the fsdp2 run failed"}
    if runs[1]["ok"]:
        before = load_file(runs[1]["weights"])
        resumed = launch(args, root, "fsdp2", ["--fsdp", "--resume_from_checkpoint", "latest"], num_processes)
        if resumed["ok"]:
            after = load_file(resumed["weights"])
            resumed["exact"] = all(torch.equal(after[k], v) for k, v in before.items())
        resumed["name"] = "fsdp2 resumed"
    runs.append(resumed)

    tolerance = 1e-4 if args.smoke else 5e-2
    ok = all(run["ok"] for run in runs)
    agreement = max_relative(runs[1]["log"], runs[0]["log"]) if ok else float("nan")
    ok = ok and agreement <= tolerance and resumed.get("exact", False)
    print(f"\n{num_processes} processes, {args.resolution} px, batch {args.batch_size}, {args.steps} iterations")
    print(f"{'run':<16} {'ok':<4} {'s/iter':>8} {'peak GB':>8} {'G loss':>10} {'D loss':>10}")
    for run in runs:
        if not run["ok"]:
            print(f"{run['name']:<16} no   {run['error'][-400:]}")
            continue
        last = run["log"][-1]
        print(
            f"{run['name']:<16} yes  {run['seconds'] / args.steps:8.2f} {run['peak_memory_gb']:8.2f} "
            f"{last['generator_loss']:10.5f} {last.get('discriminator_loss', float('nan')):10.5f}"
        )
    print(f"DDP vs FSDP2 losses: max relative difference {agreement:.2e} (tolerance {tolerance:.0e})")
    print(f"FSDP2 resume from checkpoint-2 exact: {resumed.get('exact', False)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"ok": ok, "agreement": agreement, "runs": runs, "num_processes": num_processes}, indent=2)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
