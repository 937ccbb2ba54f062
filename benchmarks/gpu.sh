#!/usr/bin/env bash
# qwenkit bench on one CUDA GPU, beside transformers on the same GPU, in bf16.
#
# A GPU machine may have no copy of the default model's file (and no network), so both models
# are random bf16 weights made on the spot (`--model random:PRESET`, seed 0, shared by both
# peers): the default model's shape (qwen2.5-0.5b) and Qwen2.5-7B's. Speed does not depend on
# the values. Usage: bash benchmarks/gpu.sh [OUT_DIR]   (about 6-8 minutes on an H200)
set -euo pipefail
out=${1:-runs/bench/gpu}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pip install -q --no-deps -e . 2>/dev/null || true
for shape in qwen2.5-0.5b qwen2.5-7b; do
  python -m qwenkit.cli bench --device cuda --model "random:$shape" \
    --configs qwenkit:bfloat16,transformers:bfloat16 --repeats 3 --timeout 240 --out "$out/$shape"
done
# Speculative decoding against plain decoding, batch 1 (random weights: the verify step's cost and
# the back-off, not acceptance; token identity is reported for each workload).
python -m qwenkit.cli bench spec --device cuda --model random:qwen2.5-0.5b --max-new-tokens 128 --repeats 3 \
  --out "$out/spec-qwen2.5-0.5b"
