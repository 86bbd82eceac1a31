#!/usr/bin/env bash
# The C ABI from C and C++, on the CPU backend: builds libunibuf_capi (cargo, honouring
# CARGO_TARGET_DIR), compiles tests/c/capi_test.c (C11), tests/cpp/wrapper_test.cpp and
# examples/triton_buffers.cpp (C++17) with every warning an error, links them against the shared
# library (rpath to the target directory), and runs them: normally, then under valgrind, where
# any invalid read or write, use of uninitialised memory or definite/indirect leak fails the run.
#
# These are also the commands to copy for building and linking your own program; see README.md.
#
# Valgrind reports "possibly lost" and "still reachable" blocks for the threads Rust's runtime
# keeps until exit (the rayon pool of the CPU backend's GEMM: its thread stacks and TLS, and
# thread-locals): those kinds are not errors here (--errors-for-leak-kinds=definite,indirect)
# and possibly-lost blocks are not listed (--show-possibly-lost=no); no suppression file is
# used, so every real error still fails. --track-origins=yes is left off (it makes the runs
# about 40 times slower); add it when tracking down an uninitialised read.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in
    /*) ;;
    *) target="$root/$target" ;;
esac
lib="$target/debug"
out="$target/capi-ci"
mkdir -p "$out"

valgrind=/usr/bin/valgrind
if [[ ! -x "$valgrind" ]]; then
    echo "error: valgrind is missing ($valgrind); install it (apt-get install valgrind)" >&2
    exit 1
fi

echo "-- cargo build -p unibuf-capi"
cargo build -p unibuf-capi

echo "-- cc -std=c11 tests/c/capi_test.c"
cc -std=c11 -Wall -Wextra -Werror -D_POSIX_C_SOURCE=200809L -g \
    -I "$here/include" "$here/tests/c/capi_test.c" \
    -L "$lib" -lunibuf_capi -Wl,-rpath,"$lib" -lm \
    -o "$out/capi_test"

echo "-- c++ -std=c++17 tests/cpp/wrapper_test.cpp"
c++ -std=c++17 -Wall -Wextra -Werror -g \
    -I "$here/include" "$here/tests/cpp/wrapper_test.cpp" \
    -L "$lib" -lunibuf_capi -Wl,-rpath,"$lib" \
    -o "$out/wrapper_test"

echo "-- c++ -std=c++17 examples/triton_buffers.cpp"
c++ -std=c++17 -Wall -Wextra -Werror -g \
    -I "$here/include" "$here/examples/triton_buffers.cpp" \
    -L "$lib" -lunibuf_capi -Wl,-rpath,"$lib" \
    -o "$out/triton_buffers"

export UNIBUF_BACKEND=cpu
# Fixes the random data of both runs of each program, so that a failure under valgrind can be
# replayed outside it (each program prints its seed).
export UNIBUF_TEST_SEED="${UNIBUF_TEST_SEED:-$(date +%s)}"

echo "-- run: capi_test"
"$out/capi_test"
echo "-- run: wrapper_test"
"$out/wrapper_test"
echo "-- run: triton_buffers"
"$out/triton_buffers"

vg=("$valgrind" --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-possibly-lost=no --quiet)
echo "-- valgrind: capi_test"
"${vg[@]}" "$out/capi_test"
echo "-- valgrind: wrapper_test"
"${vg[@]}" "$out/wrapper_test"
echo "-- valgrind: triton_buffers"
"${vg[@]}" "$out/triton_buffers"
echo "-- C ABI: the three programs passed, also under valgrind (no errors, no definite or indirect leaks)"
