#!/usr/bin/env bash
# One GPU session of the reproduction study (docs/results.md), inside a 10-minute device call:
#   1. train the study's runs (configs/study.py, gpu scale), several at a time;
#   2. AutoAttack on the first $N test points: pyautoattack and the JAX AutoAttack side by side
#      on the $REFERENCE runs (scripts/compare_autoattack.py), the JAX AutoAttack on the others;
#   3. collect everything into $OUT/study_gpu.json (also after each stage, so a timeout keeps
#      what finished) and the logs into $OUT/logs.tar.gz.
# Carry: _carry/pylib (ml_collections, mlxtend, pyautoattack without examples/), _carry/fallback
# (absl, yaml where missing), _carry/data/cifar10-jpeg.tar.gz (a copy of ../shared/data's).
#   RUNS= SWEEP=0.2,0.6,0.8 REFERENCE= bash scripts/gpu_study.sh   # on the device (empty = none)
#   OUT=/tmp/o SCALE=tiny N=16 ATTACKS=apgd-ce DATA=../shared/data/cifar10-jpeg.tar.gz \
#     bash scripts/gpu_study.sh                                  # CPU smoke test (tests/test_study.py)
set -uo pipefail
OUT=${OUT:?set OUT}
SCALE=${SCALE:-gpu}
RUNS=${RUNS-pgd_at,sovr,mail_at,gairat}
SWEEP=${SWEEP-}
REFERENCE=${REFERENCE-sovr}
N=${N:-1000}
ATTACKS=${ATTACKS:-}
PARALLEL=${PARALLEL:-4}
DEADLINE=${DEADLINE:-560}          # seconds from the start by which everything has ended
DATA=${DATA:-_carry/data/cifar10-jpeg.tar.gz}
WORK=${WORK:-/tmp/study}
START=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
export PYTHONUNBUFFERED=1
# Several JAX processes share the GPU: no preallocation; one compilation cache.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
mkdir -p "$WORK"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true)
python -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())"

STUDY=(python -m scripts.study --scale "$SCALE" --workdir "$WORK" --out "$OUT/study_$SCALE.json"
       --runs "$RUNS" --sweep "$SWEEP" --data "$DATA" --reference "$REFERENCE" --n "$N"
       --attacks "$ATTACKS" --aa_batch_size "$N" --cache_dir "${CACHE_DIR:-}")
save_logs() { tar czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log */report.json \
  */compare.json */autoattack_jax.json 2>/dev/null) 2>/dev/null || true; }

echo "=== train ($(date +%T), $(left) s left)"
# Training may take what is left minus the time AutoAttack needs (ATTACK_S).
ATTACK_S=${ATTACK_S:-270}
timeout "$(( $(left) - ATTACK_S ))" "${STUDY[@]}" --stages train,collect --parallel "$PARALLEL" \
  --train_timeout "$(( $(left) - ATTACK_S - 10 ))"
save_logs

if [ -n "$REFERENCE" ]; then  # method runs (not sweep runs), comma-separated
  echo "=== AutoAttack, side by side on $REFERENCE ($(date +%T), $(left) s left)"
  # At most COMPARE_S, so that the other runs' attacks keep the rest.
  COMPARE_S=${COMPARE_S:-190}
  t=$(( $(left) - 60 )); [ "$t" -gt "$COMPARE_S" ] && t=$COMPARE_S
  timeout "$(( t + 10 ))" "${STUDY[@]}" --stages attack,collect --runs "$REFERENCE" \
    --sweep "" --aa_timeout "$t"
  save_logs
fi

echo "=== JAX AutoAttack on the other runs, in parallel ($(date +%T), $(left) s left)"
others=$(python - "$RUNS" "$SWEEP" "$REFERENCE" <<'EOF'
import sys
sys.path.insert(0, ".")
from scripts import study
names = study.run_specs(sys.argv[1], sys.argv[2])
print(" ".join(n for n in names if n not in sys.argv[3].split(",")))
EOF
)
budget=$(( $(left) - 15 ))
pids=()
for name in $others; do
  method=${name%%_rho*}
  if [ "$method" != "$name" ]; then args=(--runs "" --sweep "${name#sovr_rho}"); else args=(--runs "$name" --sweep ""); fi
  timeout "$budget" "${STUDY[@]}" --stages attack "${args[@]}" --reference "" \
    --aa_timeout "$budget" &
  pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"   # (a bare wait would also wait for tee)
timeout 10 "${STUDY[@]}" --stages collect
save_logs
echo "=== done ($(date +%T), $(left) s left)"
