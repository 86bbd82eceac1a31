#!/usr/bin/env bash
# Builds bench/peers/torch_alloc.cpp against the installed torch and runs it with the default
# allocator settings and with expandable segments. Usage: torch_alloc.sh [TRACE.csv or .csv.gz]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
bin=${TMPDIR:-/tmp}/torch_alloc
g++ -O2 -std=c++17 "$here/torch_alloc.cpp" -o "$bin" \
  -I"$torch/include" -I"$torch/include/torch/csrc/api/include" -I/usr/local/cuda/include \
  -L"$torch/lib" -lc10 -lc10_cuda -Wl,-rpath,"$torch/lib"
trace=""
if [ $# -gt 0 ]; then
  trace=${TMPDIR:-/tmp}/torch_alloc_trace.csv
  case "$1" in *.gz) zcat "$1" > "$trace" ;; *) cp "$1" "$trace" ;; esac
fi
"$bin" $trace
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$bin" $trace
