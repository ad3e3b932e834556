#!/usr/bin/env bash
# Second accuracy sweep around the first sweep's best (r=16, lr 4e-4, 4 epochs, train + dev[2000:]).
set -euo pipefail
runs=${RUNS:-/tmp/runs/sweep2}  # outside the carried source tree
C="train.report_to=none lora.r=16 train.epochs=4"
X="data.extra_train_from_dev=2000:"
python3 -m bench.accuracy_sweep --out "$runs" --parallel "${PARALLEL:-5}" \
  --run "t-lr4e4-e4=lora.alpha=32 train.learning_rate=4e-4 $C" \
  --run "x-lr6e4-e4=lora.alpha=32 train.learning_rate=6e-4 $X $C" \
  --run "x-a64-lr4e4-e4=lora.alpha=64 train.learning_rate=4e-4 $X $C" \
  --run "x-lr5e4-ls05-e4=lora.alpha=32 train.learning_rate=5e-4 train.label_smoothing=0.05 $X $C" \
  --run "x-lr4e4-e4=lora.alpha=32 train.learning_rate=4e-4 $X $C" \
  | tee "$OUT/sweep2.log"
# Pack the best run by selection-dev accuracy (bf16 weights) for the trip back.
best=$(python3 -c "import json,sys; r=[x for x in json.load(open('$runs/summary.json')) if x['status']=='ok']; print(max(r, key=lambda x: x['dev_accuracy'])['name'])")
python3 -m bench.pack_adapter "$runs/$best" "/tmp/pack/$best"
tar -czf "$OUT/best-adapter.tar.gz" -C /tmp/pack "$best"
(cd "$runs" && tar -czf "$OUT/sweep2-logs.tar.gz" *.log summary.json */report.json */report.md)
