#!/usr/bin/env bash
# Set up fedcodec on a fresh Debian/Ubuntu machine: CPU PyTorch, the package with its test extras,
# and the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist).
# Idempotent; run from the repository root. Set FEDCODEC_SKIP_DATA=1 to skip the dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  say "installing PyTorch 2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
say "installing fedcodec (editable) with the test and flower extras"
"$PY" -m pip install -q -e ".[test,flower]"

if [ "${FEDCODEC_SKIP_DATA:-0}" != 1 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      || say "WARNING: could not install dataset-fashion-mnist; run 'fedcodec data download fashion-mnist' instead"
  else
    say "Fashion-MNIST not found: 'sudo apt-get install dataset-fashion-mnist' or 'fedcodec data download fashion-mnist'"
  fi
fi
say "done"
