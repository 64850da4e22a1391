#!/usr/bin/env bash
# GPU throughput check, Swin-B E6, JAX (bf16 and fp32) against the PyTorch reference (AMP bf16,
# channels-last, torch.compile where it works), batch 64 / 128 / 256. Prints images/s, MFU
# (FLOPs from XLA's cost analysis over the measured step time, against the card's bf16 peak)
# and the JAX/torch ratio. Stops starting new runs once BUDGET_S seconds have passed so the
# whole script ends inside about 5 minutes.
#
#   bash benchmarks/gpu_check.sh            # writes one JSON line per run to gpu_check.jsonl
#   BUDGET_S=240 BATCHES="64 128" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-270}
BATCHES=${BATCHES:-"64 128 256"}
OUT=${GPU_CHECK_OUT:-gpu_check.jsonl}
start=$SECONDS
: >"$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

run() {  # run LABEL ARGS...: one benchmark invocation, skipped when the budget is spent.
  local label=$1
  shift
  if (( SECONDS - start > BUDGET_S )); then
    echo "skipped (time budget): $label"
    return
  fi
  echo "== $label"
  local left=$(( BUDGET_S + 30 - (SECONDS - start) ))
  timeout "$left" "$PYTHON" -m benchmarks.throughput --model base --repeats 5 --json "$@" \
    >"$OUT.tmp" 2>"$OUT.err" || { echo "failed: $label"; tail -3 "$OUT.err"; return; }
  "$PYTHON" - "$OUT.tmp" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, e in r["frameworks"].items():
    mfu = f"  MFU {e['mfu']:.1%}" if e.get("mfu") else ""
    print(f"   {name:<6} {r['dtype']:<8} {r['mode']:<5} batch {r['batch']:<4}"
          f" {e['images_per_s']:9.1f} images/s{mfu}")
if "median_ratio" in r:
    print(f"   jax/torch median ratio {r['median_ratio']:.2f}")
PY
  "$PYTHON" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
    "$OUT.tmp" >>"$OUT"
}

# The headline pairs first (bf16 train against torch), then the rest as time allows.
for b in $BATCHES; do run "bf16 train b$b vs torch" --vs --mode train --dtype bfloat16 --batch "$b"; done
for b in $BATCHES; do run "bf16 eval b$b vs torch" --vs --mode eval --dtype bfloat16 --batch "$b"; done
for b in $BATCHES; do run "fp32 train b$b" --framework jax --mode train --dtype float32 --batch "$b"; done
for b in $BATCHES; do run "fp32 eval b$b" --framework jax --mode eval --dtype float32 --batch "$b"; done
run "bf16 train b128 vs torch.compile" --vs --mode train --dtype bfloat16 --batch 128 --torch-compile
rm -f "$OUT.tmp"
echo "done in $(( SECONDS - start )) s; results in $OUT"
