#!/usr/bin/env bash
# README command 1: set up .venv, then run the main job on the embedded demo model:
# export terdit/demo (a ternary DiT trained on Fashion-MNIST by terdit.train) to ONNX with
# terdit::TernaryMatMul nodes in the int8 activation mode (W1.58A8, the CPU kernels' fast mode),
# and sample a labelled grid with the ONNX Runtime backend (which builds and registers the terdit
# CPU kernels on first use; without a C++ compiler it says so and runs the portable function).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/demo}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"

.venv/bin/python -m exporter terdit/demo -o "$OUT/onnx" --act-quant int8 --overwrite
.venv/bin/python -m runtime sample --model "$OUT/onnx" --classes 0 1 2 3 4 5 6 7 8 9 --num 40 \
    --sampler ddim --steps 50 --cfg-scale 3.0 --seed 0 --batch-size 40 --out "$OUT/samples" --overwrite
echo "main job done: labelled grid at $OUT/samples/grid.png, images in $OUT/samples/images/"
