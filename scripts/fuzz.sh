#!/usr/bin/env bash
# Fuzzing: builds the libFuzzer targets of tests/fuzz in build-fuzz/ (clang; AddressSanitizer and
# UndefinedBehaviorSanitizer on, CUDA off) and runs each one for SECONDS from its seed corpus.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 seconds, every target (fuzz_idx, fuzz_npy, ...)
# FUZZ_JOBS targets run at once (default 2). Under build-fuzz/fuzz-out/: each target's log, the inputs it
# found (corpus/TARGET, kept between runs) and anything that failed (crashes/TARGET/crash-*, leak-*,
# timeout-*, oom-*; rerun one with build-fuzz/tests/fuzz/TARGET FILE). One summary line per target; the
# exit status is 1 when any target crashed, leaked, hung (-timeout) or used too much memory.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: scripts/fuzz.sh [SECONDS] [TARGET...]
Builds the libFuzzer targets of tests/fuzz in build-fuzz/ (clang, ASan + UBSan) and runs each for SECONDS
(default 60) from its seed corpus; TARGETs default to every tests/fuzz/fuzz_*.cpp.
FUZZ_JOBS (default 2): how many targets run at once. SECONDS and FUZZ_JOBS: whole numbers, 1 to 999999999.
Logs, new inputs and failing inputs go to build-fuzz/fuzz-out/; exit status 1 when any target failed.
EOF
}
usage_error() { echo "fuzz: $*" >&2; usage >&2; exit 2; }

# A whole number from 1 to 999999999, leading zeros allowed and dropped (bash would read 010 as octal 8);
# nine digits at most, so that it fits libFuzzer's int and bash's arithmetic cannot wrap it to 0 or below.
positive() { [[ "$1" =~ ^0*([1-9][0-9]{0,8})$ ]] && echo "${BASH_REMATCH[1]}"; }

# Everything is checked before the build: FUZZ_JOBS=0 made the launch loop below wait forever for a free slot.
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
seconds=$(positive "${1-60}") || usage_error "SECONDS must be a whole number from 1 to 999999999, got '$1'"
shift $(($# > 0 ? 1 : 0))
jobs=$(positive "${FUZZ_JOBS:-2}") || usage_error "FUZZ_JOBS must be a whole number from 1 to 999999999, got '${FUZZ_JOBS:-}'"
build="build-fuzz"
out=$build/fuzz-out

all_targets=()
for source in tests/fuzz/fuzz_*.cpp; do all_targets+=("$(basename "$source" .cpp)"); done
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")
# A TARGET is the name of a tests/fuzz/fuzz_*.cpp without .cpp: anything else reached cmake --target (an
# option there, or a missing target found only after the configure step) and the paths of the run.
for target in "${targets[@]}"; do
  [[ "$target" =~ ^fuzz_[A-Za-z0-9_]+$ && -f "tests/fuzz/$target.cpp" ]] ||
    usage_error "no fuzz target '$target' (the targets: ${all_targets[*]})"
done

command -v clang++ > /dev/null || { echo "fuzz: clang++ not found; run scripts/setup.sh --test" >&2; exit 1; }
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMDFF_CUDA=OFF -DMDFF_FUZZ=ON -DBUILD_TESTING=OFF \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ > "$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
cmake --build "$build" --target "${targets[@]}" --parallel 2

# One target: runs it, then writes its summary line to $out/TARGET.summary and its status to TARGET.status.
fuzz_one() {
  local target=$1 log=$out/$1.log
  mkdir -p "$out/corpus/$target" "$out/crashes/$target"
  local rc=0
  # -timeout: one input may take at most 10 s; -rss_limit_mb / -malloc_limit_mb: a parser must refuse an
  # absurd size from a header before allocating it. The seeds are read from tests/fuzz/corpus and new
  # inputs written to $out/corpus only.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 OMP_NUM_THREADS=1 \
    "$build/tests/fuzz/$target" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$out/crashes/$target/" "$out/corpus/$target" "tests/fuzz/corpus/$target" \
    > "$log" 2>&1 || rc=$?
  local done_line runs rate new rss artifact
  done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  new=$(grep -o 'stat::new_units_added: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | cut -d' ' -f5 || true)
  if [[ $rc == 0 && -n "$done_line" ]]; then
    echo PASS > "$out/$target.status"
    printf '%-18s PASS  %s (%s exec/s, %s new inputs, peak RSS %s MB)\n' "$target" "$done_line" "${rate:-?}" \
      "${new:-?}" "${rss:-?}" > "$out/$target.summary"
  else
    echo FAIL > "$out/$target.status"
    printf '%-18s FAIL  rc=%s after %s runs: %s (input %s, log %s)\n' "$target" "$rc" "${runs:-?}" \
      "$(grep -m 1 -E 'ERROR: |runtime error|==[0-9]+== ' "$log" | cut -c1-160)" "${artifact:-none}" "$log" \
      > "$out/$target.summary"
  fi
  cat "$out/$target.summary"
}

mkdir -p "$out"
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, $jobs at once"
for target in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
  fuzz_one "$target" &
done
wait

echo "fuzz summary (${seconds}s per target):"
status=0
for target in "${targets[@]}"; do
  cat "$out/$target.summary"
  [[ "$(cat "$out/$target.status")" == PASS ]] || status=1
done
exit $status
