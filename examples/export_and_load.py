"""Export a run and load it where mocolab is not installed: torchvision, timm and ONNX Runtime
give the same features as mocolab's encoder.

    python examples/export_and_load.py --run runs/mine   # a ResNet of width 64 with the ImageNet stem
    python examples/export_and_load.py --tiny            # trains such a ResNet-18 for one step first

torchvision and timm build ResNets of width 64 only (the `*-imagenet` presets, or `--width
64`). Runs with the small-image stems (`cifar`, `compact`) or gray input load too, after the two
lines that `mocolab export` prints to change the library model's stem; this script takes the
plain case. The ONNX graph holds the normalisation; the state dicts need it done by you.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import mocolab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run directory, checkpoint or .safetensors export")
    p.add_argument("--out", default="exported", help="folder for the exported files")
    p.add_argument("--tiny", action="store_true", help="train a small width-64 run first")
    args = p.parse_args()

    out = Path(args.out)
    if args.tiny or os.environ.get("MOCOLAB_EXAMPLES_TINY") == "1":
        from _tiny import TINY_RUN  # beside this file: seconds instead of minutes

        work = out  # the run and the exported files
        options = {**TINY_RUN, "width": 64, "stem": "imagenet", "max_steps": 1}
        cfg = mocolab.build_config(**options, out_dir=str(work), run_name="wide")
        args.run = mocolab.pretrain(cfg, final_eval=False)["run_dir"]
    if args.run is None:
        p.error("--run RUN_DIR is needed (or --tiny)")

    encoder = mocolab.load_encoder(args.run)
    info = encoder.info
    arch, side = info["config"]["arch"], info["crop_size"]
    if info["stem"] != "imagenet" or info["in_channels"] != 3 or info["config"]["width"] != 64:
        sys.exit("this example loads RGB ResNets of width 64 with the ImageNet stem; "
                 "for other runs `mocolab export` prints the lines that build the library model")  # fmt: skip
    x = torch.rand(4, 3, side, side)  # RGB in 0–1, already at the run's crop size
    with torch.no_grad():
        want = encoder(x)
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    out.mkdir(parents=True, exist_ok=True)

    # torchvision: a state dict with torchvision's names, without the classifier.
    import torchvision

    weights = mocolab.export_backbone(args.run, "torchvision", out / f"{arch}.pth").path
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        got = model.eval()((x - mean) / std)
    print(f"torchvision {arch}: max difference {(got - want).abs().max():.2e}")

    # timm: the same file, the same names.
    import timm

    model = timm.create_model(arch, num_classes=0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        got = model.eval()((x - mean) / std)
    print(f"timm {arch}: max difference {(got - want).abs().max():.2e}")

    # ONNX Runtime: the graph takes RGB in 0–1 and normalises inside.
    import onnxruntime

    graph = mocolab.export_backbone(args.run, "onnx", out / f"{arch}.onnx").path
    runtime = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(runtime.run(None, {runtime.get_inputs()[0].name: x.numpy()})[0])
    print(f"ONNX Runtime: max difference {(got - want).abs().max():.2e}")


if __name__ == "__main__":
    main()
