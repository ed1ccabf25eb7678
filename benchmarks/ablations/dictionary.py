"""Ablation 2: the dictionary mechanism against its size K (MoCo §4.1, Figure 3).

Three ways to get K negative keys for each query, at equal training (the same images seen,
network, head, τ, augmentation and LR rule):

- end-to-end: the keys are the batch's, encoded by the same encoder with gradients (SimCLR's
  NT-Xent; K = 2N − 2 negatives for a batch of N); K is bounded by the batch, hence memory.
- memory bank (InstDisc, ``--loss softmax``): one stored feature per image, K = ``--nce-k``
  entries drawn per batch; the entries were written when their image was last seen, by an
  older encoder (stale, inconsistent keys).
- MoCo queue: the last K keys of a slowly moving momentum encoder (``--queue-size K``).

The paper (ImageNet, ResNet-50, linear top-1): all three gain from a larger K; end-to-end
tracks MoCo up to the K its memory allows (1024); the memory bank (the paper's improved
version) stays below MoCo, by about 2.6 points; MoCo reaches 60.6 % at K = 65536.

Usage:
    python benchmarks/ablations/dictionary.py --budget small     # Fashion-MNIST, CPU
    python benchmarks/ablations/dictionary.py --budget full --data /path/to/imagenet
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _study import (
    SMALL_BASE,
    TINY_BASE,
    TINY_STEPS,
    Plan,
    Setting,
    by_setting,
    loss_curve,
    main,
    mean_sd,
    pyplot,
    read_rows,
    save_figure,
)

from mocolab.config import PretrainConfig

STUDY = "dictionary"
MECHANISMS = ("end-to-end", "memory bank", "MoCo queue")
EXTRA_COLUMNS = (("K", "K", 0), ("dictionary consistency", "consistency", 3),
                 ("seconds", "seconds", 0))
#: The options shared by the three mechanisms so that only the dictionary differs (each
#: method otherwise brings its own head, augmentation and LR schedule): MoCo v2's for the
#: CPU budgets, MoCo v1's (the paper's Figure 3) for the full one.
SHARED_V2: dict[str, Any] = dict(head_layers=2, augment="mocov2", lr_schedule="cosine")
SHARED_V1: dict[str, Any] = dict(head_layers=1, augment="mocov1", lr_schedule="step")


def settings(batches: tuple[int, ...], sizes: tuple[int, ...], shared: dict[str, Any]) -> list[Setting]:
    """End-to-end at each batch in ``batches`` (K = 2N − 2), memory bank and MoCo queue at each
    K in ``sizes``; every one with the ``shared`` options."""
    out = [Setting(f"end-to-end K={2 * n - 2}", {"mechanism": "end-to-end", "K": 2 * n - 2},
                   {**shared, "method": "simclr", "batch_size": n}) for n in batches]
    out += [Setting(f"memory bank K={k}", {"mechanism": "memory bank", "K": k},
                    {**shared, "method": "instdisc", "loss": "softmax", "nce_k": k, "bank_momentum": 0.5})
            for k in sizes]
    out += [Setting(f"MoCo queue K={k}", {"mechanism": "MoCo queue", "K": k},
                    {**shared, "method": "mocov2", "queue_size": k}) for k in sizes]
    return out


NOTES = ["End-to-end (SimCLR's in-batch keys, K = 2N − 2 for batch N), memory bank (InstDisc with "
         "the softmax loss, K entries drawn per batch, λ = 0.5) and MoCo's queue (K keys), with the "
         "same network, head, τ, augmentation, LR schedule and base LR (scaled linearly with the "
         "batch), "
         "each seeing the same number of images. Dictionary consistency: the cosine between stored "
         "keys and the same images encoded now (queue: by the key encoder, logged by training; "
         "bank: by the encoder, on 1,024 training images, here); 1 by construction end-to-end.",
         "Paper: He et al. 2020, Figure 3 (ImageNet, ResNet-50, linear top-1 %): all three gain from "
         "a larger K; end-to-end close to MoCo up to K = 1024 (its memory limit); the memory bank "
         "below MoCo (by about 2.6 points); MoCo 60.6 at K = 65536."]


def make_plan(budget: str) -> Plan:
    """The dictionary study at ``budget``."""
    if budget == "tiny":
        return Plan(STUDY, budget, None, dict(TINY_BASE, method="mocov2"), settings((16, 32), (32, 64), SHARED_V2),
                    (0,), TINY_STEPS, NOTES)
    if budget == "small":
        # Two epochs: in its first epoch a memory bank's positives are its random initial entries.
        return Plan(STUDY, budget, "mocov2-fashion-mnist", dict(SMALL_BASE, epochs=2),
                    settings((128, 512), (256, 4096, 16384), SHARED_V2), (0,), None, NOTES)
    return Plan(STUDY, budget, "mocov1-imagenet", dict(data="<imagenet>"),
                settings((128, 256, 512), (256, 1024, 4096, 16384, 65536), SHARED_V1), (0,), None, NOTES)


@torch.no_grad()
def bank_consistency(run_dir: Path, cfg: PretrainConfig, max_images: int = 1024) -> dict[str, Any]:
    """For a memory-bank run, the mean cosine between the bank's entries and the same
    images' features from the final encoder (deterministic view, eval mode), on up to
    ``max_images`` training images; for a queue, the logged ``diag_queue_consistency``; 1 for
    end-to-end (its keys are computed by the current encoder)."""
    if cfg.method == "simclr":
        return {"consistency": 1.0}
    if cfg.method != "instdisc":
        rows = [r for r in read_rows(run_dir) if "diag_queue_consistency" in r]
        return {"consistency": rows[-1]["diag_queue_consistency"] if rows else None}
    from mocolab.augment import eval_view
    from mocolab.checkpoint import load_checkpoint
    from mocolab.data import load_dataset
    from mocolab.methods import build_method

    images = load_dataset(cfg.data, "train", root=cfg.data_root, image_size=cfg.image_size).images
    ckpt = load_checkpoint(run_dir)
    info = ckpt["info"]
    model = build_method(cfg, info["in_channels"], info["stem"], num_images=images.shape[0])
    model.load_state_dict(ckpt["model"])
    model.eval()
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:max_images]
    x = eval_view(images[pick], info["crop_size"], info["mean"], info["std"])
    f = torch.cat([F.normalize(model.query_encoder(x[s:s + 256]), dim=1) for s in range(0, len(x), 256)])
    stored = model.memory_bank.keys(pick)
    return {"consistency": F.cosine_similarity(stored, f, dim=1).mean().item()}


def plot(plan: Plan, records: list[dict[str, Any]], path: Path) -> None:
    """kNN top-1 against K (log scale) per mechanism, as the paper's Figure 3; consistency
    against K; the loss curves of the MoCo queue."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "knn_top1", "kNN top-1 %"), (axes[1], "consistency", "dictionary consistency")):
        for mech in MECHANISMS:
            groups = [(rs[0]["K"], mean_sd([r.get(key) for r in rs])[0])
                      for rs in by_setting(records).values() if rs[0]["mechanism"] == mech]
            groups = [(k, v) for k, v in groups if v is not None]
            if groups:
                ax.plot([k for k, _ in groups], [v for _, v in groups], marker="o", label=mech)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (negatives per query)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for label, rs in by_setting(records).items():
        curve = loss_curve(read_rows(rs[0]["run"]))
        if curve:
            axes[2].plot([e for e, _ in curve], [v for _, v in curve], linewidth=1, label=label)
    axes[2].set_title("training loss (first seed)", fontsize=9)
    axes[2].set_xlabel("epoch", fontsize=8)
    axes[2].legend(fontsize=6, ncol=2)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Dictionary mechanism against K, budget {plan.budget}", fontsize=10)
    save_figure(fig, path)


def run(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    return main(STUDY, __doc__.splitlines()[0], make_plan, plot, EXTRA_COLUMNS, extra=bank_consistency,
                argv=argv)


if __name__ == "__main__":
    sys.exit(run())
