#!/usr/bin/env bash
# Installs what mdff needs on a fresh Debian 12 machine, from Debian's packages only.
#   scripts/setup.sh          build dependencies + the embedded default dataset
#   scripts/setup.sh --test   the same, plus what the test suite, the sanitizer run and the fuzzing need
# The CUDA toolkit and cuDNN are not Debian packages here: the CUDA backend is built when
# /usr/local/cuda (or nvcc on PATH) and cuDNN are present, and skipped otherwise.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/setup.sh [--test]
Installs mdff's build dependencies and the embedded default dataset (Fashion-MNIST) from Debian 12's
packages, with apt-get (through sudo when not root); packages already installed are skipped.
  --test   also what the test suite, the sanitizer run and the fuzzing need (PyTorch, clang, libFuzzer)
EOF
}

# Every argument is checked before apt-get runs: an unknown one, --help included, was ignored and the
# install went ahead.
test_packages=0
for arg in "$@"; do
  case "$arg" in
    --test) test_packages=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "setup: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build ccache   # compiler and build
  libopenblas0-openmp                        # CPU GEMM (sgemm/dgemm), OpenMP build, loaded at run time (core/blas.h)
  zlib1g-dev                                 # reading Fashion-MNIST's .gz idx files
  libstb-dev                                 # stb_image: decoding images of image-list datasets
  nlohmann-json3-dev                         # config.json / metrics.json / safetensors headers
  libcli11-dev                               # command-line parsing of the apps
  doctest-dev                                # unit tests
  dataset-fashion-mnist                      # the embedded default dataset
)
if ((test_packages)); then
  packages+=(python3-torch python3-torchvision)  # the PyTorch twin that test_torch_parity compares against
  packages+=(clang libclang-rt-dev libomp-dev)   # fuzzing (scripts/fuzz.sh): clang, libFuzzer, clang's OpenMP
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all Debian packages already installed"
fi
