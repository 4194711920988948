#!/usr/bin/env bash
# GPU driver for issues 6 and 7 (one H100 lease): the overhead benchmarks, then the issue-7
# ResNet-18 grid (CIFAR-10 and Fashion-MNIST, 3 seeds), then robustness and end-of-training
# sharpness of every finished run. Stages run in the order given:
#
#   bash scripts/gpu_dsbp_claims.sh env bench6 start7 tests until:560 pack      # batch 1
#   bash scripts/gpu_dsbp_claims.sh wait:300 robust7 pack
#   BATCH=b2 SKIP_MEM=1 bash scripts/gpu_dsbp_claims.sh env tests_cuda bench6 start7b tests_bg \
#     until:420 robust7b pack                                            # batch 2
#
# Data: DSBP_DATA (default .carry/data, holding cifar10_jpeg.npz and fashion_mnist.npz).
# Work: runs/gpu (git-ignored). start7 launches one background worker per (data set, seed)
# with setsid, so training continues between two device calls while the machine is held;
# `wait:S` waits up to S seconds for the workers; `pack` writes $OUT/gpu_results.tgz (no
# checkpoints). Every training run is one `dsbp bench` call; its run directory records the
# config, the environment (device, torch, commit) and the metrics.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DSBP_DATA="${DSBP_DATA:-$ROOT/.carry/data}" DSBP_CACHE="${DSBP_CACHE:-$ROOT/runs/cache}"
OUT="${OUT:-$ROOT/runs/out}"
W="$ROOT/runs/gpu"
mkdir -p "$OUT" "$W/logs"
PY=${PY:-python3}

# Issue 7 grid [ours]: ResNet-18 (width 1), batch 512, SGD-suited lr 0.2 with 5% warm-up and
# cosine decay, momentum 0.9, wd 5e-4, crop+flip, bf16 autocast, 5000 training images held
# out as the validation split. DSBP: the paper's k = 10, p = 100, beta = 0.1, 5 power iters.
EPOCHS=${EPOCHS:-10}
COMMON=(--model resnet18 --batch-size 512 --lr 0.2 --schedule cosine --warmup 0.05 --augment
        --amp bf16 --device "${DEVICE:-cuda}" --val 5000 --no-progress)
# EXTRA: flags appended to every bench call (a local CPU smoke test of this script:
# DEVICE=cpu EPOCHS=2 EXTRA="--model cnn --subset 500 --val 100 --eval-subset 200 --amp none")
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
PAPER=(--set rank=10 --set interval=100 --set sharpness=0.1 --set power_iters=5)
# configuration name -> bench flags (run in this order by each worker). Batch 1 (start7):
CONFIGS=(sgd dsbp_tuned sam_eqtime dsbp sam)
# Batch 2 (start7b): candidates for a better default (k = 64; p = 20 with 100 steps of
# full-gradient warm-up, since batch 1's DSBP sat near chance for its first epochs) and a
# repeat of batch 1's sgd (GPU run-to-run spread; weight norms beside the Hessian).
CONFIGS_B2=(sgd_r2 dsbp_tuned_k64 dsbp_tuned_p20w)
flags_of() {
  case "$1" in
    sgd_r2) echo "--methods sgd --epochs $EPOCHS" ;;
    dsbp_tuned_k64) echo "--methods dsbp_tuned --epochs $EPOCHS ${PAPER[*]} --set rank=64" ;;
    dsbp_tuned_p20w) echo "--methods dsbp_tuned --epochs $EPOCHS ${PAPER[*]} --set interval=20 \
--set warmup=100" ;;
    sgd) echo "--methods sgd --epochs $EPOCHS" ;;
    dsbp_tuned) echo "--methods dsbp_tuned --epochs $EPOCHS ${PAPER[*]}" ;;
    dsbp) echo "--methods dsbp --epochs $EPOCHS ${PAPER[*]}" ;;
    # SAM at SGD's wall-clock: half the epochs (two gradient evaluations per step)
    sam_eqtime) echo "--methods sam --set rho=0.05 --epochs $((EPOCHS / 2))" ;;
    sam) echo "--methods sam --set rho=0.05 --epochs $EPOCHS" ;;
  esac
}

worker() {  # worker DATASET SEED BATCH: every configuration of one (data set, seed), in order
  local ds=$1 seed=$2 batch=$3 short
  short=$([ "$ds" = cifar10 ] && echo c10 || echo fm)
  local -a configs=("${CONFIGS[@]}")
  [ "$batch" = b2 ] && configs=("${CONFIGS_B2[@]}")
  for c in "${configs[@]}"; do
    # shellcheck disable=SC2046
    $PY -m dsbp.cli bench --datasets "$ds" "${COMMON[@]}" $(flags_of "$c") "${EXTRA_ARGS[@]}" \
      --seeds 1 --first-seed "$seed" --resume --label "issue 7 GPU: $c" \
      --out "$W/dsbp_claims/$short/$c" >>"$W/logs/train_${short}_s${seed}.log" 2>&1 \
      || echo "FAILED $ds $c seed $seed" >>"$W/logs/failures.log"
  done
  touch "$W/logs/done_${batch}_${short}_s${seed}"
}

