"""Every method for the same small budget: images/s, peak memory and kNN top-1, beside the kNN of
the same encoder at its random initialisation.

Each method trains from its own Fashion-MNIST preset (``mocolab/configs/<method>-<data>.yaml``;
``<method>-folder.yaml`` with ``--data FOLDER``; the library's defaults for the method where
there is none) for the same number of epochs, in
a fresh process, then the final weighted kNN (k = 200, τ = 0.1) on the test split. Throughput
is the harmonic mean of the logged images/s after the first log row; peak memory is the
process's maximum resident set (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA). The
"at init" column is the same kNN of the backbone the run starts from (its preset, its seed, no
step taken), evaluated in another fresh process: a method learns in the budget when its kNN
beats that one (the backbones differ between methods: CPC's patch grid, CMC's two halves).

The budget is tiny by the papers' standards and the non-MoCo presets are the papers' settings
scaled down, not tuned here: read the kNN column as "does it learn in one epoch", not as a
ranking of the methods.

``--protocols linear finetune`` adds the protocols the masked-image papers judge by, each on the
trained backbone and on the same backbone at init: ``linear`` is ``mocolab eval linear``'s
default recipe (a linear classifier on standardised frozen features, 100 epochs) and
``finetune`` is ``mocolab eval finetune`` (every weight fine-tuned on 1 % of the labels,
class-balanced, 30 epochs) with ``--recipe mae`` for a ViT (MAE's AdamW recipe with layer-wise
LR decay) and the default ``--recipe simclr`` (Nesterov SGD) for a ResNet.

Usage:
    python benchmarks/methods.py                          # 1 epoch each, CPU, writes docs/methods/
    python benchmarks/methods.py --methods mocov2 byol --epochs 2 --device cuda
    python benchmarks/methods.py --methods cmc colorization --data /tmp/photos --out docs/methods/colour
    python benchmarks/methods.py --methods mae ijepa msn --protocols linear finetune
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from mocolab.config import PRESET_DIR
from mocolab.methods import method_names

CHILD = """
import json, resource, sys, torch
from mocolab.cli import main
code = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("@@" + json.dumps({"code": code, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                         "cuda_bytes": peak}))
"""


INIT_CHILD = """
import json, sys, tempfile
from mocolab.config import build_config
from mocolab.train import Run, evaluation_splits, knn_eval
preset, overrides = sys.argv[1] or None, json.loads(sys.argv[2])
with tempfile.TemporaryDirectory() as out:
    cfg = build_config(preset, **overrides, out_dir=out, run_name="init")
    run = Run.build(cfg, None, None)
    acc = knn_eval(run.model.backbone, *evaluation_splits(cfg), size=run.crop,
                   mean=run.info["mean"], std=run.info["std"], device=run.device,
                   k=cfg.knn_k, t=cfg.knn_t)
print("@@" + json.dumps(acc.to_dict()))
"""


PROTOCOL_CHILD = """
import json, sys, tempfile, torch
from mocolab.checkpoint import load_backbone
from mocolab.config import build_config
from mocolab.data import evaluation_splits
from mocolab.evaluate.features import extract_features
from mocolab.evaluate.finetune import FINETUNE_RECIPES, finetune
from mocolab.evaluate.linear import LINEAR_RECIPES, linear_probe
from mocolab.train import Run
run_dir, preset, overrides = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
protocols, device = sys.argv[4].split(","), overrides.get("device", "cpu")
with tempfile.TemporaryDirectory() as out:
    if run_dir:  # the trained backbone, as mocolab eval loads it
        backbone, info = load_backbone(run_dir)
        cfg = info["config"]
    else:  # the backbone the run starts from: its preset and seed, no step taken
        cfg = build_config(preset, **overrides, out_dir=out, run_name="init")
        run = Run.build(cfg, None, None)
        backbone, info = run.model.backbone, run.info
    train, test = evaluation_splits(cfg)
    view = dict(size=info["crop_size"], mean=info["mean"], std=info["std"], device=device)
    classes = len(train.classes or []) or int(train.labels.max()) + 1
    result = {}
    if "linear" in protocols:  # mocolab eval linear (default recipe)
        bank = extract_features(backbone, train.images, batch_size=512, **view)
        query = extract_features(backbone, test.images, batch_size=512, **view)
        torch.manual_seed(0)
        result["linear_top1"] = linear_probe(bank, train.labels, query, test.labels, classes,
                                             **LINEAR_RECIPES["default"])["top1"]
    if "finetune" in protocols:  # mocolab eval finetune (1 % of the labels, 30 epochs)
        recipe = FINETUNE_RECIPES["mae" if hasattr(backbone, "blocks") else "simclr"]  # ViT: MAE's
        result["finetune_top1"] = finetune(backbone, train.images, train.labels, test.images,
                                           test.labels, classes, **view, **recipe)["top1"]
