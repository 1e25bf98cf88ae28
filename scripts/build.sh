#!/usr/bin/env bash
# Configures and builds mdff in build/ (Release, Ninja, ccache when present). The CUDA backend is
# built when nvcc and cuDNN are found (-DMDFF_CUDA=AUTO); extra arguments go to CMake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build --parallel "$(nproc)"