stage() {
  case "$1" in
    env)
      { nvidia-smi; $PY -c "import torch, sys; print(sys.version); print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())"; git log -1 --format=%H; nproc; } \
        >"$W/logs/env.txt" 2>&1
      cat "$W/logs/env.txt"
      # decode the JPEG data once, before parallel workers race for the cache
      $PY -c "from dsbp.data import load_dataset as L; L('cifar10'); L('fashion_mnist')" ;;
    tests)
      timeout 240 $PY -m pytest -q -x -n 8 -p no:cacheprovider tests \
        >"$W/logs/tests.log" 2>&1
      tail -5 "$W/logs/tests.log"
      grep -n "cuda" "$W/logs/tests.log" | head -5 ;;
    bench6)
      local R=benchmarks/results
      $PY benchmarks/step_overhead.py --model resnet18 --width 1 --device cuda --dtype bf16 \
        --batch 512 --repeats 40 --block 10 --blocks 20 \
        --out step_overhead_resnet18_cuda_bf16.json 2>&1 | tee "$W/logs/bench6.log"
      $PY benchmarks/projection_only.py --device cuda 2>&1 | tee -a "$W/logs/bench6.log"
      [ -n "${SKIP_MEM:-}" ] || timeout 150 $PY benchmarks/subspace_memory.py memory \
        --device cuda 2>&1 | tee -a "$W/logs/bench6.log"
      mkdir -p "$W/bench6" && cp $R/*cuda*.json "$W/bench6/" 2>/dev/null
      ls "$W/bench6" ;;
    start7 | start7b)
      local batch=b1
      [ "$1" = start7b ] && batch=b2
      for ds in cifar10 fashion_mnist; do
        for seed in 0 1 2; do
          setsid bash "$0" _worker "$ds" "$seed" "$batch" </dev/null >/dev/null 2>&1 &
        done
      done
      sleep 2; echo "started $(pgrep -fc 'gpu_dsbp_claims.sh _worker') workers" ;;
    tests_bg)  # the whole suite on the GPU machine, in the background (CPU cores only)
      setsid bash -c "timeout 400 $PY -m pytest -q -n 6 -p no:cacheprovider tests \
        >'$W/logs/tests.log' 2>&1" </dev/null >/dev/null 2>&1 &
      echo "suite started in the background: $W/logs/tests.log" ;;
    tests_cuda)  # the GPU tests, in the foreground
      timeout 120 $PY -m pytest -q -p no:cacheprovider tests/optim/test_fastpath.py \
        tests/data/test_data_loader.py 2>&1 | tee "$W/logs/tests_cuda.log" | tail -3 ;;
    wait:* | until:*)  # wait:S waits up to S s; until:S until S s after this script started
      local limit=${1#*:} t0=$SECONDS
      [ "${1%%:*}" = until ] && limit=$((limit - SECONDS))
      while [ $((SECONDS - t0)) -lt "$limit" ]; do
        [ "$(ls "$W"/logs/done_"${BATCH:-b1}"_* 2>/dev/null | wc -l)" -ge 6 ] && break
        sleep 10
      done
      echo "waited $((SECONDS - t0)) s; done: $(ls "$W"/logs/done_"${BATCH:-b1}"_* 2>/dev/null \
        | wc -l)/6"
      find "$W/dsbp_claims" -name result.json | sed "s|$W/dsbp_claims/||" | sort
      cat "$W/logs/failures.log" 2>/dev/null
      tail -n 3 "$W"/logs/train_*.log ;;
    robust7)
      for s in c10 fm; do  # the two data sets in parallel
        $PY scripts/dsbp_claims_robustness.py "$W/dsbp_claims/$s" --device "${DEVICE:-cuda}" \
          --n-test "${NTEST:-2000}" --title "GPU, ResNet-18, full data" --out "$W/robustness" \
          >"$W/logs/robust_$s.log" 2>&1 || echo "robustness $s failed" &
      done
      wait
      tail -n 2 "$W"/logs/robust_*.log ;;
    robust7b)  # batch 2: one process per (data set, configuration), all in parallel
      for s in c10 fm; do
        for c in "${CONFIGS_B2[@]}"; do
          $PY scripts/dsbp_claims_robustness.py "$W/dsbp_claims/$s" --only "$c" --tag "$c" \
            --device "${DEVICE:-cuda}" --n-test "${NTEST:-2000}" \
            --title "GPU, ResNet-18, full data" --out "$W/robustness_b2" \
            >"$W/logs/robust_b2_${s}_$c.log" 2>&1 || echo "robustness $s $c failed" &
        done
      done
      wait
      ls "$W/robustness_b2" ;;
    pack)
      tar czf "$OUT/gpu_results.tgz" --exclude='*.pt' --exclude='*.tmp' --exclude='*.pt.*' -C "$ROOT" runs/gpu
      ls -la "$OUT" ;;
    _worker) ;;  # handled below
    *) echo "unknown stage $1" >&2; return 2 ;;
  esac
}

if [ "${1:-}" = _worker ]; then
  worker "$2" "$3" "${4:-b1}"
  exit 0
fi
for s in "$@"; do
  echo "=== stage $s ($(date -u +%T))"
  stage "$s"
done
