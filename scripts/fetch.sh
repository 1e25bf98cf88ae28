# Sourced by the download scripts: fetch_url URL OUTPUT HINT downloads URL into OUTPUT with curl, or wget
# when there is no curl, and on failure calls the caller's fail() with HINT (how else to get the file).
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
