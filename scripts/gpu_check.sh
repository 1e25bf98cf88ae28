#!/usr/bin/env bash
# The GPU check, in one command, for a machine with an NVIDIA GPU (the lent H200).
#
#   here (no GPU):   scripts/gpu_check.sh --prepare
#       builds build/ with CUDA and packs into .gpu-bundle/bundle.tar.xz the test, benchmark and app
#       executables and the CPU runtime libraries the GPU image lacks (OpenBLAS's OpenMP build and what it
#       links), 17 MB, and the main job's dataset (Fashion-MNIST's gzip files from Debian's dataset-fashion-mnist,
#       31 MB): under the device tool's 64 MiB with the working tree. Then, through the device tool:
#   there:           bash scripts/gpu_check.sh            (carry: .gpu-bundle)
#       runs, most valuable first, within GPU_CHECK_BUDGET seconds (default 540: the device tool allows 600
#       a call; each step's time limit is cut to what is left, and a step with no time left is a FAIL line):
#       the CUDA parity tests, the GPU benchmark, the main job (train_mdff's defaults on the GPU), the GPU
#       convolution benchmark (cuDNN, and cuBLAS for the 1x1 ones), the GPU op benchmark (every op of a training
#       step against the roofline, and the fusions' savings), the CUDA tests again with MDFF_CUDA_SYNC=1,
#       compute-sanitizer memcheck and racecheck over them (error summaries in the summary), then the CPU test
#       executables, 8 at a time (CI runs those too), and the CPU conv benchmark. Writes summary.txt, the
#       benchmarks' JSON and logs.tar.gz (every log) under $OUT (or gpu-check-out/ when OUT is unset): few files,
#       as the device tool brings back at most 8. Exit status: 0 when every step passed.
#       GPU_CHECK_ONLY=REGEX runs only the steps whose names match (a rerun after a fix, e.g.
#       GPU_CHECK_ONLY='test_cuda|benchmark'), or hold it as written (a name copied from summary.txt,
#       brackets included); a filter that matches no step is a FAIL.
#       The device time of a session is 15 minutes, a machine's start included (a minute or more), and a
#       machine goes back 30 s after a call: to leave room for a rerun after a fix, run the first call with
#       GPU_CHECK_BUDGET=480 (estimated: test_cuda 30 s, the model benchmarks 220 s, the ranking 10 s, the main
#       job 60-120 s, the conv and op benchmarks ~60 s each; then the sync run and the sanitizers as time leaves),
#       give the machine back while reading, and rerun only what failed or did not run.
#       The GPU benchmark (bench_model --device cuda, next to PyTorch in the same run) times the training
#       step and encoding at batch 32 and 128, 224x224 and 32x32, in TF32 (bench_gpu.log/.json), then 224x224
#       batch 32 in FP32 (bench_gpu_fp32.log/.json), then the 224x224 rows again with every convolution on its
#       fastest algorithm (bench_gpu_fastest.log/.json); after the sanitizers, the engine's 224x224 rows with
#       the 1x1 convolutions on cuDNN only (bench_gpu_cudnn_1x1.log/.json, in logs.tar.gz).
#       Should the cuBLAS route of 1x1 convolutions fail (test_cuda's 1x1 cases), MDFF_CONV_1X1=cudnn before
#       the command keeps every step on cuDNN (cuda/conv.h). Its PyTorch is the first python3 (PATH's, then
#       /usr/bin/python3) that can import torch, started with the environment it had before this script
#       set LD_LIBRARY_PATH (so that it loads its own cuDNN and cuBLAS).
set -uo pipefail
self=$(readlink -f "$0")  # read again by --help, after the cd
cd "$(dirname "$0")/.."
build=build
bundle=.gpu-bundle

case "${1:-}" in
  "" | --prepare) ;;
  -h | --help) sed -n '2,/^set -uo/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1': give --prepare (here), nothing (on the GPU machine) or --help" >&2
     exit 2 ;;
