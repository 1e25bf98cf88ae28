#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer: builds build-asan/ (MDFF_SANITIZE=ON,
# CUDA off, the default compiler) and runs every CTest test there. A memory error, a leak or any undefined
# behaviour ends the test that hit it with a report, so the suite fails. The Python (PyTorch) reference
# scripts that some tests run are not instrumented; OpenBLAS, loaded at run time, is not either.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-asan
# Release (-O3), as scripts/build.sh builds: the tests that follow PyTorch's training trajectory for a few steps
# have bounds made for that build's floating-point evaluation order. -g for the reports' line numbers.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-g -DMDFF_CUDA=OFF -DMDFF_SANITIZE=ON
cmake --build "$build" --parallel "$(nproc)"

export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:strict_string_checks=1:check_initialization_order=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
start=$SECONDS
status=0
ctest --test-dir "$build" --output-on-failure --no-tests=error || status=$?
echo "sanitizers: the test suite under AddressSanitizer + UndefinedBehaviorSanitizer $([[ $status == 0 ]] && echo passed \
|| echo FAILED) in $((SECONDS - start)) s"
exit $status