print("@@" + json.dumps(result))
"""


def preset_for(method: str, data: str) -> tuple[str | None, dict]:
    """``method``'s preset for ``data`` and the overrides that go with it: ``NAME-DATA`` for a
    built-in dataset, ``NAME-folder`` with ``data=FOLDER`` for a folder of images, else none
    (the method's defaults on ``data``)."""
    folder = Path(data).is_dir()
    preset = f"{method}-{'folder' if folder else data}"
    if (PRESET_DIR / f"{preset}.yaml").exists():
        return preset, ({"data": data} if folder else {})
    return None, {"method": method, "data": data}


def knn_at_init(method: str, data: str, device: str) -> float:
    """kNN top-1 of the backbone ``method``'s run starts from (its preset and seed, no step taken),
    in a fresh process; nan when it cannot be built (e.g. a colour method on gray data)."""
    preset, overrides = preset_for(method, data)
    overrides.update(device=device, progress=False)
    proc = subprocess.run([sys.executable, "-c", INIT_CHILD, preset or "",
                           json.dumps(overrides)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
    return json.loads(line[2:])["top1"] if line else float("nan")


def protocols_of(method: str, data: str, device: str, protocols: list[str],
                 run_dir: Path | None = None) -> dict:
    """``linear_top1`` / ``finetune_top1`` of the backbone of ``run_dir``, or of the backbone
    ``method``'s run starts from when ``run_dir`` is ``None``, in a fresh process; nan on failure."""
    preset, overrides = preset_for(method, data)
    overrides.update(device=device, progress=False)
    proc = subprocess.run([sys.executable, "-c", PROTOCOL_CHILD, str(run_dir or ""), preset or "",
                           json.dumps(overrides), ",".join(protocols)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
    return json.loads(line[2:]) if line else {f"{p}_top1": float("nan") for p in protocols}


def run_method(method: str, data: str, epochs: int, device: str, out: Path, extra: list[str]) -> dict:
    """Train ``method`` in a fresh process; its row of the table."""
    preset, overrides = preset_for(method, data)
    flags = [x for k, v in overrides.items() for x in (f"--{k}", v)]
    flags = ["--preset", preset, *flags] if preset else flags
    argv = ["pretrain", *flags, "--epochs", str(epochs), "--device", device, "--no-progress",
            "--log-every", "20", "--knn-every", "0", "--out-dir", str(out), "--run-name", method, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    stats = next((json.loads(line[2:]) for line in proc.stdout.splitlines() if line.startswith("@@")), None)
    if proc.returncode or stats is None or stats["code"]:
        reason = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["failed"])[-1]
        return {"method": method, "preset": flags[1], "error": reason}
    rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"method": method, "preset": flags[1],
            "images_per_s": len(rates) / sum(1 / r for r in rates) if rates else float("nan"),
            "peak_memory_mib": (stats["cuda_bytes"] / 2**20 if device.startswith("cuda")
                                else stats["rss_kib"] / 1024),
            "knn_top1": knn[-1] if knn else float("nan"),
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=sorted(method_names()))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/methods", help="folder for methods.md and methods.json")
    p.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--no-init", dest="init", action="store_false",
                   help="skip the kNN of each encoder at its random initialisation")
    p.add_argument("--init-only", action="store_true",
                   help="only the kNN of each encoder at its initialisation (no training)")
    p.add_argument("--protocols", nargs="*", default=[], choices=("linear", "finetune"),
                   help="also the linear probe and/or the 1 %% fine-tuning, trained and at init")
    p.add_argument("extra", nargs="*", help="more `mocolab pretrain` flags for every method (after --)")
    args = p.parse_args()

    if args.init_only:
        for method in args.methods:
            print(json.dumps({"method": method, "knn_at_init": knn_at_init(method, args.data, args.device)}),
                  flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        for method in args.methods:
            row = run_method(method, args.data, args.epochs, args.device, runs, args.extra)
            if "error" not in row and args.init:
                row["knn_at_init"] = knn_at_init(method, args.data, args.device)
            if "error" not in row and args.protocols:
                row.update(protocols_of(method, args.data, args.device, args.protocols, runs / method))
                if args.init:
                    at_init = protocols_of(method, args.data, args.device, args.protocols)
                    row.update({f"{k}_at_init": v for k, v in at_init.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.machine()}, {os.cpu_count()} cores, CPU")
    memory = "peak GPU memory (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB)"
    names = {"linear": "linear", "finetune": "fine-tune 1 %"}
    extra_head = "".join(f" {names[p]} top-1 % | at init % |" for p in args.protocols)
    lines = [f"{date.today()} · {machine} · torch {torch.__version__} · {args.data}, "
             f"{args.epochs} epoch{'s' * (args.epochs > 1)} each, each method's preset\n",
             f"| method | preset | images/s | {memory} | loss first → last | kNN top-1 % | at init % |"
             f"{extra_head} minutes |",
             "|---|---|---|---|---|---|---|" + "---|---|" * len(args.protocols) + "---|"]
    nan = float("nan")
    for r in rows:
        if "error" in r:
            dashes = " — |" * (5 + 2 * len(args.protocols))
            lines.append(f"| {r['method']} | {r['preset']} |{dashes} not run: {r['error']} |")
        else:
            extra_cells = "".join(f" {r.get(f'{p}_top1', nan):.2f} | {r.get(f'{p}_top1_at_init', nan):.2f} |"
                                  for p in args.protocols)
            lines.append(f"| {r['method']} | {r['preset']} | {r['images_per_s']:.0f} | {r['peak_memory_mib']:.0f} | "
                         f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['knn_top1']:.2f} | "
                         f"{r.get('knn_at_init', nan):.2f} |{extra_cells} "
                         f"{r['seconds'] / 60:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.md").write_text(table + "\n")
    (out / "methods.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
