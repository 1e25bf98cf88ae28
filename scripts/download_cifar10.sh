#!/usr/bin/env bash
# Downloads CIFAR-10's binary version, checks its MD5 and unpacks it, for load_cifar10 (data/dataset.h).
#   scripts/download_cifar10.sh [FOLDER]    (default: the repository's data/ folder)
# Result: FOLDER/cifar-10-batches-bin/ with data_batch_1..5.bin and test_batch.bin (30,730,000 bytes each).
# Needs internet access and curl or wget; an archive already in FOLDER with the right MD5 is reused.
set -euo pipefail

url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
md5_expected="c32a1d4ab5d03f1284b67883e8d87530"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: scripts/download_cifar10.sh [FOLDER]
Downloads CIFAR-10's binary version (about 163 MB) from $url,
checks its MD5 and unpacks it into FOLDER/cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin).
FOLDER defaults to $repo_root/data; one starting with '-' goes after '--'.
Needs internet access and curl or wget; an archive already in FOLDER with the right MD5 is reused.
EOF
}
usage_error() { echo "download_cifar10: $*" >&2; usage >&2; exit 2; }

# shellcheck source=SCRIPTDIR/fetch.sh
source "$repo_root/scripts/fetch.sh"
read_path_argument FOLDER "$repo_root/data" "$@"
folder=$path_argument
archive="$folder/cifar-10-binary.tar.gz"

fail() { echo "download_cifar10: $*" >&2; rm -f -- "$archive.part"; exit 1; }
md5_of() { md5sum -- "$1" | cut -d' ' -f1; }

command -v md5sum >/dev/null || fail "md5sum is missing (Debian package coreutils)"
command -v tar >/dev/null || fail "tar is missing (Debian package tar)"
mkdir -p -- "$folder" || fail "cannot create the folder $folder"

if [[ -f "$archive" && "$(md5_of "$archive")" == "$md5_expected" ]]; then
  echo "download_cifar10: $archive is already here and its MD5 is right"
else
  echo "download_cifar10: downloading $url (about 163 MB) into $folder"
  partial="$archive.part"
  fetch_url "$url" "$partial" "you can fetch $url by other means and put it in $folder"
  md5_actual="$(md5_of "$partial")"
  if [[ "$md5_actual" != "$md5_expected" ]]; then
    rm -f -- "$partial"
    fail "the download is damaged: MD5 $md5_actual, expected $md5_expected; run the script again"
  fi
  mv -- "$partial" "$archive"
fi

echo "download_cifar10: unpacking into $folder"
tar -xzf "$archive" -C "$folder" || fail "cannot unpack $archive"
batches="$folder/cifar-10-batches-bin"
for file in data_batch_1.bin data_batch_2.bin data_batch_3.bin data_batch_4.bin data_batch_5.bin test_batch.bin; do
  [[ -f "$batches/$file" ]] || fail "$batches/$file is missing after unpacking"
  size="$(stat -c %s -- "$batches/$file")"
  [[ "$size" == 30730000 ]] || fail "$batches/$file has $size bytes, expected 30730000"
done
echo "download_cifar10: CIFAR-10 is ready in $batches (pass this folder to the trainer)"
