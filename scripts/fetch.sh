# Sourced by the download scripts, which define usage() and usage_error() first.
#
# read_path_argument WHAT DEFAULT "$@" reads the scripts' one optional argument (WHAT: FOLDER or FILE), before
# anything is created or fetched (an option taken for the path was handed to mkdir, curl, rm or realpath,
# which read it as one of theirs): -h/--help prints the usage; a path starting with '-' goes after '--'. It
# sets path_argument to the path (DEFAULT when none is given) made absolute, so that no path given to a
# command starts with '-' (the commands also get '--').
read_path_argument() {
  local what=$1 default=$2
  shift 2
  case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --) shift ;;
    -*) usage_error "unknown option $1" ;;
  esac
  (($# <= 1)) || usage_error "one $what at most, got $#: $*"
  [[ $# == 0 || -n "$1" ]] || usage_error "$what is empty"
  path_argument="$(realpath -m -- "${1:-$default}")"
}

# fetch_url URL OUTPUT HINT downloads URL into OUTPUT with curl, or wget when there is no curl, and on
# failure calls the caller's fail() with HINT (how else to get the file).
fetch_url() {
  local url="$1" output="$2" hint="$3"
  if command -v curl >/dev/null; then
    curl --fail --location --retry 3 --output "$output" "$url" || fail "the download failed (no internet access?); $hint"
  elif command -v wget >/dev/null; then
    wget --tries=3 --output-document="$output" "$url" || fail "the download failed (no internet access?); $hint"
  else
    fail "neither curl nor wget is installed (Debian: apt-get install curl); $hint"
  fi
}
