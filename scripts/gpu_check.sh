#!/usr/bin/env bash
# The accelerator check in one call: the Llama-3.2-1B- and 3B-shape NPO step in bfloat16
# (ours with a live and with a cached reference, and the open-unlearning PyTorch step) on one GPU,
# tokens/s and the fraction of the bf16 matmul peak measured in the same run, one variant at a time.
#
#   bash scripts/gpu_check.sh                 # writes device.txt and bench_<preset>.txt under $OUT
#   STEPS=5 PRESETS=1b-shape bash scripts/gpu_check.sh
#
# Needs only what the bench imports (jax with its GPU plugin, flax, optax, torch, transformers);
# nothing is installed. Each preset has its own time limit so one slow compile cannot eat the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # peak memory as used, not as reserved

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import jax, torch, transformers, flax, optax; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__, \
'flax', flax.__version__, 'optax', optax.__version__)" 2>&1
} | tee "$OUT/device.txt"

status=0
for preset in ${PRESETS:-1b-shape 3b-shape}; do
  timeout "${LIMIT_S:-280}" $PY scripts/bench_step.py --preset "$preset" --dtype bfloat16 --batch "${BATCH:-8}" \
    --seq "${SEQ:-512}" --steps "${STEPS:-10}" --vs-torch --one-at-a-time --json 2>&1 | tee "$OUT/bench_$preset.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "bench $preset exited $rc"; status=1; }
done
exit $status
