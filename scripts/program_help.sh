# Sourced by the quick-start scripts (train_default.sh, run_demo.sh), which install, build and then run a
# program with their arguments: given -h or --help, say so and show the program's own help when it is
# built, without installing or building anything first.
#   quick_start_help SCRIPT PROGRAM "$@"   (returns when no argument asks for help)
quick_start_help() {
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
}