esac
if [[ -n "${GPU_CHECK_ONLY:-}" ]]; then
  [[ "" =~ $GPU_CHECK_ONLY ]]
  if (( $? == 2 )); then
    echo "gpu_check.sh: GPU_CHECK_ONLY='$GPU_CHECK_ONLY' is not a valid regular expression (bash's =~)" >&2
    exit 2
  fi
fi

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
  # kept out of git (the device tool carries it as an ignored path); a copy without git has nothing to tell
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
  if [[ -n "$exclude" ]]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$bundle/" "$exclude" 2>/dev/null || echo "/$bundle/" >> "$exclude"
  fi
  # Compressed: the executables each link the whole engine (3-4 MB apiece, 130 MB with the libraries),
  # 14 MB as xz, under the device tool's 64 MiB for everything that travels.
  tar cf - -C "$bundle" bin lib | xz -T0 -6 > "$bundle.tar.xz"
  rm -rf "$bundle/bin" "$bundle/lib" && mv "$bundle.tar.xz" "$bundle/bundle.tar.xz"
  # The default job's dataset (Debian's dataset-fashion-mnist, 31 MB of gzip files, carried as they are), so
  # that the GPU machine, which has no such package, runs the main job end to end on the GPU.
  fashion=/usr/share/datasets/fashion-mnist
  if [[ -f "$fashion/train-images-idx3-ubyte.gz" ]]; then
    mkdir -p "$bundle/fashion-mnist" && cp "$fashion"/*-ubyte.gz "$bundle/fashion-mnist/"
  else
    echo "warning: no $fashion (apt-get install dataset-fashion-mnist): the GPU check will skip the main job"
  fi
  du -sh "$bundle"
  echo "ready: run 'bash scripts/gpu_check.sh' on the GPU machine, carrying $bundle"
  exit 0
fi

out=${OUT:-gpu-check-out}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
status=0
last_rc=0  # the exit status of the last step that ran
steps_run=0  # steps that GPU_CHECK_ONLY let through (0 at the end: the filter matched nothing, a FAIL)
filter_steps=1  # 0 while the steps run whatever GPU_CHECK_ONLY says (test_cuda's cases, when test_cuda ran)
logs="$out/logs"
mkdir -p "$logs"
budget=${GPU_CHECK_BUDGET:-540}
# Whether the step NAME runs (GPU_CHECK_ONLY, counted in steps_run), and within how many seconds: LIMIT, cut to
# the budget's time left (step_limit). A step with under 10 s left is a FAIL line, and does not run.
step_limit=0
step_wanted() {  # step_wanted NAME LIMIT
  local name=$1 limit=$2
  # not asked for: GPU_CHECK_ONLY is neither in the name as written (a name copied from summary.txt, brackets
  # and all) nor a regular expression that matches it
  (( filter_steps )) && [[ -n "${GPU_CHECK_ONLY:-}" && "$name" != *"$GPU_CHECK_ONLY"* && ! "$name" =~ $GPU_CHECK_ONLY ]] \
    && return 1
  steps_run=$((steps_run + 1))
  local left=$((budget - SECONDS))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    printf '%-34s FAIL: not run, the %ds budget is spent\n' "$name" "$budget" | tee -a "$summary"
    status=1
    return 1
  fi
  step_limit=$limit
}
# One step's line in the summary, from its exit status and seconds.
record_step() {  # record_step NAME LOGFILE RC SECONDS
  printf '%-34s %s (%ds, log %s)\n' "$1" "$([[ $3 == 0 ]] && echo PASS || echo "FAIL rc=$3")" "$4" "$2" \
    | tee -a "$summary"
  [[ $3 == 0 ]] || status=1
  last_rc=$3
}
step() {  # step NAME LOGFILE LIMIT COMMAND...: runs within min(LIMIT, time left), logs, records PASS/FAIL
  local name=$1 log=$2 limit=$3; shift 3
  step_wanted "$name" "$limit" || return 0
  local start=$SECONDS
  timeout "$step_limit" "$@" > "$logs/$log" 2>&1
  record_step "$name" "$log" $? $((SECONDS - start))
}
# Test executables side by side, each a step named after it with the time limit LIMIT: up to `parallel` at a
# time, each on `threads` OpenMP threads (one after another, the CPU tests took ~150 s of the H200's budget).
# A test's time limit is cut to the time left when a slot frees and it starts. The lines of those that ran
# follow in the order given, once all have ended (a "not run" line comes when its test's turn came).
parallel_test_steps() {  # parallel_test_steps LIMIT EXECUTABLE...
  local limit=$1; shift
  local parallel=8 threads=2 test name
  local -a started=()
  for test in "$@"; do
    name=$(basename "$test")
    while (( $(jobs -rp | wc -l) >= parallel )); do wait -n; done
    step_wanted "$name" "$limit" || continue
    rm -f "$logs/$name.status"  # one an earlier, interrupted check left (a reused gpu-check-out/)
    ( start=$SECONDS; OMP_NUM_THREADS=$threads timeout "$step_limit" "$test" > "$logs/$name.log" 2>&1
      echo "$? $((SECONDS - start))" > "$logs/$name.status" ) &
    started+=("$name")
  done
  wait
  for name in "${started[@]}"; do
    local rc=missing seconds=0  # no status file: the runner itself died
    [[ -f "$logs/$name.status" ]] && read -r rc seconds < "$logs/$name.status"
    rm -f "$logs/$name.status"
    record_step "$name" "$name.log" "$rc" "$seconds"
  done
}

# PyTorch for the GPU benchmark, found before LD_LIBRARY_PATH changes below: bench_model starts it through
# a wrapper (MDFF_TORCH_PYTHON) that gives it back the library path it had here.
torch_python=""
for candidate in python3 /usr/bin/python3; do
  if "$candidate" -c 'import torch' > /dev/null 2>&1; then torch_python=$(command -v "$candidate"); break; fi
done
if [[ -n "$torch_python" ]]; then
  export MDFF_TORCH_PYTHON
  MDFF_TORCH_PYTHON=$(mktemp /tmp/mdff_torch_python.XXXXXX)
  printf '#!/usr/bin/env bash\nexport LD_LIBRARY_PATH=%q\nexec %q "$@"\n' "${LD_LIBRARY_PATH:-}" "$torch_python" \
    > "$MDFF_TORCH_PYTHON"
  chmod +x "$MDFF_TORCH_PYTHON"
  trap 'rm -f "$MDFF_TORCH_PYTHON"' EXIT
fi

# The bundle unpacks outside the carried folder, which stays as it travelled.
if [[ ! -f "$bundle/bundle.tar.xz" ]]; then
  echo "no $bundle/bundle.tar.xz: run 'scripts/gpu_check.sh --prepare' first and carry $bundle" | tee -a "$summary"
  exit 1
fi
unpacked=$(mktemp -d /tmp/mdff-gpu-bundle.XXXXXX)
tar xJf "$bundle/bundle.tar.xz" -C "$unpacked" 2>/dev/null ||
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle/bundle.tar.xz" "$unpacked"
carried=$bundle
bundle=$unpacked
trap 'rm -rf "$unpacked" "${MDFF_TORCH_PYTHON:-}"' EXIT

# CUDA and cuDNN libraries: the toolkit's, else those inside PyTorch's Python packages.
libdirs=$bundle/lib
for name in libcudnn.so.9 libcublas.so.13 libcudart.so.13; do
  found=$(find /usr/local/cuda*/lib* /usr/lib/x86_64-linux-gnu "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)" \
          -name "$name" 2>/dev/null | head -n 1)
  [[ -n "$found" ]] && libdirs="$libdirs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "PyTorch for the GPU benchmark: ${torch_python:-none (no python3 can import torch)}"
  nvidia-smi; } > "$out/machine.txt" 2>&1

