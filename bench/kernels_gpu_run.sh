#!/usr/bin/env bash
# One device run for the TernaryMatMul kernels: check that the library built here loads (rebuild
# it there if it does not), run the GPU tests, then the benchmark. Logs, JSON and markdown go to
# $OUT (the device tool's output folder) or bench/results.
#   carry: build/kernels      command: bash bench/kernels_gpu_run.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
lib=${TERDIT_KERNELS_LIB:-build/kernels/libterdit_kernels.so}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
if ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib"; then
    echo "the carried $lib does not load here: building it"
    cmake -S plugins/kernels -B /tmp/terdit_kernels >/dev/null \
        && cmake --build /tmp/terdit_kernels -j16 >/dev/null || exit 1
    lib=/tmp/terdit_kernels/libterdit_kernels.so
fi
export TERDIT_KERNELS_LIB=$(realpath "$lib")
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")
timeout 420 python3 -m pytest -q -rs -p no:cacheprovider $per_test tests/test_kernels_gpu.py 2>&1 \
    | tee "$out/kernels_gpu_tests.log" | tail -60
timeout 300 python3 bench/kernels.py --out-dir "$out" 2>&1 | tee "$out/kernels_bench.log" | tail -90
