# Sourced by the quick-start scripts (train_default.sh, run_demo.sh): install what mdff needs, build it, run
# one program with the script's arguments.
#   quick_start SCRIPT PROGRAM "$@"
# Given -h or --help, it says so and shows the program's own help when the program is built, without
# installing or building anything first.
quick_start() {
  local script=$1 program=$2 arg; shift 2
  for arg in "$@"; do
    [[ $arg == -h || $arg == --help ]] || continue
    echo "usage: $script [ARGUMENTS FOR $(basename "$program")]"
    echo "Installs what mdff needs (scripts/setup.sh), builds it (scripts/build.sh), then runs $program with the"
    echo "arguments. Its options:"
    echo
    if [[ -x $program ]]; then
      exec "$program" --help
    fi
    echo "($program is not built yet: run $script without --help, or scripts/build.sh, then $program --help)"
    exit 0
  done
  scripts/setup.sh
  scripts/build.sh > build.log 2>&1 || { tail -n 40 build.log; echo "build failed: see build.log"; exit 1; }
  exec "$program" "$@"
}