# The CUDA parity tests first: what only this machine can check. Each test executable runs directly
# (CTest's files hold the build machine's absolute paths); 77 means skipped, which must not happen here.
step test_cuda test_cuda.log 240 "$bundle/bin/test_cuda"
# doctest exits 1 when checks fail; anything else (a crash, a timeout) hides the cases after the one that
# stopped it, so then each case runs on its own process (commas in a name are escaped for -tc).
# 77: skipped (no usable GPU; the log says why); 126/127: it did not start (a library the loader did not find).
if [[ $last_rc == 77 || $last_rc == 126 || $last_rc == 127 ]]; then
  echo "  test_cuda did not run: $(head -c 300 "$logs/test_cuda.log" | head -n 2 | tr '\n' ' ')" | tee -a "$summary"
elif [[ $last_rc != 0 && $last_rc != 1 ]]; then
  echo "test_cuda stopped early (rc=$last_rc): every case on its own" | tee -a "$summary"
  case_number=0
  filter_steps=0  # the cases are test_cuda's: they run whenever it did, whatever their names
  while IFS= read -r name; do
    [[ -z "$name" || "$name" == "[doctest]"* || "$name" == "==="* ]] && continue
    case_number=$((case_number + 1))
    step "  ${name:0:60}" "test_cuda_case_$case_number.log" 60 "$bundle/bin/test_cuda" -tc="${name//,/\\,}"
  done < <("$bundle/bin/test_cuda" -ltc 2>&1)
  filter_steps=1
