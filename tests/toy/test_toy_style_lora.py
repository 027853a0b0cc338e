"""examples/toy/train_toy_style_lora.py: a style LoRA of the toy teacher in diffusers' format (docs/lora.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "toy" / "train_toy_style_lora.py"


def test_style_lora_trains_on_the_restyled_tuning_rows_and_loads_with_diffusers(tmp_path):
    from diffusers import SanaPipeline

    from diffusers_sprint.toy import TOY_TEACHER_PATH

    output = tmp_path / "style"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    command = [sys.executable, SCRIPT, "--steps", "2", "--warmup_steps", "1", "--limit", "32", "--rank", "4"]
    command += ["--output_dir", output]
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((output / "training_info.json").read_text())
    assert info["train_rows"] == 16 and info["args"]["style"] == "grayscale"  # the tuning half of 32 rows
    weights = load_file(output / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and ".lora_" in key for key in weights)
    assert {key.split(".")[-3] for key in weights} == {"to_q", "to_k", "to_v", "0"}
    assert all(weights[key].abs().max() > 0 for key in weights if ".lora_B." in key)  # trained off zero

    pipe = SanaPipeline.from_pretrained(TOY_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=2, use_resolution_binning=False, output_type="np")
    kwargs.update(complex_human_instruction=None)
    base = pipe("an emoji of fire", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(output, adapter_name="style")
    styled = pipe("an emoji of fire", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(styled - base).max() > 1e-3
