#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the tests that take the `device` fixture (forward pass, parity
# with transformers, lens, streaming, generation) run on the GPU with `--device cuda`, and the gpu-marked ones;
# then the forward benchmark against transformers on a synthetic Llama-3.2-3B-shaped checkpoint (bf16, then
# fp32) on the GPU. The `demo` tests are left out: they need the package registry to build the embedded model.
#
# Usage: scripts/gpu_checks.sh [WORKDIR]   (WORKDIR holds the 6.4 GB synthetic checkpoint; default a temp dir)
# Runs from a plain checkout with torch, transformers, safetensors, tokenizers, numpy, pandas, tqdm and pytest
# importable.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LLAMA_LENS_HOME="$work/home" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
status=0
python3 -m pytest -q -p no:cacheprovider --device cuda -m "(device or gpu) and not demo" -rs \
  tests/integration/test_gpu.py tests/model/test_model.py tests/lens/test_lens.py tests/loading/test_stream.py || status=$?  # the benchmark runs anyway
python3 scripts/make_synthetic_checkpoint.py "$work/llama-3.2-3b-shaped"
for dtype in bfloat16 float32; do
  python3 scripts/bench_forward.py "$work/llama-3.2-3b-shaped" --device cuda --dtype "$dtype" --lengths 32 512
done
exit "$status"
