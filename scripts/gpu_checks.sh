#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the gpu-marked tests, then the forward benchmark against
# transformers on a synthetic Llama-3.2-3B-shaped checkpoint (bf16, then fp32) on the GPU.
#
# Usage: scripts/gpu_checks.sh [WORKDIR]   (WORKDIR holds the 6.4 GB synthetic checkpoint; default a temp dir)
# Runs from a plain checkout with torch, transformers, safetensors, tokenizers, pandas and tqdm importable.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LLAMA_LENS_HOME="$work/home" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
status=0
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py || status=$?  # the benchmark runs anyway
python3 scripts/make_synthetic_checkpoint.py "$work/llama-3.2-3b-shaped"
for dtype in bfloat16 float32; do
  python3 scripts/bench_forward.py "$work/llama-3.2-3b-shaped" --device cuda --dtype "$dtype" --lengths 32 512
done
exit "$status"
