#!/usr/bin/env bash
# The GPU benchmark matrix of the performance issue, one JSON per part so that a cut keeps what
# finished. The parts run in order of priority within `run`'s 600 s for one call (run it with
# timeout_s 600): the levers with their profiles first, then what was never measured on a card
# (batch 1024, the whole epoch, MART, the XLA flags; 540 s of limits in all), then, as far as
# the call's time allows, re-measurements of rows the 2026-11-27 H100 run already has. Every row
# records its wall time (`case_s`, compilation included), from which later sessions size the
# parts. Runs from the repo root on the device machine:
#   bash scripts/gpu_bench.sh            # writes $OUT/bench.json
#   SMOKE=1 OUT=/tmp/o bash scripts/gpu_bench.sh   # the same parts at CPU sizes
# ml_collections (and, where missing, absl/yaml) travel in _carry/ (see docs/performance.md).
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
# One compilation cache for all parts: a step compiled in one part is not compiled again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
# `run` returns at most 8 files from $OUT: the output goes to log.txt, each part's rows to
# $OUT/bench_NAME.json while it runs (a cut keeps them), and a part that has ended is folded
# into $OUT/bench.json ({"parts": {NAME: its JSON}}). So at most three files.
exec > >(tee -a "$OUT/log.txt") 2>&1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true)
python -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())"
# SMOKE: CPU sizes, with 4x the time limits (a CPU's compilation is slower than the steps).
if [ -n "${SMOKE:-}" ]; then S="--cpu_smoke"; X=4; else S=""; X=1; fi
fold() {  # NAME, exit status: the part's JSON joins $OUT/bench.json ("cut": its time ran out)
  python - "$OUT/bench_$1.json" "$OUT/bench.json" "$1" "$2" <<'PY'
import json, os, sys
from sovr_jax import jsonio
part, into, name, rc = sys.argv[1:]
if os.path.exists(part):
  with open(part) as f:
    got = json.load(f)
  folded = {"parts": {}}
  if os.path.exists(into):
    with open(into) as f:
      folded = json.load(f)
  folded["parts"][name] = {**got, "exit_status": int(rc), "cut": rc in ("124", "137")}
  jsonio.write_json_atomic(into, folded)
  os.remove(part)
PY
}
part() {  # NAME, timeout (s), args...: every row is in $OUT/bench_NAME.json as soon as it is timed
  local name=$1 t=$(($2 * X)); shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" python -m sovr_jax.bench $S "$@" --out "$OUT/bench_$name.json" 2>&1 | tail -n 40
  fold "$name" "${PIPESTATUS[0]}"
}
# 0. The levers, side by side at batch 512, bf16, and where the time goes: the step with and
#    without the clean_acc metric's forward and with and without BatchNorm folded into the
#    attack's convolutions, each traced (3 steps) and read per kernel class into its row;
#    PyTorch eager float32 at 512 for the ratio.
part prn18_levers 160 --archs preact_resnet18 --batches 512 --precisions bfloat16 \
  --methods pgd_at --clean_metric on,off --fold_bn off,on --torch float32 \
  --profile "${PROFILE_DIR:-/tmp/sovr_profiles}"
# 1. PGD-AT at batch 128 and at 1024 (a larger per-device batch: does the card fill better?),
#    vs PyTorch eager float32 at each. (512 is part 0's; several steps per dispatch and
#    host-assembled batches were measured on the H100: 0-3 % and under 1 %.)
part prn18_pgd_at 110 --archs preact_resnet18 --batches 128,1024 --precisions bfloat16 \
  --methods pgd_at --torch float32
# 2. A whole CIFAR-sized epoch (50,000 images) of the trainer, end to end, against its steps alone.
part prn18_epoch 100 --archs preact_resnet18 --batches 512 --precisions bfloat16 --methods "" \
  --torch "" --epoch --iters 10 --repeats 3
# 3. SOVR and MART at batch 512 (overhead vs PGD-AT; MART was not in the H100 run), bf16.
part prn18_methods 80 --archs preact_resnet18 --batches 512 --precisions bfloat16 \
  --methods sovr,mart --torch "" --iters 10 --repeats 3
# 4. XLA flags side by side (one process per set), at batch 128 where launches weigh most:
#    XLA's defaults against no command buffers (each kernel launched on its own).
part prn18_xla_flags 90 --archs preact_resnet18 --batches 128 --precisions bfloat16 \
  --methods pgd_at --dispatch 1 --torch "" --xla_flags ";--xla_gpu_enable_command_buffer="
# 5. Re-measured: WideResNet-34-10 at 512, then float32 and the other methods at 512.
part wrn34_10 60 --archs wrn34_10 --batches 512 --precisions bfloat16 --methods pgd_at \
  --torch "" --iters 6 --repeats 3
part prn18_f32 40 --archs preact_resnet18 --batches 512 --precisions float32 --methods pgd_at \
  --torch ""
part prn18_methods_more 100 --archs preact_resnet18 --batches 512 --precisions bfloat16 \
  --methods trades,mail_at,gairat --torch "" --iters 10 --repeats 3
echo "=== done ($(date +%T))"
