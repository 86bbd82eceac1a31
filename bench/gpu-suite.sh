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
#   generate  SmolLM2-135M-Instruct (the GGUF file named by SMOLLM2_GGUF) on CUDA: the reference
#             check (tests/reference/, f16 and f32 KV caches), memcheck over a short run, decode
#             tokens/s over 256 tokens and prefill tokens/s of a 512-token prompt, then the PyTorch
#             peers in the same run (bench/peers/smollm2_torch_peers.py: transformers eager, a
#             hand-written CUDA-graph decoder, the memory-bound limit); `gguf` from
#             .gpu/python/deps where the machine lacks it
#   python    the Python package on CUDA: its wheel (.gpu/python/unibuf-*.whl, built here with
#             `maturin build --release -o ../../.gpu/python` in bindings/python) installed beside the
#             machine's PyTorch (PYTHONPATH); pytest with UNIBUF_BACKEND=cuda; the Hugging Face
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
    python3 -c "import gguf" 2>/dev/null ||
        python3 -m pip install --quiet --no-deps --no-index --target "$pylib" \
            --find-links .gpu/python/deps gguf || status=1
    PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}" python3 bench/peers/smollm2_torch_peers.py \
        --model "$model" --dtype bf16 --dtype f32 --json "$OUT/peers.json" || status=1
fi
if has python; then
    stage "python: the package on CUDA, the Llama client, op-call overhead"
    # Installed beside the machine's PyTorch (a virtual environment would not see it where
    # PyTorch lives in another interpreter's site-packages): into a folder on PYTHONPATH. No
    # network on the GPU machine: the wheel comes carried, with pure-Python wheels of what the
    # machine may lack (pytest; gguf and accelerate for GGUF weights) in .gpu/python/deps.
    pylib="$OUT/pylib"
    rm -rf "$pylib"
    python3 -m pip install --quiet --no-deps --no-index --target "$pylib" .gpu/python/unibuf-*.whl || status=1
    for dep in pytest accelerate gguf; do
        python3 -c "import $dep" 2>/dev/null ||
            python3 -m pip install --quiet --no-deps --no-index --target "$pylib" \
                --find-links .gpu/python/deps "$dep" || status=1
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
