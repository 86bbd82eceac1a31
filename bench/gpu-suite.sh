#!/usr/bin/env bash
# The GPU suite and the benchmarks of docs/BENCHMARKS.md in one run on a CUDA machine.
#
# Run from the repository root on the GPU machine, with the binaries bundled by
# ../shared/devkit/gpu-bundle into .gpu/ (and, for the allocator replay, the shared trace copied
# to .gpu/traces/). Parts run in order; PARTS picks some, e.g. `PARTS="tests kernels"`:
#
#   tests     every test binary with UNIBUF_BACKEND=cuda (.gpu/run.sh)
#   memcheck  the conformance suite under compute-sanitizer memcheck (faults skipped: they fault
#             the GPU on purpose; MEMCHECK_FILTERS narrows it, e.g. "ops_ kernels::")
#   kernels   unibuf bench kernels, then bench/peers/torch_kernels.py
#   launch    unibuf bench launch, then bench/peers/torch_launch.py
#   transfers unibuf bench transfers at 16 MiB, 256 MiB and 1 GiB, then bench/peers/torch_transfers.py
#   alloc     unibuf replay of the trace (virtual memory, simulated), unibuf bench alloc
#   matmul    unibuf bench matmul (cuBLAS through Queue::external), then bench/peers/matmul_torch.py
#   load      a 6 GB safetensors file: unibuf bench load, then bench/peers/torch_safetensors.py
#
# Logs and JSON go to $OUT (default /tmp/unibuf-gpu); the tables are printed as they come.
set -uo pipefail
OUT=${OUT:-/tmp/unibuf-gpu}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
export UNIBUF_BACKEND=cuda
export UNIBUF_CACHE_DIR=${UNIBUF_CACHE_DIR:-/tmp/unibuf-kernel-cache}
parts=${PARTS:-"tests memcheck kernels launch transfers alloc matmul load"}
unibuf=.gpu/bin/unibuf
status=0
has() { [[ " $parts " == *" $1 "* ]]; }
stage() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if has tests; then
    stage "tests: every binary with UNIBUF_BACKEND=cuda"
    OUT="$OUT" bash .gpu/run.sh || status=1
fi
if has memcheck; then
    stage "memcheck: the conformance suite, faults skipped"
    conformance=$(ls .gpu/tests/conformance-* | head -1)
    # MEMCHECK_FILTERS: test name filters (default: the whole suite).
    # shellcheck disable=SC2086
    compute-sanitizer --tool memcheck --print-limit 20 "$conformance" ${MEMCHECK_FILTERS:-} --skip faults \
        >"$OUT/memcheck.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|test result" "$OUT/memcheck.log"
fi
if has kernels; then
    stage "kernels"
    $unibuf bench kernels --json "$OUT/kernels.json" || status=1
    python3 bench/peers/torch_kernels.py || status=1
fi
if has launch; then
    stage "launch"
    $unibuf bench launch || status=1
    python3 bench/peers/torch_launch.py || status=1
fi
if has transfers; then
    stage "transfers"
    $unibuf bench transfers --sizes 16M,256M,1G --samples 5 --json "$OUT/transfers.json" || status=1
    python3 bench/peers/torch_transfers.py || status=1
fi
if has alloc; then
    stage "allocator"
    for t in .gpu/traces/*; do
        [ -e "$t" ] || continue
        $unibuf replay "$t" || status=1
        $unibuf replay --simulate "$t" || status=1
    done
    $unibuf bench alloc || status=1
fi
if has matmul; then
    stage "matmul"
    $unibuf bench matmul --json "$OUT/matmul.json" || status=1
    python3 bench/peers/matmul_torch.py || status=1
fi
if has load; then
    stage "weights load"
    file=${WEIGHTS_FILE:-/tmp/unibuf-w6.safetensors}
    python3 bench/peers/torch_safetensors.py "$file" --make 6G --iters 3 --json "$OUT/torch_load.json" \
        || status=1
    $unibuf bench load "$file" --samples 3 --json "$OUT/load.json" || status=1
    $unibuf bench load "$file" --samples 3 --staging 4M,64 || status=1
fi
exit $status
