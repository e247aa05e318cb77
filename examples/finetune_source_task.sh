#!/usr/bin/env bash
# The measurements of docs/finetune.md, end to end on 2 CPU cores (~10 minutes):
#   1. pretrain a tiny VQMoE and a tiny top-2 SMoE on the default synthetic corpus (same shape, dropless);
#   2. fine-tune both on the 5-way "which source is this snippet from" task in every mode, measuring accuracy
#      and expert FLOPs per token on the test forward;
#   3. convert the top-2 SMoE to VQMoE without training and compare held-out BPC;
#   4. routing analysis of the VQMoE run across its checkpoints, and embedding probes.
# Usage: [OUT=runs/ft_demo] [STEPS=400] [FT_STEPS=100] [SEEDS="1 2 3"] [CHARS=8] bash examples/finetune_source_task.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ft_demo}; STEPS=${STEPS:-400}; FT_STEPS=${FT_STEPS:-100}; SEEDS=${SEEDS:-"1 2 3"}
CHARS=${CHARS:-8}  # snippet length of the task: shorter is harder
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/vqmoe_ds/torch_extensions}
PY=${PY:-.venv/bin/python}; TR=${TR:-.venv/bin/torchrun}
CFG=ds_configs/cpu_fp32.json
mkdir -p "$OUT"
COMMON=(--config tiny --num-experts 4 --top-k 2 --no-drop-tokens --deepspeed_config $CFG --train-iters $STEPS
        --micro-batch-size 16 --lr 3e-3 --lr-warmup-iters 20 --corpus-bytes 1000000 --eval-interval 100
        --save-interval 100 --eval-iters 20 --test-iters 20 --log-interval 50 --no-progress --no-plots)
[ -f "$OUT/pre_vqmoe/results.json" ] || $TR --nproc_per_node=1 --master_port=29701 pretrain_vqmoe.py "${COMMON[@]}" \
    --router vqmoe --codebook-size 8 --out-dir "$OUT/pre_vqmoe" > "$OUT/pre_vqmoe.log" 2>&1
[ -f "$OUT/pre_topk/results.json" ] || $TR --nproc_per_node=1 --master_port=29702 pretrain_vqmoe.py "${COMMON[@]}" \
    --router topk --out-dir "$OUT/pre_topk" > "$OUT/pre_topk.log" 2>&1
$PY -c "from vqmoe_ds.finetune.source_task import write_source_task as w; w('$OUT/task$CHARS', 1000, 1000, $CHARS)"
FT=(--task csv --train "$OUT/task$CHARS/train.csv" --test "$OUT/task$CHARS/test.csv" --deepspeed_config $CFG
    --train-iters $FT_STEPS --micro-batch-size 16 --lr 1e-3 --lr-warmup-iters 10 --log-interval 50 --no-drop-tokens)
for seed in $SEEDS; do
  for run in "pre_vqmoe discrete" "pre_vqmoe full" "pre_vqmoe frozen_router" "pre_topk frozen_router" "pre_topk full"; do
    set -- $run
    d="$OUT/ft${CHARS}_${1#pre_}_$2_s$seed"
    [ -f "$d/results.json" ] || $TR --nproc_per_node=1 --master_port=29703 finetune_vqmoe.py --load "$OUT/$1" \
        --mode $2 --seed $seed --out-dir "$d" "${FT[@]}" > "$d.log" 2>&1
  done
done
for share in 0.0 0.1; do
  $PY tools/convert_to_vqmoe.py --load "$OUT/pre_topk" --out-dir "$OUT/conv_$share" --discrete-share $share \
      --eval --split test --eval-iters 0 > "$OUT/conv_$share.log" 2>&1
done
$PY tools/analyze_routing.py --load "$OUT/pre_vqmoe" --tags step100,step200,step300,step$STEPS \
    --out-dir "$OUT/analysis_vqmoe" > "$OUT/analysis_vqmoe.log" 2>&1
$PY tools/analyze_routing.py --load "$OUT/pre_topk" --tags step100,step200,step300,step$STEPS \
    --out-dir "$OUT/analysis_topk" > "$OUT/analysis_topk.log" 2>&1
for m in pre_vqmoe pre_topk conv_0.0; do
  $PY tools/embed.py --load "$OUT/$m" --train "$OUT/task$CHARS/train.csv" --test "$OUT/task$CHARS/test.csv" \
      --out "$OUT/embed${CHARS}_$m.json" > "$OUT/embed${CHARS}_$m.log" 2>&1
done
$PY tools/embed.py --load "$OUT/pre_vqmoe" --discrete-only --train "$OUT/task$CHARS/train.csv" --test "$OUT/task$CHARS/test.csv" \
    --out "$OUT/embed${CHARS}_pre_vqmoe_discrete.json" > "$OUT/embed${CHARS}_pre_vqmoe_discrete.log" 2>&1
$PY tools/embed.py --load "$OUT/conv_0.0" --discrete-only --train "$OUT/task$CHARS/train.csv" --test "$OUT/task$CHARS/test.csv" \
    --out "$OUT/embed${CHARS}_conv_discrete.json" > "$OUT/embed${CHARS}_conv_discrete.log" 2>&1
echo "done: $OUT"