fi
# The GPU benchmark: the engine and PyTorch (same model, same precision) take turns on the training step and
# encoding, at batch 32 and 128, 224x224 and 32x32: img/s, ratio, each side's peak GPU memory (allocator level),
# and a per-layer profile wherever the engine is slower. Estimate on the H200, TF32 grid: PyTorch's start (import,
# CUDA, model) ~15 s; per configuration, each side 2 warm-up + 3 rounds x 2 timed steps (+ 1-2 profiled engine
# steps) of training, then of encoding; at 224x224 batch 128 a PyTorch step is ~0.2-0.35 s (both scales), its cuDNN
# autotune a few seconds per batch size; the 32x32 rows are launch-bound (~10-50 ms a step). About 1-1.5 min if
# the engine is within 2x of PyTorch, ~2.5 min at 10x: the timeouts stop a much slower engine (the JSON is
# written after each configuration, so what finished is kept). The FP32 run: ~30 s.
gpu_bench=("$bundle/bin/bench_model" --device cuda --warmup 2 --rounds 3 --iterations 2)
excerpt() {  # excerpt LOGFILE GREP_ARGUMENTS...: the log's lines that grep selects, indented, into the summary
  local log=$1; shift
  [[ -f "$logs/$log" ]] && grep "$@" "$logs/$log" | sed 's/^/  /' | tee -a "$summary"
  return 0
}
verdict() {  # verdict LOGFILE: the benchmark's verdict on the issue's targets, into the summary
  [[ -f "$logs/$1" ]] || return
  printf '  %-32s %s\n' "$1" "$(grep -m 1 -E "^(every row reaches|short of PyTorch)" "$logs/$1" ||
                                echo 'no verdict (not compared with PyTorch, or stopped early; see the log)')" \
    | tee -a "$summary"
}
step "GPU benchmark (TF32 grid)" bench_gpu.log 240 "${gpu_bench[@]}" --precision tf32 --grid \
  --json "$out/bench_gpu.json"
verdict bench_gpu.log
step "GPU benchmark (FP32, 224 b32)" bench_gpu_fp32.log 90 "${gpu_bench[@]}" --precision fp32 \
  --batch 32 --image-size 224 --json "$out/bench_gpu_fp32.json"
verdict bench_gpu_fp32.log
# The same 224x224 rows with every convolution on its fastest algorithm (MDFF_CONV_LEAN=0, cuda/conv.cpp): what
# running the lean algorithms at the memory peak costs in time and saves in peak memory. ~1 min.
step "GPU benchmark (TF32, 224, fastest algorithms only)" bench_gpu_fastest.log 120 env MDFF_CONV_LEAN=0 \
  "${gpu_bench[@]}" --precision tf32 --batch 32,128 --image-size 224 --json "$out/bench_gpu_fastest.json"
verdict bench_gpu_fastest.log
# The Hamming ranking on the GPU against the CPU's (and NumPy's, where the python3 has it): 1M 64-bit codes,
# 100 queries (NumPy takes ~60 ms a query).
step "GPU ranking benchmark" bench_ranking.log 60 "$bundle/bin/mdff_search" bench --queries 100 --device cuda \
  --python "${MDFF_TORCH_PYTHON:-python3}" --json "$out/bench_ranking.json"
