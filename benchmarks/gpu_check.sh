#!/usr/bin/env bash
# One prepared run for a lent GPU (< 8 minutes on one H200): the CUDA tests (bf16 autocast, compile,
# fused AdamW, torchrun over nccl on every GPU present, ORT's CUDA provider and IOBinding decode),
# then one JSON line with gpt2-124m training tokens/s and MFU, decode tokens/s and pass/fail per check.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, from the repo root
#   GPTFLOW_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --shape tiny   # a dry run on a CPU
#
# It needs torch, numpy, safetensors, sentencepiece, onnx, onnxscript, onnxruntime, tqdm, pyyaml and
# pytest (what the GPU image has); nothing is downloaded. Packages missing there can travel as wheels
# in .whl/ (see /work/.library/device/README.md): they are installed into a temp dir first.
# Extra arguments go to benchmarks/gpu_check.py. Writes results under ${OUT:-a temp dir}.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gptflow-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gptflow-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 420 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/cuda-junit.xml" \
  2>&1 | tee "$OUT/cuda-tests.log" | tail -25
timeout 240 $PY benchmarks/gpu_check.py --junit "$OUT/cuda-junit.xml" "$@" | tee "$OUT/gpu_check.json"
