#!/usr/bin/env bash
# Dense / SMoE top-2 / SoftMoE / VQMoE tiny ViTs on the synthetic image task, same steps, data and seed;
# prints the table of docs/vision.md.  ~minutes per model on 2 CPU cores.
#   bash examples/vision_synthetic_compare.sh [STEPS] [OUT_ROOT] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
OUT=${2:-runs/vision_compare}
SEED=${3:-1234}
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/vqmoe_ds/torch_extensions}
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
COMMON=(--config tiny --deepspeed_config ds_configs/cpu_fp32.json --train-iters "$STEPS" --lr 2e-3
        --lr-warmup-iters 20 --micro-batch-size 64 --log-interval 25 --eval-interval 100 --seed "$SEED"
        --num-classes 8 --no-progress)
declare -A ROUTER=([dense]="--router dense" [smoe_top2]="--router topk --top-k 2" [softmoe]="--router soft --soft-slots 4"
                   [vqmoe]="--router vqmoe --top-k 2 --codebook-size 8")
for name in dense smoe_top2 softmoe vqmoe; do
  # shellcheck disable=SC2086
  $TORCHRUN --nproc_per_node=1 --master_port=$((29700 + RANDOM % 200)) train_vision.py "${COMMON[@]}" ${ROUTER[$name]} \
    --out-dir "$OUT/$name" > "$OUT.$name.log" 2>&1 || { echo "$name failed, see $OUT.$name.log"; exit 1; }
done
$PY - "$OUT" <<'PYEOF'
import json, os, sys
root = sys.argv[1]
print("| model | params (total / active per token) | best valid acc | test acc | test loss |")
print("|---|---|---|---|---|")
for name in ("dense", "smoe_top2", "softmoe", "vqmoe"):
    info = json.load(open(os.path.join(root, name, "run_info.json")))
    res = json.load(open(os.path.join(root, name, "results.json")))
    p = info["params"]
    print(f"| {name} | {p['total'] / 1e3:.0f}k / {p['active'] / 1e3:.0f}k | {100 * res['best_valid']['acc']:.1f}% | "
          f"{100 * res['test']['acc']:.1f}% | {res['test']['loss']:.3f} |")
PYEOF
