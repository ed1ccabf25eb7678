#!/usr/bin/env bash
# The GPU checks and measurements, as one script for one short lease of a CUDA machine
# (an H100/H200 with PyTorch installed, no network). Run from the repository root:
#
#   DATA_ROOT=/path/with/fashion-mnist OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#   PARTS="ratio28 ratio224 cli" bash benchmarks/gpu_session.sh     # only some parts
#
# Parts: machine ratio28 ratio224 ratio224host views profile syncs tests cli trainspeed torchrun demo
# comparetiny compare (default: all). compare, the last, takes about 8 minutes on its own:
#
#   PARTS=compare bash benchmarks/gpu_session.sh      # mocolab, lightly, official, solo-learn DALI
#
# Each part has its own time limit, so one hang loses one part, not the session. Everything is
# printed and also written under $OUT (gpu-session.log; compare.json for the comparison).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-session}
DATA_ROOT=${DATA_ROOT:-}
PARTS=${PARTS:-machine ratio28 ratio224 ratio224host views profile syncs tests cli trainspeed torchrun demo comparetiny compare}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-session.log") 2>&1
want() { [[ " $PARTS " == *" $1 "* ]] && { echo; echo "=== $1: ${*:2} ($(date +%T))"; }; }
quiet() { grep -v "^Run directory\|^mocolab:"; }
DR=()
[ -n "$DATA_ROOT" ] && DR=(--data-root "$DATA_ROOT")

if want machine "GPU, versions"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision, triton; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  df -h /dev/shm | tail -1  # DataLoader workers hand their batches over here (compare: 2 × 16 workers)
fi
if want ratio28 "feed ratio, Fashion-MNIST 28 px, ResNet-18 width 64, batch 256: eager / compiled / CUDA-graph views"; then
  timeout 200 $PY benchmarks/feed_ratio.py --data fashion-mnist "${DR[@]}" --width 64 --batch-size 256 \
      --compile-views off on graphs 2>&1 | quiet
fi
if want ratio224 "feed ratio, random 256 px -> 224 px views, ResNet-50, batch 128, images on the GPU"; then
  timeout 200 $PY benchmarks/feed_ratio.py --random 256 --crop 224 --arch resnet50 --batch-size 128 --steps 50 \
      --compile-views off on 2>&1 | quiet
fi
if want ratio224host "feed ratio, the same with the images in host memory (pinned prefetch)"; then
  timeout 150 $PY benchmarks/feed_ratio.py --random 256 --crop 224 --arch resnet50 --batch-size 128 --steps 50 \
      --compile-views on --host-resident 2>&1 | quiet
fi
if want views "view pairs/s on CUDA"; then
  # (the CPU columns, per-image with 16 workers, did not finish in 150 s on the H200 machine)
  timeout 120 $PY benchmarks/augment_speed.py --cuda-only --sizes 28 224 --compile-views off on
fi
if want profile "GPU time per kernel of the views at 224 px, eager and compiled"; then
  timeout 120 $PY benchmarks/augment_speed.py --cuda-only --sizes 224 --compile-views off on --profile 224
fi
if want syncs "host-GPU synchronisations of a step, 28 px (sync debug mode)"; then
  timeout 120 $PY benchmarks/feed_ratio.py --data fashion-mnist "${DR[@]}" --width 64 --batch-size 256 \
      --compile-views on --sync-report 2>&1 | quiet
fi
if want tests "CUDA tests"; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_augment.py -k "cuda or host_parameters"
fi
if want cli "CLI on CUDA (default: compiled views): pretrain, Ctrl-C after 40 s, resume to the end, kNN"; then
  timeout -s INT 40 $PY -m mocolab pretrain --preset mocov2-fashion-mnist "${DR[@]}" --device cuda \
      --width 64 --batch-size 256 --max-steps 600 --log-every 50 --no-progress \
      --out-dir "$WORK" --run-name smoke; echo "exit $? (130 or 124: stopped by the signal)"
  timeout 100 $PY -m mocolab pretrain --resume "$WORK/smoke" --no-progress 2>&1 | tail -4
  tail -2 "$WORK/smoke/metrics.jsonl"
fi
if want trainspeed "train speed: per-image torchvision vs batched, Fashion-MNIST, ResNet-18 width 64, batch 256"; then
  timeout 150 $PY benchmarks/train_speed.py --device cuda --width 64 --batch-size 256 "${DR[@]}" --steps 60 --warmup 20
fi
if want torchrun "torchrun, 1 process, NCCL"; then
  timeout 90 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m mocolab pretrain \
      --preset mocov2-fashion-mnist "${DR[@]}" --device cuda --max-steps 40 --no-progress \
      --no-final-eval --out-dir "$WORK" --run-name ddp1 2>&1 | tail -3
fi
if want demo "demo preset on CUDA, all epochs"; then
  timeout 200 $PY -m mocolab pretrain --preset mocov2-fashion-mnist "${DR[@]}" --device cuda --no-progress \
      --out-dir "$WORK" --run-name demo 2>&1 | tail -4
fi
if want comparetiny "the comparison at a toy size: every contender runs on this GPU"; then
  timeout 150 $PY benchmarks/compare.py --tiny "${DR[@]}" 2>&1 | tail -9
fi
if want compare "mocolab, lightly 1.6, official main_moco.py data path, solo-learn DALI: ResNet-50, 224-px views, batch 256, queue 65536, bf16, 5000 JPEGs"; then
  timeout 560 $PY benchmarks/compare.py "${DR[@]}" --budget-s 480 --work "$WORK/compare" \
      --json "$OUT/compare.json"
fi
echo; echo "=== done ($(date +%T))"
