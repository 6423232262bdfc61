#!/usr/bin/env bash
# The GPU checks of issue 8 in one command, for a session that is lent a GPU (the device tool):
#
#   run(command="bash bench/gpu_checks.sh", timeout_s=600)
#
# Every step writes into $OUT (the folder the device tool brings back; ./gpu-out elsewhere), and a
# failing step does not stop the later ones: the summary at the end says which failed. Commit
# what comes back under bench/results/kernels/. Uses only what the device image holds (python3
# with torch, triton, transformers, pytest): pd_serve is put on PYTHONPATH, not installed.
#
# 1. env.txt: GPU, driver, torch and triton versions.
# 2. kernel-tests.txt: the Triton kernel tests, compiled for the GPU (PD_SERVE_TEST_DEVICE=cuda).
# 3. engine-parity.txt: the engine on CUDA (float32, Triton kernels) against transformers on CPU.
# 4. bench_kernels.json: decode attention and gather/scatter bandwidth against a device copy,
#    extend attention TFLOP/s (issue 8's targets: decode >= 70% of copy, gather/scatter >= 80%).
# 5. compile-device.md: bench/kernel_compile.py with the device's own Triton, to set beside the
#    cubin reading taken without a GPU (bench/results/kernels/compile-sm90.md).
# Not covered: UCX between GPU buffers (ucxx is not in the device image; carry its wheels).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PD_SERVE_CACHE="${TMPDIR:-/tmp}/pd-serve-cache"
unset TRITON_INTERPRET
failed=()

step() {  # step NAME LOGFILE COMMAND...
    local name=$1 log=$2
    shift 2
    local start=$SECONDS
    echo "== $name"
    if "$@" >"$OUT/$log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s) -> $log"
    else
        echo "   FAILED ($((SECONDS - start)) s) -> $log"
        tail -n 20 "$OUT/$log"
        failed+=("$name")
    fi
}

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
}

step "environment" env.txt env_info
step "kernel tests on CUDA" kernel-tests.txt env PD_SERVE_TEST_DEVICE=cuda \
    python3 -m pytest -q -p no:cacheprovider tests/unit/test_kernels_attention.py tests/unit/test_kernels_elementwise.py
step "engine parity on CUDA" engine-parity.txt env PD_SERVE_TEST_DEVICE=cuda \
    python3 -m pytest -q -p no:cacheprovider tests/unit/test_engine_parity.py -k "not interpreter and not without_the_interpreter"
step "bench_kernels" bench_kernels.txt python3 bench/bench_kernels.py --out "$OUT/bench_kernels.json"
step "kernel_compile with the device's triton" compile-device.txt \
    python3 bench/kernel_compile.py --arch 90 --quick --md "$OUT/compile-device.md"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
