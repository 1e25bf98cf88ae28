#!/usr/bin/env bash
# Quick check that the engine learns: installs what mdff needs (Debian packages), builds it, and runs
# mdff_demo, which trains a small CNN (conv-BN-ReLU-pool twice, a linear classifier) with the engine's autograd
# on the embedded default dataset (Fashion-MNIST from Debian's dataset-fashion-mnist) for about 35 seconds and
# prints its test accuracy. Arguments go to mdff_demo (--data-dir, --steps, --batch, --lr, --seed); the main
# job, train_mdff, is scripts/train_default.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/quick_start.sh
quick_start scripts/run_demo.sh build/apps/mdff_demo "$@"
