#!/usr/bin/env bash
# Quick start, main job: installs what mdff needs (Debian packages), builds it, and trains on the
# embedded default dataset (Fashion-MNIST from Debian's dataset-fashion-mnist). Arguments go to the program.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh > build.log 2>&1 || { tail -n 40 build.log; echo "build failed: see build.log"; exit 1; }
exec build/apps/mdff_demo "$@"
