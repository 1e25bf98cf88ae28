#!/usr/bin/env bash
# Quick start, tests: installs what mdff and its tests need (Debian packages), builds, and runs the
# whole test suite with CTest. Without a GPU the CUDA tests are reported as skipped, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
scripts/build.sh
ctest --test-dir build --output-on-failure --no-tests=error
