#!/usr/bin/env bash
# The GPU benchmark matrix of the performance issue, one JSON per part so that
# a timeout keeps what finished (part 0, the levers and the profile, first). Runs from the repo root on the device machine:
#   bash scripts/gpu_bench.sh            # writes $OUT/bench_*.json (about 10 min on an H100)
#   SMOKE=1 OUT=/tmp/o bash scripts/gpu_bench.sh   # the same parts at CPU sizes
# ml_collections (and, where missing, absl/yaml) travel in _carry/ (see docs/performance.md).
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH="$PWD:$PWD/_carry/pylib"
python -c "import yaml, absl" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/_carry/fallback"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$OUT/gpu.txt" 2>&1
python -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())" | tee "$OUT/versions.txt"
# SMOKE: CPU sizes, with 4x the time limits (a CPU's compilation is slower than the steps).
if [ -n "${SMOKE:-}" ]; then S="--cpu_smoke"; X=4; else S=""; X=1; fi
part() {  # name, timeout (s), args...; every row is in $OUT/bench_NAME.json as soon as it is timed
  local name=$1 t=$(($2 * X)); shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" python -m sovr_jax.bench $S "$@" --out "$OUT/bench_$name.json" 2>&1 | tail -n 40
}
# 0. The levers, side by side at batch 512, bf16, and where the time goes: the step with and
#    without the clean_acc metric's forward and with and without BatchNorm folded into the
#    attack's convolutions, each traced (3 steps) and read per kernel class into its row.
part prn18_levers 150 --archs preact_resnet18 --batches 512 --precisions bfloat16 \
  --methods pgd_at --clean_metric on,off --fold_bn off,on --torch float32 \
  --profile "${PROFILE_DIR:-/tmp/sovr_profiles}"
# 1. PGD-AT, PreActResNet-18, bf16, batch 128, 512 and 1024 (a larger per-device batch: does
#    the card fill better?), vs PyTorch eager f32 and bf16 autocast. With and without the
#    clean_acc metric's eval-mode forward (train.clean_acc_metric).
part prn18_pgd_at 240 --archs preact_resnet18 --batches 128,512,1024 --precisions bfloat16 \
  --methods pgd_at --dispatch 1,4 --torch float32,amp --host_batches --clean_metric on,off
# 2. Every method at batch 512 (overhead vs PGD-AT), bf16.
part prn18_methods 160 --archs preact_resnet18 --batches 512 --precisions bfloat16 \
  --methods sovr,trades,mart,mail_at,gairat --torch "" --iters 10 --repeats 3
# 3. float32 at batch 512.
part prn18_f32 60 --archs preact_resnet18 --batches 512 --precisions float32 --methods pgd_at --torch ""
# 4. WideResNet-34-10, bf16, batch 512 (PyTorch at 128: 512 is slow in eager f32).
part wrn34_10 70 --archs wrn34_10 --batches 512 --precisions bfloat16 --methods pgd_at \
  --torch "" --iters 6 --repeats 3
# 5. A whole CIFAR-sized epoch (50,000 images) of the trainer, end to end, against its steps alone.
part prn18_epoch 150 --archs preact_resnet18 --batches 512 --precisions bfloat16 --methods "" \
  --torch "" --epoch --iters 10 --repeats 3
# 6. XLA flags side by side (one process per set), at batch 128 where launches weigh most:
#    XLA's defaults against no command buffers (each kernel launched on its own).
part prn18_xla_flags 120 --archs preact_resnet18 --batches 128 --precisions bfloat16 \
  --methods pgd_at --dispatch 1 --torch "" --xla_flags ";--xla_gpu_enable_command_buffer="
echo "=== done ($(date +%T))"
