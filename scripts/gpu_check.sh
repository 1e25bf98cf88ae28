#!/usr/bin/env bash
# The GPU check, in one command, for a machine with an NVIDIA GPU (the lent H200).
#
#   here (no GPU):   scripts/gpu_check.sh --prepare
#       builds build/ with CUDA and gathers into .gpu-bundle/ the test and benchmark executables and the
#       CPU runtime libraries the GPU image lacks (OpenBLAS's OpenMP build and what it links): about
#       50 MB, under the device tool's 64 MiB. Then, through the device tool:
#   there:           bash scripts/gpu_check.sh            (carry: .gpu-bundle)
#       runs every test (the CUDA parity tests included, once more with MDFF_CUDA_SYNC=1), compute-sanitizer
#       memcheck and racecheck over the CUDA tests (GPU_SANITIZER_TIMEOUT seconds each, default 300; their
#       error summaries in the summary), and the benchmarks, writing logs and summary.txt under
#       $OUT (or gpu-check-out/ when OUT is unset). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
build=build
bundle=.gpu-bundle

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMDFF_CUDA=ON
  cmake --build "$build"
  rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/lib"
  cp "$build"/tests/test_* "$build"/bench/bench_* "$build"/apps/* "$bundle/bin/" 2>/dev/null || true
  find "$bundle/bin" -type f ! -perm -u+x -delete  # executables only
  blas=$(grep -E '^MDFF_OPENBLAS_LIBRARY:' "$build/CMakeCache.txt" | cut -d= -f2)
  cp -L "$blas" "$bundle/lib/libopenblas.so.0"
  for lib in $(ldd "$blas" | awk '/libgfortran|libquadmath|libgomp/ {print $3}'); do cp -L "$lib" "$bundle/lib/"; done
  grep -qx "/$bundle/" .git/info/exclude 2>/dev/null || echo "/$bundle/" >> .git/info/exclude
  du -sh "$bundle"
  echo "ready: run 'bash scripts/gpu_check.sh' on the GPU machine, carrying $bundle"
  exit 0
fi

out=${OUT:-gpu-check-out}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
status=0
step() {  # step NAME LOGFILE COMMAND...: runs, logs, records PASS/FAIL in the summary
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  "$@" > "$out/$log" 2>&1
  local rc=$?
  printf '%-34s %s (%ds, log %s)\n' "$name" "$([[ $rc == 0 ]] && echo PASS || echo "FAIL rc=$rc")" \
    $((SECONDS - start)) "$log" | tee -a "$summary"
  [[ $rc == 0 ]] || status=1
}

# CUDA and cuDNN libraries: the toolkit's, else those inside PyTorch's Python packages.
libdirs=$PWD/$bundle/lib
for name in libcudnn.so.9 libcublas.so.13 libcudart.so.13; do
  found=$(find /usr/local/cuda*/lib* /usr/lib/x86_64-linux-gnu "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)" \
          -name "$name" 2>/dev/null | head -n 1)
  [[ -n "$found" ]] && libdirs="$libdirs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; nvidia-smi; } > "$out/machine.txt" 2>&1

if [[ ! -x "$bundle/bin/test_cuda" ]]; then
  echo "no $bundle/bin/test_cuda: run 'scripts/gpu_check.sh --prepare' first and carry $bundle" | tee -a "$summary"
  exit 1
fi
# Each test executable directly (CTest's files hold this machine's absolute paths); 77 means skipped,
# which must not happen here: on a GPU machine the CUDA tests have to run.
for test in "$bundle"/bin/test_*; do
  [[ -x "$test" && -f "$test" ]] && step "$(basename "$test")" "$(basename "$test").log" "$test"
done
step "CUDA tests, MDFF_CUDA_SYNC=1" test_cuda_sync.log env MDFF_CUDA_SYNC=1 "$bundle/bin/test_cuda"
# compute-sanitizer over the CUDA tests (test_cuda is the only test executable that touches the GPU): memcheck
# (out-of-bounds and misaligned device accesses, leaks of device memory) and racecheck (shared-memory data
# races). Each has a time limit, so that a slow tool cannot use up the machine's lease; its "ERROR SUMMARY"
# line goes into the summary. A missing tool is a FAIL line, not a silent skip.
sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
                 /opt/nvidia/*/compute-sanitizer/compute-sanitizer \
                 "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)"/nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$candidate" ]] && sanitizer=$candidate
done
sanitizer_limit=${GPU_SANITIZER_TIMEOUT:-300}  # seconds per tool
if [[ -n "$sanitizer" ]]; then
  echo "compute-sanitizer: $sanitizer" >> "$out/machine.txt"
  step "compute-sanitizer memcheck" memcheck.log timeout "$sanitizer_limit" "$sanitizer" --tool memcheck \
    --leak-check full --error-exitcode 9 "$bundle/bin/test_cuda"
  step "compute-sanitizer racecheck" racecheck.log timeout "$sanitizer_limit" "$sanitizer" --tool racecheck \
    --error-exitcode 9 "$bundle/bin/test_cuda"
  for log in memcheck.log racecheck.log; do
    printf '  %-32s %s\n' "$log" "$(grep -m 1 'ERROR SUMMARY' "$out/$log" || echo 'no ERROR SUMMARY (timed out or did not start; see the log)')" \
      | tee -a "$summary"
  done
else
  echo "compute-sanitizer                  FAIL: not found (PATH, /usr/local/cuda*/bin, the nvidia pip packages)" \
    | tee -a "$summary"
  status=1
fi
step "CPU conv benchmark" bench_conv.log "$bundle/bin/bench_conv" --json "$out/bench_conv.json"
echo "overall: $([[ $status == 0 ]] && echo PASS || echo FAIL)" | tee -a "$summary"
exit $status
