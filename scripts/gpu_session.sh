#!/usr/bin/env bash
# One GPU session: reference AutoAttack on the quickstart export, then the benchmark matrix.
# Carry: _carry/pylib (ml_collections, mlxtend, pyautoattack without examples/),
# _carry/fallback (absl, yaml for Python 3.12), _carry/qs_export (python -m sovr_jax.export).
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
echo "=== quickstart AutoAttack ($(date +%T))"
timeout 150 python -m sovr_jax.autoattack_eval --export _carry/qs_export --device cuda --n 1000 \
  --seed 0 --batch_size 1000 --out "$OUT/quickstart_autoattack.json" 2>&1 | tail -n 25
bash scripts/gpu_bench.sh
