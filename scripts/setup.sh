#!/usr/bin/env bash
# Installs what mdff needs on a fresh Debian 12 machine, from Debian's packages only.
#   scripts/setup.sh          build dependencies + the embedded default dataset
#   scripts/setup.sh --test   the same, plus what the test suite, the sanitizer run and the fuzzing need
# The CUDA toolkit and cuDNN are not Debian packages here: the CUDA backend is built when
# /usr/local/cuda (or nvcc on PATH) and cuDNN are present, and skipped otherwise.
set -euo pipefail

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
if [[ "${1:-}" == "--test" ]]; then
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
