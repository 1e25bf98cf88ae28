#!/usr/bin/env bash
# Quick start, main job: installs what mdff needs (Debian packages), builds it, and runs train_mdff on
# the embedded default dataset (Fashion-MNIST from Debian's dataset-fashion-mnist): training, encoding,
# evaluation and every result file in runs/. Arguments go to train_mdff (see build/apps/train_mdff --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quick_start.sh
quick_start scripts/train_default.sh build/apps/train_mdff "$@"
