#!/usr/bin/env bash
# Launch a release recipe of examples/configs/ on one machine with its accelerate config. Run from the repository root:
#
#   TEACHER=<Sprint teacher folder> DATASET=<datasets id or folder> [OUTPUT_DIR=<output>] \
#     bash examples/configs/launch.sh <recipe> <ddp|fsdp2> [more flags, e.g. --validation_prompts "a red fox in the snow"]
#
# <recipe>: a <recipe>.yaml file beside this script, whose header names its accelerate config
# (examples/accelerate_configs/<ddp|fsdp2>.yaml). TEACHER: a diffusers Sana pipeline turned into a Sprint teacher
# (QK-norm + dense time) by examples/prepare_sana_sprint_teacher.py. OUTPUT_DIR defaults to the recipe name.
# Flags on the command line win over the recipe file.
set -euo pipefail
usage="usage: bash examples/configs/launch.sh <recipe> <ddp|fsdp2> [flags]"
recipe="${1:?$usage}"
config="${2:?$usage}"
shift 2
[[ -f "examples/configs/$recipe.yaml" ]] || { echo "no recipe examples/configs/$recipe.yaml; $usage" >&2; exit 2; }
[[ -f "examples/accelerate_configs/$config.yaml" ]] || {
  echo "no accelerate config examples/accelerate_configs/$config.yaml (ddp or fsdp2); $usage" >&2
  exit 2
}
: "${TEACHER:?set TEACHER to the Sprint teacher pipeline folder}"
: "${DATASET:?set DATASET to the training dataset (datasets id or folder)}"

exec accelerate launch --config_file "examples/accelerate_configs/$config.yaml" examples/train_sana_sprint.py \
  --config "examples/configs/$recipe.yaml" \
  --pretrained_teacher_model_name_or_path "$TEACHER" \
  --dataset_name "$DATASET" \
  --output_dir "${OUTPUT_DIR:-$recipe}" \
  "$@"
