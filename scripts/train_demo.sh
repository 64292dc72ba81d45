#!/usr/bin/env bash
# Train the embedded demo model (terdit/demo) and its full-precision twin, then measure them.
# This is the exact recipe behind terdit/demo (see terdit/demo/README.md for the wall times and
# the machine). Each stage resumes where it stopped when run again (the trainer resumes
# bit-identically), so the script can be split over several sessions.
#
#   1. fp pre-training, 1500 steps, constant lr after a warm-up            (OUT/fp_pre)
#   2a. ternary QAT from the step-1500 fp weights, 2000 steps, cosine lr   (OUT/ternary)
#   2b. the fp twin: the same 2000 steps from the same weights in fp       (OUT/fp)
#   3. metrics (N = 1000, balanced labels) of both and of real images (the floor), the grid
#
# Usage: bash scripts/train_demo.sh [OUT]   (default out/demo-train; THREADS=1 per run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/demo-train}
PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
CONFIG=terdit/demo/model_config.json
COMMON=(--model-config "$CONFIG" --data fashion-mnist --global-batch 128 --seed 0 --threads "$THREADS"
        --precision bf16 --compile --ckpt-every 250 --log-every 20 --sample-every 1000
        --sample-steps 25 --sample-cfg-scale 3.0 --no-progress)

resume_flag() { [ -f "$1/checkpoints/latest" ] && echo "--resume latest" || true; }

# 1. fp pre-training (live weights at the end: the starting point of both branches)
"$PY" -m terdit.train "${COMMON[@]}" --fp --out "$OUT/fp_pre" --steps 1500 --lr 6e-4 \
    --lr-schedule constant --warmup-steps 300 --final-from live --final-weights latent \
    $(resume_flag "$OUT/fp_pre")

# 2. the two branches, concurrently (one CPU thread each)
BRANCH=(--init-from "$OUT/fp_pre/final" --steps 2000 --lr 4e-4 --lr-schedule cosine --warmup-steps 100)
"$PY" -m terdit.train "${COMMON[@]}" "${BRANCH[@]}" --out "$OUT/ternary" $(resume_flag "$OUT/ternary") &
"$PY" -m terdit.train "${COMMON[@]}" "${BRANCH[@]}" --fp --out "$OUT/fp" $(resume_flag "$OUT/fp") &
wait

# 3. metrics: FID against the 1000 first test images, class accuracy, and the real-data floor
METRICS=(--threads "$THREADS" metrics --num-images 1000 --ref fashion-mnist:test --ref-count 1000
         --classifier terdit/demo/classifier.safetensors --no-progress)
SAMPLING=(--sampler ddim --steps 50 --cfg-scale 3.0 --seed 0 --batch-size 100)  # the quick start's
"$PY" -m terdit.evaluate "${METRICS[@]}" "${SAMPLING[@]}" --model "$OUT/ternary/final" \
    --save-samples "$OUT/ternary_samples.npz" --out "$OUT/metrics_ternary.json"
"$PY" -m terdit.evaluate "${METRICS[@]}" "${SAMPLING[@]}" --model "$OUT/fp/final" \
    --save-samples "$OUT/fp_samples.npz" --out "$OUT/metrics_fp.json"
"$PY" -m terdit.evaluate "${METRICS[@]}" --samples fashion-mnist:train \
    --out "$OUT/metrics_real_floor.json"
# the loss plot on one step axis: the branches continue the pre-training's 1500 steps
"$PY" - "$OUT" <<'PLOT'
import json, sys
out = sys.argv[1]
for run in ("ternary", "fp"):
    with open(f"{out}/{run}/log.jsonl") as src, open(f"{out}/{run}_log_offset.jsonl", "w") as dst:
        for line in src:
            row = json.loads(line)
            row["step"] = row.get("step", 0) + 1500
            dst.write(json.dumps(row) + "\n")
PLOT
"$PY" -m terdit.evaluate plot-losses --smooth 5 \
    --run "fp pre-training (steps 1-1500)=$OUT/fp_pre/log.jsonl" \
    --run "ternary QAT from fp step 1500=$OUT/ternary_log_offset.jsonl" \
    --run "fp twin from fp step 1500=$OUT/fp_log_offset.jsonl" --out "$OUT/loss.png"
echo "done: $OUT/metrics_*.json; copy $OUT/ternary/final/{config.json,model.safetensors} to terdit/demo"
