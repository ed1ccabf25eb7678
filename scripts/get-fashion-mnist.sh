#!/usr/bin/env bash
# Make Fashion-MNIST available offline: Debian's package dataset-fashion-mnist where apt is
# available. Elsewhere mocolab downloads it through torchvision when online, or says what to do.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: found in $dir"; exit 0
fi
for d in "${MOCOLAB_DATA:-$HOME/.cache/mocolab/data}/fashion-mnist"; do
  if ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then echo "Fashion-MNIST: found in $d"; exit 0; fi
done
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "Fashion-MNIST: installing Debian's package dataset-fashion-mnist"
    if $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
       { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; then
      echo "Fashion-MNIST: installed in $dir"; exit 0
    fi
  fi
fi
echo "Fashion-MNIST: not installed by apt; mocolab will try torchvision's download (needs internet)."
exit 0
