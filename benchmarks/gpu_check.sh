#!/usr/bin/env bash
# The prepared GPU check (one lent H100/H200, if this task gets one; it may never run).
#
# Here, once, to let the end-to-end part run there (the GPU image has torch and transformers but not
# transformer_lens and a few of its import-time dependencies; nothing can be fetched there):
#     bash benchmarks/gpu_check.sh --fetch-wheels          # -> benchmarks/.wheels (git-ignored, ~2 MB)
# Then, through the device tool, from the repo root, carrying the wheels:
#     run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/.wheels"], timeout_s=540)
# It prints nvidia-smi's line and one JSON document (also written to $OUT/gpu_bench.json). Without CUDA it
# prints {"cuda": false, "skipped": ...} and exits 0, so it is safe to run on a CPU machine too.
# Extra arguments go to gpu_bench.py (e.g. --d-sae 24576 --batch 4096 16384 --e2e off).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHEELS="$HERE/.wheels"
# transformer_lens and what it imports that the GPU image lacks (checked with `import transformer_lens`)
E2E_WHEELS=(transformer-lens==4.3.0 datasets dill multiprocess)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  # the GPU image's python3 is 3.12; these are pure-Python wheels or per-Python-version ones
  nice -n 19 python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "${E2E_WHEELS[@]}"
  ls -la "$WHEELS"
  exit $?
fi

PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$HERE/results}"
mkdir -p "$OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
if [ -d "$WHEELS" ] && ! "$PY" -c 'import transformer_lens' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl \
    || echo "could not install the carried wheels; the e2e part will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the CUDA path against the CPU one first (tests/test_gpu.py; needs pytest on the image)
if "$PY" -c 'import pytest' 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
else
  echo "pytest is not installed here: tests/test_gpu.py not run"
fi
timeout "${GPU_BENCH_TIMEOUT:-500}" "$PY" "$HERE/gpu_bench.py" --json "$OUTDIR/gpu_bench.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_bench.py timed out (GPU_BENCH_TIMEOUT=${GPU_BENCH_TIMEOUT:-500}s)"
exit $rc