# The main job end to end on the GPU: train_mdff with its defaults (ResNet50-MDFF-SH, 48 bits, 16 epochs over
# 5,000 Fashion-MNIST images at 32x32, the learning curve, the 69,000-image database encoded), from the carried
# dataset; 10 min 5 s on the 2-core CPU, 1-2 min expected here. The run folder (checkpoints: 0.3 GB) stays on the
# machine; its metrics.json comes back in logs.tar.gz, the results table in the summary.
if [[ -f "$carried/fashion-mnist/train-images-idx3-ubyte.gz" ]]; then
  gpu_run=$(mktemp -d /tmp/mdff-gpu-run.XXXXXX)
  # every line into the log as it is printed, also when the time limit cuts the run short (unquoted below)
  line_buffered=$(command -v stdbuf > /dev/null && echo "stdbuf -oL")
  step "main job on the GPU (train_mdff)" train_mdff.log 200 $line_buffered "$bundle/bin/train_mdff" --device cuda \
    --data-dir "$carried/fashion-mnist" --out "$gpu_run/run"
  cp "$gpu_run/run/metrics.json" "$logs/train_mdff_metrics.json" 2>/dev/null
  excerpt train_mdff.log -A 1 -E '^bits +mAP'
  rm -rf "$gpu_run"
elif [[ -z "${GPU_CHECK_ONLY:-}" || "main job on the GPU (train_mdff)" =~ $GPU_CHECK_ONLY ]]; then
  echo "main job on the GPU (train_mdff)   FAIL: no $carried/fashion-mnist (gpu_check.sh --prepare carries it)" \
    | tee -a "$summary"
  status=1
fi
# Every distinct convolution of ResNet50 at 224x224, batch 32 and 128, through cuDNN (forward, backward-data,
# backward-filter), and the 1x1 ones of stride 1 through cuBLAS too: whether routing those to cuBLAS would be
# faster (the issue asks for cuBLAS "where that is faster"). ~30 s each (operands copied from a random pool on the
# GPU: drawn on the host, batch 128's would take a minute).
step "GPU conv benchmark (cuDNN, cuBLAS 1x1)" bench_conv_gpu.log 150 bash -c \
  'for b in 32 128; do "$0" --device cuda --input 224 --batch $b --json "$1/bench_conv_gpu_b$b.json" || exit; done' \
  "$bundle/bin/bench_conv" "$logs"
excerpt bench_conv_gpu.log -E '^(cuBLAS was faster|One pass)'
# Every op of a training step at 224x224 batch 32 on the GPU against its roofline (the GEMM peak and the memory
# bandwidth measured in the same run), and what each fusion (batch norm + ReLU, add + ReLU) saves. ~1 min.
step "GPU op benchmark (roofline, fusions)" bench_ops_gpu.log 120 "$bundle/bin/bench_ops" --device cuda --input 224 \
  --batch 32 --json "$logs/bench_ops_gpu.json"
