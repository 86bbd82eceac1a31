#!/usr/bin/env bash
# The GPU suite and the benchmarks of docs/BENCHMARKS.md in one run on a CUDA machine.
#
# Run from the repository root on a machine with an NVIDIA GPU, its driver and CUDA's libnvrtc
# (for the PyTorch peers, Python 3 with PyTorch). The binaries come from one of:
#
# - cargo (the default): `cargo build --release -p unibuf-cli --features cuda` first, then
#   target/release/unibuf (under CARGO_TARGET_DIR when set); the tests through `cargo test`;
# - a bundle in .gpu/, when .gpu/run.sh exists (binaries built on another machine and copied
#   here, for a GPU machine without Rust): .gpu/bin/unibuf, the test executables in
#   .gpu/tests/, .gpu/run.sh running them all, the Python wheel and its dependencies' wheels in
#   .gpu/python/ and .gpu/python/deps/. GPU_BUNDLE=0 or 1 overrides the choice.
#
# UNIBUF_BIN names another unibuf binary (then nothing is built). Parts run in order; PARTS picks
# some, e.g. `PARTS="tests kernels"`:
#
#   tests     every test with UNIBUF_BACKEND=cuda: `cargo test --workspace --release --features
#             cuda`, or every bundled test binary (.gpu/run.sh)
#   memcheck  the conformance suite under compute-sanitizer memcheck (faults skipped: they fault
#             the GPU on purpose; MEMCHECK_FILTERS narrows it, e.g. "ops_ kernels::")
#   kernels   unibuf bench kernels, then bench/peers/torch_kernels.py
#   launch    unibuf bench launch, then bench/peers/torch_launch.py
#   transfers unibuf bench transfers at 16 MiB, 256 MiB and 1 GiB, then bench/peers/torch_transfers.py
#   alloc     unibuf replay of the traces in data/alloc-traces/ (virtual memory, simulated),
#             unibuf bench alloc
#   matmul    unibuf bench matmul (cuBLAS through Queue::external), then bench/peers/matmul_torch.py
#   load      a 6 GB safetensors file: unibuf bench load, then bench/peers/torch_safetensors.py
#   generate  SmolLM2-135M-Instruct (the GGUF file named by SMOLLM2_GGUF) on CUDA: the reference
#             check (tests/reference/, f16 and f32 KV caches), memcheck over a short run, decode
#             tokens/s over 256 tokens and prefill tokens/s of a 512-token prompt, then the PyTorch
#             peers in the same run (bench/peers/smollm2_torch_peers.py: transformers eager, a
#             hand-written CUDA-graph decoder, the memory-bound limit); the `gguf` package
#             installed where the machine lacks it
#   python    the Python package on CUDA, installed beside the machine's PyTorch (PYTHONPATH): built
#             from bindings/python by pip (maturin), or the bundle's wheel
#             (.gpu/python/unibuf-*.whl, from
#             `maturin build --release -m bindings/python/Cargo.toml -o .gpu/python`); pytest
#             with UNIBUF_BACKEND=cuda; the Hugging Face
#             Llama client (bench/peers/hf_llama_unibuf.py: real SmolLM2 weights where
#             SMOLLM2_GGUF names the file, and the same shape from its config); op-call overhead
#             beside PyTorch eager (bench/peers/python_op_overhead.py)
#
# Logs and JSON go to $OUT (default /tmp/unibuf-gpu); the tables are printed as they come.
set -uo pipefail
OUT=${OUT:-/tmp/unibuf-gpu}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
export UNIBUF_BACKEND=cuda
export UNIBUF_CACHE_DIR=${UNIBUF_CACHE_DIR:-/tmp/unibuf-kernel-cache}
parts=${PARTS:-"tests memcheck kernels launch transfers alloc matmul load generate python"}
status=0
has() { [[ " $parts " == *" $1 "* ]]; }
stage() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

# Python packages into a folder on PYTHONPATH: from the bundle's wheels where they were carried
# (a GPU machine without network), else from the package index.
pip_into() {
    local dir=$1
    shift
    if [ -d .gpu/python/deps ]; then
        python3 -m pip install --quiet --no-deps --no-index --target "$dir" \
            --find-links .gpu/python/deps "$@"
    else
        python3 -m pip install --quiet --no-deps --target "$dir" "$@"
    fi
}

if [ -z "${GPU_BUNDLE:-}" ]; then
    if [ -x .gpu/run.sh ]; then GPU_BUNDLE=1; else GPU_BUNDLE=0; fi
fi
if [ "$GPU_BUNDLE" = 1 ]; then
    unibuf=${UNIBUF_BIN:-.gpu/bin/unibuf}
else
    unibuf=${UNIBUF_BIN:-${CARGO_TARGET_DIR:-target}/release/unibuf}
    if [ -z "${UNIBUF_BIN:-}" ]; then
        stage "build: cargo build --release -p unibuf-cli --features cuda"
        cargo build --release -p unibuf-cli --features cuda || exit 1
    fi
fi
echo "unibuf: $unibuf"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if has tests; then
    stage "tests: every test with UNIBUF_BACKEND=cuda"
    if [ "$GPU_BUNDLE" = 1 ]; then
        OUT="$OUT" bash .gpu/run.sh || status=1
    else
        cargo test --workspace --release --features cuda >"$OUT/tests.log" 2>&1 || status=1
        grep -E "^test result|FAILED|panicked" "$OUT/tests.log"
    fi
