#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 8 minutes on one GPU,
# most important first (each step has its own time limit, so a slow step
# cannot starve the later ones):
#   1. the CUDA variants of the tests (cuDNN batch norm in the fused BN-gate-ReLU
#      function, crop/flip, the CIFAR loader and normalisation on the device,
#      the stop vote's side stream and pinned copy); skipped without CUDA;
#   2. gate overhead per training step, dense vs hc / dep / dep --back_dep, fp32
#      and AMP + channels-last, with peak memory (bench/train_step.py);
#   3. seconds per CIFAR epoch of VGG16 and ResNet56, end to end with the data
#      held on the GPU (bench/epoch_time.py);
#   4. ImageNet loader images/s per worker count on this machine's cores
#      (bench/input_pipeline.py), next to ResNet50's training images/s from 2;
#   5. the step time of ResNet50 under per-weight masks (static, DSR, SET, DeepR)
#      against dense (bench/sparse_step.py).
# Multi-GPU NCCL needs two GPUs and is not part of it.
#
#     bash bench/cuda_checks.sh            # writes bench/cuda_out/*.txt
#     OUT=/some/dir PYTHON=python3 bash bench/cuda_checks.sh
#
# It needs what requirements.txt lists plus pytest; a machine that lacks one
# (the lent H200 image has no tensorboardX, for instance) can be given its
# wheel: pip download --no-deps tensorboardX, then pip install --target DIR
# and PYTHONPATH=DIR there.
set -u
out="$(realpath -m "${OUT:-$(dirname "$0")/cuda_out}")"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
"$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "no CUDA device: nothing to check"; exit 1; }
"$py" -c "import torchvision, tensorboardX, numpy, PIL, pytest" || { echo "a package is missing (see above)"; exit 1; }
mkdir -p "$out"

step() {  # step NAME SECONDS COMMAND...: run, keep the output, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>&1
  echo "   exit $? after ${SECONDS}s total"
  tail -n 12 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"

step tests 75 "$py" -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_bn_gate.py tests/test_data.py tests/test_sampling.py tests/test_lagged_any.py
for model in resnet56 vgg16; do
  step "step_${model}_fp32" 35 "$py" bench/train_step.py --model "$model" --device cuda -b 128 --steps 20 --reps 7
  step "step_${model}_amp_cl" 35 "$py" bench/train_step.py --model "$model" --device cuda -b 128 --steps 20 --reps 7 \
    --amp --channels-last
done
step step_resnet50_amp_cl 45 "$py" bench/train_step.py --model resnet50 --device cuda -b 256 --steps 5 --reps 5 \
  --amp --channels-last
for model in resnet56 vgg16; do
  step "epoch_${model}" 55 "$py" bench/epoch_time.py --model "$model" --net dep --amp --channels-last --epochs 3
done
# At least 4 batches of 32 per worker, so that start-up does not dominate the 16-worker rate.
step input_pipeline 50 "$py" bench/input_pipeline.py --workers 4,8,16 --images 2048 --reps 2
step sparse_step_resnet50 60 "$py" bench/sparse_step.py --model resnet50 --device cuda -b 128 --density 0.2 \
  --steps 5 --reps 3 --warmup 2 --period 5 --n-prune-params 400000
