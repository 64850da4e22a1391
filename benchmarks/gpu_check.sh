#!/usr/bin/env bash
# GPU check in one call: Swin-B E6, JAX (bf16, fp32/TF32; train and eval; batch 64/128/256)
# against the PyTorch reference (AMP bf16 eager, channels-last, torch.compile), MFU, peak
# memory, a profile of the bf16 train step, and the baseline commit when it is available.
# docs/benchmarks.md ("GPU check (H200)") has the device-tool command; benchmarks/gpu_check.py
# the details. Arguments go to it (e.g. --dry_run: the same on the CPU with a tiny model).
#
#   bash benchmarks/gpu_check.sh                    # results in $OUT, else benchmarks/results/<time>
#   BUDGET_S=200 BATCHES="128" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/hyperiqa_jax_site}

# The GPU image lacks grain and ml_collections: install the carried wheels (see
# benchmarks/fetch_gpu_wheels.sh) into a temporary target, first on the path.
if ! "$PYTHON" -c "import grain, ml_collections" 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "grain / ml_collections missing and no wheels in $WHEELS:" \
         "run benchmarks/fetch_gpu_wheels.sh here and carry .whl" >&2
    exit 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PYTHON" -u -m benchmarks.gpu_check "$@"
