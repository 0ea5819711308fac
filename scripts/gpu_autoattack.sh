#!/usr/bin/env bash
# The AutoAttack speed check of docs/autoattack.md, for one GPU session: worst case (every
# point stays robust, every attack runs in full) on a PreActResNet-18, the JAX AutoAttack in
# float32 and pyautoattack side by side, then the JAX AutoAttack with its attacks on the
# bfloat16 network alone, then APGD-CE, APGD-T and FAB-T with the 9 targets of APGD-T and of
# FAB-T in one call (--runs_at_once 9). One JSON per part in $OUT. Run it as one `run` call
# with timeout_s 600: the parts' limits add up to 700 s, so the last part runs as far as the
# call's time allows, and the parts before it keep their JSON.
# Carry _carry/ (pyautoattack without examples/ and, where absl/yaml are missing, a fallback),
# built by `bash scripts/prepare_carry.sh`.
#   bash scripts/gpu_autoattack.sh                                   # on the device
#   OUT=/tmp/o N=8 EXTRA="--fast --device cpu" bash scripts/gpu_autoattack.sh   # CPU smoke test
set -uo pipefail
OUT=${OUT:?set OUT}
N=${N:-1000}
EXTRA=${EXTRA:-}
export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
exec > >(tee -a "$OUT/log.txt") 2>&1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true)
CMP=(python -m sovr_jax.autoattack_eval --model preact_resnet18 --n "$N" --batch_size "$N"
     --worst_case $EXTRA)
echo "=== float32, JAX and reference side by side ($(date +%T))"
timeout "${T_SIDE:-400}" "${CMP[@]}" --engine both --out "$OUT/worst_case_f32.json"
echo "=== JAX, attacks on the bfloat16 network ($(date +%T))"
timeout "${T_BF16:-150}" "${CMP[@]}" --engine jax --attack_dtype bfloat16 \
  --out "$OUT/worst_case_jax_bf16.json"
echo "=== JAX, float32, the 9 targets of APGD-T and FAB-T in one call ($(date +%T))"
timeout "${T_BATCHED:-150}" "${CMP[@]}" --engine jax --runs_at_once 9 \
  --attacks apgd-ce,apgd-t,fab-t --out "$OUT/worst_case_jax_runs_at_once.json"
echo "=== done ($(date +%T))"
