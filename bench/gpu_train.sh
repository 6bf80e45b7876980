#!/usr/bin/env bash
# The GPU checks, in one call on a machine with CUDA (e.g. the device tool):
#   bash bench/gpu_train.sh [OUT]
# 1. the paper's command on 6,016 planted pairs (150 epochs, full batch) on CUDA in fp32 and bf16;
# 2. torchrun --nproc_per_node 1 (NCCL) at --batch-size 4096 on 200,000 planted pairs, 1 epoch;
# 3. RN50x4 extraction on CUDA (random weights), fp32 and bf16, channels_last, batch 256, 1,200 images:
#    the pipeline end to end against the forward pass alone (bench/extract.py).
# Each prints a table; the JSON goes to bench/results/ and, when OUT is given, is copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
stamp=$(mktemp)
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: these checks need one")'
"$PY" bench/train_scale.py --device cuda --pairs 6016 --batch-sizes full --epochs 150 --test-split 0.25 \
    --precisions fp32 bf16 --timeout 1200
"$PY" bench/train_scale.py --device cuda --pairs 200000 --batch-sizes 4096 --ranks 1 --torchrun --epochs 1 \
    --timeout 1200
"$PY" bench/extract.py --device cuda --batch 256 --pairs 600 --precisions fp32 bf16 --formats cl --repeats 1 \
    --workers "$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))"
if [ $# -ge 1 ]; then
  mkdir -p "$1" && find bench/results \( -name 'train_scale-*.json' -o -name 'extract-*.json' \) -newer "$stamp" \
    -exec cp {} "$1"/ \;
fi
rm -f "$stamp"
