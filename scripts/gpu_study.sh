#!/usr/bin/env bash
# One GPU session of the reproduction study (docs/results.md): a batch of cells (run x seed) in
# about 9.5 minutes of one card (run it with timeout_s 600), every cell's result written the
# moment it exists.
#   1. train the cells (configs/study.py at $SCALE), all at once on the card; training may run
#      until $ATTACK_S seconds before $DEADLINE: a cell whose training is cut has no result,
#      while one whose AutoAttack is cut keeps its clean, PGD-20 and CW-20 figures and every
#      attack that finished (docs/results.md gives the time budget);
#   2. as each cell finishes training: the JAX AutoAttack on its first $N test points
#      (per-point flags kept), then its cell JSON -> $OUT/cells/<cell>.json;
#   3. on the $CHECK cells, if time is left: both engines side by side on the first $CHECK_N
#      points (the reference's check of the JAX AutoAttack); the cell JSON is rewritten;
#   4. all cells -> $OUT/study_$SCALE.json, the logs -> $OUT/logs.tar.gz.
# A cut call keeps every cell JSON written before the cut. Back home, merge them into the
# committed study: python -m scripts.study --merge_from OUT/study_full.json \
#   --into results/study_full.json   (or each OUT/cells/*.json).
# The data set is read from a git-ignored folder of the checkout (DATA, default
# _data/cifar10-jpeg.tar.gz) and the packages the card lacks from _carry/: build both with
# `bash scripts/prepare_carry.sh` and carry ["_carry", "_data"].
#   RUNS=pgd_at,sovr SEEDS=0 CHECK=sovr_s0 bash scripts/gpu_study.sh        # on the device
#   OUT=/tmp/o SCALE=tiny N=16 CHECK_N=16 ATTACKS=apgd-ce \
#     DATA=../shared/data/cifar10-jpeg.tar.gz bash scripts/gpu_study.sh     # CPU smoke test
set -uo pipefail
OUT=${OUT:?set OUT}
SCALE=${SCALE:-full}
RUNS=${RUNS:-pgd_at,sovr}
SEEDS=${SEEDS:-0}
CHECK=${CHECK-}
N=${N:-10000}
CHECK_N=${CHECK_N:-1000}
ATTACKS=${ATTACKS:-}
DEADLINE=${DEADLINE:-570}          # seconds from the start by which everything has ended
ATTACK_S=${ATTACK_S:-45}           # the least kept for AutoAttack after training
DATA=${DATA:-_data/cifar10-jpeg.tar.gz}
WORK=${WORK:-/tmp/study}
START=$(date +%s)
CELLS=$(( $(tr ',' '\n' <<< "$RUNS" | grep -c .) * $(tr ',' '\n' <<< "$SEEDS" | grep -c .) ))
if [ "$CELLS" -gt 5 ]; then  # run returns at most 8 files: the cells, the batch, log, logs
  echo "RUNS x SEEDS make $CELLS cells: at most 5 per call (run returns 8 files from \$OUT)." >&2
  exit 2
fi
if [ "$ATTACK_S" -lt 30 ]; then  # the AutoAttack stage keeps 20 s of it for its own ending
  echo "ATTACK_S=$ATTACK_S is too short: keep at least 30 s for the AutoAttack stage." >&2
  exit 2
fi
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
export PYTHONUNBUFFERED=1
# Several JAX processes share the GPU: no preallocation; one compilation cache.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
mkdir -p "$WORK" "$OUT/cells"
exec > >(tee -a "$OUT/log.txt") 2>&1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true)
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

STUDY=(python -m scripts.study --scale "$SCALE" --workdir "$WORK" --data "$DATA" --n "$N"
       --check_n "$CHECK_N" --attacks "$ATTACKS" --aa_batch_size "${AA_BATCH:-1000}"
       --attack_dtype "${AA_DTYPE:-float32}" --runs_at_once "${AA_RUNS_AT_ONCE:-1}"
       --cache_dir "${CACHE_DIR:-}")
save_logs() { tar czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log 2>/dev/null) \
  2>/dev/null || true; }

# Decode the images once, before the cells start side by side.
timeout "$(left)" python -c "
from configs import study; from sovr_jax import data
d = study.get_config('sovr,$SCALE').data
data.load_dataset(d.name, source=d.source, path='$DATA', cache_dir='${CACHE_DIR:-}' or None,
                  val_size=d.val_size)"

echo "=== plan: training may run until $(( DEADLINE - ATTACK_S )) s of $DEADLINE s ($(left) s left)"

cell() {  # RUN SEED: train, attack, write the cell; then the check if asked for
  local run=$1 seed=$2 name="$1_s$2"
  local one=(--runs "$run" --seeds "$seed")
  echo "=== $name: train ($(date +%T), $(left) s left)"
  timeout "$(( $(left) - ATTACK_S ))" "${STUDY[@]}" "${one[@]}" --stages train --out /dev/null \
    --parallel 1 --train_timeout "$(( $(left) - ATTACK_S - 5 ))"
  echo "=== $name: AutoAttack on $N points ($(date +%T), $(left) s left)"
  timeout "$(( $(left) - 15 ))" "${STUDY[@]}" "${one[@]}" --stages attack,collect \
    --out "$OUT/cells/$name.json" --aa_timeout "$(( $(left) - 20 ))"
  if [[ ",$CHECK," == *",$name,"* ]] && [ "$(left)" -gt 60 ]; then
    echo "=== $name: both engines on $CHECK_N points ($(date +%T), $(left) s left)"
    timeout "$(( $(left) - 10 ))" "${STUDY[@]}" "${one[@]}" --stages attack,collect \
      --check "$name" --out "$OUT/cells/$name.json" --aa_timeout "$(( $(left) - 15 ))"
  fi
  echo "=== $name: done ($(date +%T), $(left) s left)"
}

pids=()
for run in ${RUNS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    cell "$run" "$seed" &
    pids+=($!)
  done
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"   # (a bare wait would also wait for tee)
timeout 20 "${STUDY[@]}" --runs "$RUNS" --seeds "$SEEDS" --check "$CHECK" --stages collect \
  --out "$OUT/study_$SCALE.json"
save_logs
echo "=== done ($(date +%T), $(left) s left)"
