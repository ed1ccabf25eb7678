#!/usr/bin/env bash
# The GPU checks and measurements, as one script for one short lease of a CUDA machine
# (an H100/H200 with PyTorch installed, no network). Run from the repository root:
#
#   DATA_ROOT=/path/with/fashion-mnist OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#
# Each part has its own time limit, so one hang loses one part, not the session. Everything
# is printed and also written under $OUT (gpu-session.log).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-session}
DATA_ROOT=${DATA_ROOT:-}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-session.log") 2>&1
part() { echo; echo "=== $* ($(date +%T))"; }
DR=()
[ -n "$DATA_ROOT" ] && DR=(--data-root "$DATA_ROOT")

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

part "augment speed (views/s), batched on CUDA"
# (the CPU columns, per-image with 16 workers, did not finish in 150 s on the H200 machine)
timeout 60 $PY benchmarks/augment_speed.py --cuda-only

part "feed ratio: Fashion-MNIST 28 px, ResNet-18 width 64, batch 256"
timeout 120 $PY benchmarks/feed_ratio.py --data fashion-mnist "${DR[@]}" --width 64 --batch-size 256 --sync-report 2>&1 | grep -v "^Run directory\|^mocolab:"
part "feed ratio: random 256 px -> 224 px views, ResNet-50, batch 128, on the GPU"
timeout 150 $PY benchmarks/feed_ratio.py --random 256 --crop 224 --arch resnet50 --batch-size 128 --steps 50 --sync-report 2>&1 | grep -v "^Run directory\|^mocolab:"
part "feed ratio: the same, images in host memory (pinned prefetch)"
timeout 150 $PY benchmarks/feed_ratio.py --random 256 --crop 224 --arch resnet50 --batch-size 128 --steps 50 --host-resident 2>&1 | grep -v "^Run directory\|^mocolab:"

part "train speed: per-image torchvision vs batched, Fashion-MNIST, ResNet-18 width 64, batch 256"
timeout 150 $PY benchmarks/train_speed.py --device cuda --width 64 --batch-size 256 "${DR[@]}" --steps 60 --warmup 20

part "CUDA tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_augment.py -k cuda

part "CLI on CUDA: pretrain, Ctrl-C after 30 s, resume to the end, kNN, linear"
timeout -s INT 30 $PY -m mocolab pretrain --preset mocov2-fashion-mnist "${DR[@]}" --device cuda \
    --width 64 --batch-size 256 --max-steps 1000 --log-every 50 --no-progress \
    --out-dir "$WORK" --run-name smoke; echo "exit $? (130 or 124: stopped by the signal)"
timeout 120 $PY -m mocolab pretrain --resume "$WORK/smoke" --no-progress 2>&1 | tail -4
tail -2 "$WORK/smoke/metrics.jsonl"
timeout 60 $PY -m mocolab eval knn "$WORK/smoke" --device cuda --no-progress
timeout 90 $PY -m mocolab eval linear "$WORK/smoke" --device cuda --epochs 20 --no-progress

part "torchrun, 1 process, NCCL"
timeout 90 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m mocolab pretrain \
    --preset mocov2-fashion-mnist "${DR[@]}" --device cuda --max-steps 40 --no-progress \
    --no-final-eval --out-dir "$WORK" --run-name ddp1 2>&1 | tail -3

part "demo preset on CUDA, full 8 epochs"
timeout 200 $PY -m mocolab pretrain --preset mocov2-fashion-mnist "${DR[@]}" --device cuda --no-progress \
    --out-dir "$WORK" --run-name demo 2>&1 | tail -4
part "done"
