#!/usr/bin/env bash
# Quick start, main job: installs what mdff needs (Debian packages), builds it, and runs train_mdff on
# the embedded default dataset (Fashion-MNIST from Debian's dataset-fashion-mnist): training, encoding,
# evaluation and every result file in runs/. Arguments go to train_mdff (see build/apps/train_mdff --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/program_help.sh
quick_start_help "scripts/train_default.sh" build/apps/train_mdff "$@"
scripts/setup.sh
scripts/build.sh > build.log 2>&1 || { tail -n 40 build.log; echo "build failed: see build.log"; exit 1; }
exec build/apps/train_mdff "$@"