excerpt bench_ops_gpu.log -E '^(roofline|sum of n|bn\+relu fwd train:|add\+relu fwd:)'
step "CUDA tests, MDFF_CUDA_SYNC=1" test_cuda_sync.log 120 env MDFF_CUDA_SYNC=1 "$bundle/bin/test_cuda"
# compute-sanitizer over the CUDA tests (test_cuda is the only test executable that touches the GPU): memcheck
# (out-of-bounds and misaligned device accesses) and racecheck (shared-memory data races). memcheck runs with
# the allocator's cache off (MDFF_CUDA_NO_CACHING=1: each tensor a cudaMalloc of exactly its size), so that an
# access past a tensor's end is outside any allocation, not in a neighbour's block of a shared segment; the
# tests of the cache itself say they are not checked then. Not reported: the API errors the tests provoke on
# purpose (an invalid device, out of memory) and "leaks" (tensors held in static objects for the process's
# life; the first GPU run counted 791 such reports and no bad access). Each has a time limit, so that a slow tool cannot use up the machine's lease; its "ERROR
# SUMMARY" line goes into the summary. A missing tool is a FAIL line, not a silent skip. The whole-model cases
# (ResNet50, the trainer) are left out there (-tce): under the tools' instrumentation they take the whole time
# limit; every kernel they use has its own, smaller case. MDFF_UNDER_SANITIZER=1 tells test_cuda to run its
# slowest case, the optimizers' two-launch variants, with few parameters (racecheck stopped there after 150 s).
sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
                 /opt/nvidia/*/compute-sanitizer/compute-sanitizer \
                 "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)"/nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$candidate" ]] && sanitizer=$candidate
done
sanitizer_limit=${GPU_SANITIZER_TIMEOUT:-150}  # seconds per tool
if [[ -n "$sanitizer" ]]; then
  echo "compute-sanitizer: $sanitizer" >> "$out/machine.txt"
  step "compute-sanitizer memcheck" memcheck.log "$sanitizer_limit" env MDFF_CUDA_NO_CACHING=1 MDFF_UNDER_SANITIZER=1 \
    "$sanitizer" --tool memcheck --report-api-errors no --error-exitcode 9 "$bundle/bin/test_cuda" \
    -tce='*ResNet50*,*trainer*'
  step "compute-sanitizer racecheck" racecheck.log "$sanitizer_limit" env MDFF_UNDER_SANITIZER=1 "$sanitizer" \
    --tool racecheck --error-exitcode 9 "$bundle/bin/test_cuda" -tce='*ResNet50*,*trainer*'
  for log in memcheck.log racecheck.log; do
    [[ -f "$logs/$log" ]] || continue
    printf '  %-32s %s\n' "$log" "$(grep -m 1 'ERROR SUMMARY' "$logs/$log" || echo 'no ERROR SUMMARY (timed out or did not start; see the log)')" \
      | tee -a "$summary"
  done
elif [[ -z "${GPU_CHECK_ONLY:-}" || "compute-sanitizer" =~ $GPU_CHECK_ONLY ]]; then
  echo "compute-sanitizer                  FAIL: not found (PATH, /usr/local/cuda*/bin, the nvidia pip packages)" \
    | tee -a "$summary"
  status=1
fi
# The engine alone at 224x224, batch 32 and 128, with the 1x1 convolutions of stride 1 on cuDNN only
# (MDFF_CONV_1X1=cudnn; cuda/conv.h): against the first benchmark's engine rows, what the measured route
# (cuBLAS where a plan timed it faster) gains or loses on a whole step. ~40 s; after the
# correctness checks, which come first when time is short.
step "GPU benchmark (TF32, 224, 1x1 convolutions on cuDNN only)" bench_gpu_cudnn_1x1.log 90 env MDFF_CONV_1X1=cudnn \
  "${gpu_bench[@]}" --no-torch --precision tf32 --batch 32,128 --image-size 224 --json "$logs/bench_gpu_cudnn_1x1.json"
# The CPU tests (CI runs them on every change; here they show that the GPU machine's build works whole, and
# what differs where --device auto finds a GPU: they found --resume moving a CPU run onto it).
cpu_tests=()
for test in "$bundle"/bin/test_*; do
  [[ -x "$test" && -f "$test" && "$(basename "$test")" != test_cuda ]] && cpu_tests+=("$test")
done
parallel_test_steps 120 "${cpu_tests[@]}"
step "CPU conv benchmark" bench_conv.log 60 "$bundle/bin/bench_conv" --json "$out/bench_conv.json"
if (( steps_run == 0 )); then
  echo "no step ran: GPU_CHECK_ONLY='${GPU_CHECK_ONLY:-}' matches none of the step names of summary.txt" | tee -a "$summary"
  status=1
fi
echo "overall: $([[ $status == 0 ]] && echo PASS || echo FAIL) ($SECONDS s)" | tee -a "$summary"
tar czf "$out/logs.tar.gz" -C "$out" logs machine.txt && rm -rf "$logs" "$out/machine.txt"
exit $status
