#!/usr/bin/env bash
# The accuracy sweep for the smollm2-135m-snli recipe, run in one device call (see BENCHMARKS.md).
# Expects NLI_CACHE_DIR (converted default model), NLI_SNLI_DIR (train/dev/test jsonl) and OUT.
set -euo pipefail
runs=${RUNS:-runs/sweep}
# The GPU image has no tensorboard; logs still go to each run's log file.
C="train.report_to=none"
X="data.extra_train_from_dev=2000:"
python3 -m bench.accuracy_sweep --out "$runs" --parallel "${PARALLEL:-8}" \
  --run "r16-trainonly-e3=lora.r=16 lora.alpha=32 train.learning_rate=2e-4 train.epochs=3 $C" \
  --run "r16-lr2e4-e3=lora.r=16 lora.alpha=32 train.learning_rate=2e-4 train.epochs=3 $X $C" \
  --run "r16-lr4e4-e4=lora.r=16 lora.alpha=32 train.learning_rate=4e-4 train.epochs=4 $X $C" \
  --run "r16-a64-e4=lora.r=16 lora.alpha=64 train.learning_rate=2e-4 train.epochs=4 $X $C" \
  --run "r16-ls0-e4=lora.r=16 lora.alpha=32 train.learning_rate=2e-4 train.epochs=4 train.label_smoothing=0.0 $X $C" \
  --run "r8-lr4e4-e4=lora.r=8 lora.alpha=16 train.learning_rate=4e-4 train.epochs=4 $X $C" \
  --run "r16-lr3e4-e5=lora.r=16 lora.alpha=32 train.learning_rate=3e-4 train.epochs=5 $X $C" \
  --run "r32-lr2e4-e3=lora.r=32 lora.alpha=64 train.learning_rate=2e-4 train.epochs=3 $X $C" \
  | tee "$OUT/sweep.log"
