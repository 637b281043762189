#!/usr/bin/env bash
# The multi-GPU runs of the expert-parallel issues on one machine of N GPUs (2 now; 8 for issue 9), one step per
# call so that each fits a 10-minute device call:
#
#     bash benchmarks/ep_suite.sh tests      # fused dispatch/combine GPU tests at world N (must pass first)
#     bash benchmarks/ep_suite.sh dispatch   # benchmarks/dispatch.py -> results/dispatch_<gpu>x<N>.json
#     bash benchmarks/ep_suite.sh ep         # benchmarks/ep.py with Megatron-Core -> results/ep_<gpu>x<N>.json
#     bash benchmarks/ep_suite.sh train      # --ep N training, allgather and fused -> results/train_<gpu>x<N>.json
#
# N is every visible GPU (override with GPUS=...). NVLink multicast stays off. Megatron-Core for the `ep` step:
# its wheel in .whl/ (carried to the device machine) is installed into /tmp/site when present. Logs go to $OUT (or
# /tmp) as suite_<step>.log; the JSON files are also copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: bash benchmarks/ep_suite.sh tests|dispatch|ep|train}
gpus=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
out=${OUT:-/tmp}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
log="$out/suite_$step.log"
echo "ep_suite: step=$step gpus=$gpus log=$log"
case "$step" in
  tests)
    timeout 550 python -m pytest -q -p no:cacheprovider tests/gpu/test_fused_gpu.py tests/gpu/test_ep_nccl.py \
      >"$log" 2>&1 || { tail -30 "$log"; exit 1; }
    ;;
  dispatch)
    timeout 550 torchrun --standalone --nproc-per-node="$gpus" benchmarks/dispatch.py >"$log" 2>&1 \
      || { tail -30 "$log"; exit 1; }
    cp benchmarks/results/dispatch_*x"$gpus".json "$out"/ ;;
  ep)
    if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/megatron_core-*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    timeout 560 torchrun --standalone --nproc-per-node="$gpus" benchmarks/ep.py --budget-s 420 >"$log" 2>&1 \
      || { tail -30 "$log"; exit 1; }
    cp benchmarks/results/ep_*x"$gpus".json "$out"/ ;;
  train)
    timeout 570 python benchmarks/train_ep.py --gpus "$gpus" --steps 20 --log-every 5 \
      --dispatchers allgather fused --timeout 270 >"$log" 2>&1 || { tail -30 "$log"; exit 1; }
    cp benchmarks/results/train_*x"$gpus".json "$out"/ ;;
  *)
    echo "unknown step: $step (tests, dispatch, ep or train)" >&2; exit 2 ;;
esac
tail -25 "$log"
