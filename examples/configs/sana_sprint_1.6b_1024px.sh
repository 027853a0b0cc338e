#!/usr/bin/env bash
# SANA-Sprint 1.6B at 1024 px with the official recipe (sana_sprint_1.6b_1024px.args) on one machine with 8 GPUs
# (examples/accelerate_configs/ddp.yaml). Run from the repository root:
#
#   TEACHER=<Sprint teacher folder> DATASET=<datasets id or folder> OUTPUT_DIR=<output> \
#     bash examples/configs/sana_sprint_1.6b_1024px.sh [more flags, e.g. --validation_prompts "a red fox in the snow"]
#
# TEACHER: a diffusers Sana pipeline turned into a Sprint teacher (QK-norm + dense time) by
# examples/prepare_sana_sprint_teacher.py, e.g. from Efficient-Large-Model/Sana_1600M_1024px_diffusers.
# Flags given here after the recipe win over it (argparse keeps the last value).
set -euo pipefail
: "${TEACHER:?set TEACHER to the Sprint teacher pipeline folder}"
: "${DATASET:?set DATASET to the training dataset (datasets id or folder)}"
OUTPUT_DIR="${OUTPUT_DIR:-sana_sprint_1.6b_1024px}"

accelerate launch --config_file examples/accelerate_configs/ddp.yaml examples/train_sana_sprint.py \
  @examples/configs/sana_sprint_1.6b_1024px.args \
  --pretrained_teacher_model_name_or_path "$TEACHER" \
  --dataset_name "$DATASET" \
  --output_dir "$OUTPUT_DIR" \
  "$@"
