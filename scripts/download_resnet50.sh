#!/usr/bin/env bash
# Downloads ImageNet-pretrained ResNet50 weights for `train_mdff --pretrained`: timm's `resnet50.tv_in1k`,
# which is torchvision's IMAGENET1K_V1 weights (ResNet50, 76.13% top-1) stored as safetensors under
# torchvision's names, so models/pretrained.h loads it as it is.
#   scripts/download_resnet50.sh [FILE]    (default: the repository's data/resnet50.tv_in1k.safetensors)
# Needs internet access and curl or wget. Prints the file's SHA-256 and size (no checksum is built in: none
# was published with the file that this script could check against) and the train_mdff command to use it.
set -euo pipefail

url="https://huggingface.co/timm/resnet50.tv_in1k/resolve/main/model.safetensors"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: scripts/download_resnet50.sh [FILE]
Downloads ImageNet-pretrained ResNet50 weights (timm's resnet50.tv_in1k: torchvision's IMAGENET1K_V1 as
safetensors, about 102 MB) from $url
into FILE, for train_mdff --pretrained. FILE defaults to $repo_root/data/resnet50.tv_in1k.safetensors;
one starting with '-' goes after '--'. A FILE already there is kept. Prints its size and SHA-256.
Needs internet access and curl or wget.
EOF
}
usage_error() { echo "download_resnet50: $*" >&2; usage >&2; exit 2; }

# shellcheck source=SCRIPTDIR/fetch.sh
source "$repo_root/scripts/fetch.sh"
read_path_argument FILE "$repo_root/data/resnet50.tv_in1k.safetensors" "$@"
file=$path_argument
[[ ! -d "$file" ]] || usage_error "$file is a folder: FILE is the weights file to write"
partial="$file.part"

fail() { echo "download_resnet50: $*" >&2; rm -f -- "$partial"; exit 1; }

command -v sha256sum >/dev/null || fail "sha256sum is missing (Debian package coreutils)"
mkdir -p -- "$(dirname -- "$file")" || fail "cannot create the folder $(dirname -- "$file")"

if [[ -f "$file" ]]; then
  echo "download_resnet50: $file is already here (delete it to download it again)"
else
  echo "download_resnet50: downloading $url (about 102 MB)"
  fetch_url "$url" "$partial" "you can fetch $url by other means and save it as $file"
  mv -- "$partial" "$file"
fi

echo "download_resnet50: $file"
echo "  size    $(stat -c %s -- "$file") bytes"
echo "  sha256  $(sha256sum -- "$file" | cut -d' ' -f1)"
echo "Train MDFF-SH from these weights with (from $repo_root):"
echo "  build/apps/train_mdff --pretrained ${file#"$repo_root"/}"