fi
if has memcheck; then
    stage "memcheck: the conformance suite, faults skipped"
    if [ "$GPU_BUNDLE" = 1 ]; then
        conformance=$(ls .gpu/tests/conformance-* | head -1)
    else
        # The test executable cargo builds (its path from cargo's JSON messages).
        conformance=$(cargo test --release -p unibuf-conformance --features cuda --test conformance \
            --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1)
    fi
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
    for t in ${ALLOC_TRACES:-data/alloc-traces/*.csv.gz}; do
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
if has generate; then
    stage "generate: SmolLM2 on CUDA"
    model=${SMOLLM2_GGUF:-/tmp/smollm2.gguf}
    ref=tests/reference/smollm2-135m-instruct-q4_1.json
    for kv in f16 f32; do
        $unibuf generate "$model" --reference "$ref" --kv-dtype "$kv" || status=1
    done
    compute-sanitizer --tool memcheck --print-limit 20 $unibuf generate "$model" \
        --prompt "The capital of France is" --max-tokens 8 --json >"$OUT/generate-memcheck.log" 2>&1 \
        || status=1
    grep -E "ERROR SUMMARY" "$OUT/generate-memcheck.log"
    $unibuf generate "$model" --prompt "Write a story about a lighthouse keeper." --chat \
        --max-tokens 256 --ignore-eos --json >"$OUT/generate-decode.json" || status=1
    # 512 prompt tokens: the ids of a repeated text (any ids in the vocabulary do).
    ids=$(python3 -c "print(','.join(str(198 + (i * 7919) % 40000) for i in range(512)))")
    $unibuf generate "$model" --prompt-tokens "$ids" --max-tokens 2 --json \
        >"$OUT/generate-prefill.json" || status=1
    python3 - "$OUT/generate-decode.json" "$OUT/generate-prefill.json" <<'PY'
import json, sys
d, p = (json.load(open(f)) for f in sys.argv[1:3])
print(f"unibuf generate: decode {d['decode_tokens_per_s']:.0f} tokens/s over {len(d['generated_ids'])} tokens "
      f"(first step {d['first_step_ms']:.1f} ms); prefill of 512 tokens {p['prefill_tokens_per_s']:.0f} tokens/s "
      f"({p['prefill_ms']:.1f} ms)")
PY
    pylib="$OUT/pylib-generate"
    python3 -c "import gguf" 2>/dev/null || pip_into "$pylib" gguf || status=1
    PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}" python3 bench/peers/smollm2_torch_peers.py \
        --model "$model" --dtype bf16 --dtype f32 --json "$OUT/peers.json" || status=1
fi
if has python; then
    stage "python: the package on CUDA, the Llama client, op-call overhead"
    # Installed beside the machine's PyTorch (a virtual environment would not see it where
    # PyTorch lives in another interpreter's site-packages): into a folder on PYTHONPATH, with
    # what the machine may lack (pytest; gguf and accelerate for GGUF weights). A bundle
    # carries the wheel and those dependencies' wheels, for a machine without network.
    pylib="$OUT/pylib"
    rm -rf "$pylib"
    if [ "$GPU_BUNDLE" = 1 ]; then
        python3 -m pip install --quiet --no-deps --no-index --target "$pylib" .gpu/python/unibuf-*.whl || status=1
    else
        python3 -m pip install --quiet --no-deps --target "$pylib" ./bindings/python || status=1
    fi
    for dep in pytest accelerate gguf; do
        python3 -c "import $dep" 2>/dev/null && continue
        # From the index, pytest's own pure-Python dependencies come with it.
        [ "$dep" = pytest ] && [ ! -d .gpu/python/deps ] && dep="pytest pluggy iniconfig packaging"
        # shellcheck disable=SC2086
        pip_into "$pylib" $dep || status=1
    done
    export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
    python3 -m pytest bindings/python/tests -q -p no:cacheprovider >"$OUT/pytest.log" 2>&1 \
        || status=1
    tail -15 "$OUT/pytest.log"
    if [ -n "${SMOLLM2_GGUF:-}" ]; then
        python3 bench/peers/hf_llama_unibuf.py --gguf "$SMOLLM2_GGUF" --device cuda \
            --dtype float32 --json "$OUT/hf_llama_gguf_float32.json" >"$OUT/hf_llama_gguf_float32.log" 2>&1 \
            || status=1
        tail -25 "$OUT/hf_llama_gguf_float32.log"
        python3 bench/peers/hf_llama_unibuf.py --gguf "$SMOLLM2_GGUF" --device cuda \
            --dtype bfloat16 --f32-reference --json "$OUT/hf_llama_gguf_bfloat16.json" \
            >"$OUT/hf_llama_gguf_bfloat16.log" 2>&1 || status=1
        tail -25 "$OUT/hf_llama_gguf_bfloat16.log"
    fi
    python3 bench/peers/python_op_overhead.py --device cuda \
        --json "$OUT/python_overhead.json" >"$OUT/python_overhead.log" 2>&1 || status=1
    tail -30 "$OUT/python_overhead.log"
fi
exit $status
