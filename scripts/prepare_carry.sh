#!/usr/bin/env bash
# Prepares, on this machine, the git-ignored folders a GPU call carries (`run`'s carry:
# ["_carry", "_data"]). The device machine has jax, flax, optax, orbax, chex and torch, but not
# ml_collections, mlxtend, pyautoattack or tensorboardX; absl-py and PyYAML go in a fallback that
# the GPU scripts add to PYTHONPATH only where they are missing.
#   _carry/pylib     ml_collections, mlxtend, pyautoattack (without its 42 MB examples/),
#                    tensorboardX
#   _carry/fallback  PyYAML and absl-py built for Python 3.12
#   _data/           the CIFAR-10 JPEG tarball (from ../shared/data; never committed)
# Usage: bash scripts/prepare_carry.sh   (SHARED=path/to/shared if it is not ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PYTHON:-python3}
rm -rf _carry && mkdir -p _carry _data
"$PY" -m pip install -q --no-deps --target _carry/pylib -c constraints.txt \
  ml_collections mlxtend pyautoattack tensorboardX
rm -rf _carry/pylib/pyautoattack/examples _carry/pylib/bin
"$PY" -m pip install -q --no-deps --target _carry/fallback --python-version 3.12 \
  --only-binary=:all: -c constraints.txt pyyaml absl-py
if [ ! -f _data/cifar10-jpeg.tar.gz ]; then
  if [ -f "$SHARED/data/cifar10-jpeg.tar.gz" ]; then
    cp "$SHARED/data/cifar10-jpeg.tar.gz" _data/
  else
    echo "prepare_carry: $SHARED/data/cifar10-jpeg.tar.gz not found; set" \
         "SHARED=<folder that holds data/>, or copy the tarball into _data/ yourself" \
         "(scripts/gpu_study.sh reads it there)." >&2
    exit 1
  fi
fi
du -sh _carry/pylib _carry/fallback _data
# `run` carries at most 64 MiB in all.
total=$(du -sk _carry _data | awk '{s += $1} END {print s}')
if [ "$total" -gt $((64 * 1024)) ]; then
  echo "prepare_carry: _carry + _data hold ${total} KiB, over run's 64 MiB carry limit" >&2
  exit 1
fi
echo "ready: run(carry=[\"_carry\", \"_data\"], ...)"
