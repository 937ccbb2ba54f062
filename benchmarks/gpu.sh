#!/usr/bin/env bash
# Every GPU measurement of qwenkit in one run, on one CUDA GPU, beside transformers on the same GPU.
#
# A GPU machine may have no copy of the default model's file (and no network), so the models are
# random bf16 weights made on the spot (`--model random:PRESET`, seed 0, shared by every peer):
# the default model's shape (qwen2.5-0.5b) and Qwen2.5-7B's. Speed does not depend on the values.
# Runs, in order (outputs under OUT_DIR):
#   1. qwenkit bench, 0.5B: qwenkit bf16 / int8 / int4 (cuda-graphs backend), transformers eager and
#      compiled (static cache + torch.compile); prefill 512, decode b1 and b8; then b64.
#   2. qwenkit bench, 7B: qwenkit bf16, transformers eager and compiled; prefill, b1, b8.
#   3. paged decode attention: the in-place Triton kernel against gather + SDPA.
#   4. the engine: 64 concurrent requests x (256 + 128), cuda-graphs and torch backends (and
#      transformers' batched generate for 0.5B), with the fraction of the HBM bound.
#   5. speculative decoding against plain decoding (bench spec).
# Needs the machine's own torch (CUDA) and transformers; Triton comes with CUDA torch.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (not yet timed on a GPU; budget: under 8 minutes on an H200)
set -euo pipefail
out=${1:-runs/bench/gpu}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pip install -q --no-deps -e . 2>/dev/null || true
step() { "$@" || echo "[gpu.sh] failed with $?: $*" >&2; }  # one failure does not stop the rest
bench() { step python -m qwenkit.cli bench --device cuda --repeats 2 --timeout 300 "$@"; }
bench --model random:qwen2.5-0.5b --batch 8 --out "$out/qwen2.5-0.5b" \
  --configs qwenkit:bfloat16,qwenkit:bfloat16:int8,qwenkit:bfloat16:int4,transformers:bfloat16,transformers:bfloat16:compiled
bench --model random:qwen2.5-0.5b --batch 64 --out "$out/qwen2.5-0.5b-b64" \
  --configs qwenkit:bfloat16,transformers:bfloat16:compiled
bench --model random:qwen2.5-7b --batch 8 --out "$out/qwen2.5-7b" \
  --configs qwenkit:bfloat16,transformers:bfloat16,transformers:bfloat16:compiled
step python benchmarks/paged_attention_gpu.py --out "$out/paged-attention"
step python benchmarks/engine_gpu.py --model random:qwen2.5-0.5b --out "$out/engine-qwen2.5-0.5b"
step python benchmarks/engine_gpu.py --model random:qwen2.5-7b --no-peer --out "$out/engine-qwen2.5-7b"
# Speculative decoding against plain decoding, batch 1 (random weights: the verify step's cost and
# the back-off, not acceptance; token identity is reported for each workload).
step python -m qwenkit.cli bench spec --device cuda --model random:qwen2.5-0.5b --max-new-tokens 128 --repeats 3 \
  --out "$out/spec-qwen2.5-0.5b"
