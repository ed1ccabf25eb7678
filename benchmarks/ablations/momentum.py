"""Ablation 1: the key encoder's momentum m (MoCo §4.1, "Ablation: momentum").

MoCo with m ∈ {0, 0.9, 0.99, 0.999, 0.9999}, everything else fixed. The paper (ImageNet,
ResNet-50, K = 4096, linear protocol): m = 0 fails to train (the loss oscillates); 55.2 / 57.8
/ 59.0 / 58.9 % for the others. The queue-consistency diagnostic (cosine between the keys in
the queue and the same images re-encoded by the current key encoder) shows why: a fast-moving
key encoder leaves the queue's older keys inconsistent with the new ones.

Usage:
    python benchmarks/ablations/momentum.py --budget small     # Fashion-MNIST, CPU
    python benchmarks/ablations/momentum.py --budget full --data /path/to/imagenet
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _study import (
    SMALL_BASE,
    TINY_BASE,
    TINY_STEPS,
    Plan,
    Setting,
    main,
    plot_by_setting,
    plot_loss_curves,
    pyplot,
    save_figure,
)

STUDY = "momentum"
MOMENTA = (0.0, 0.9, 0.99, 0.999, 0.9999)
PAPER = {0.0: "fail", 0.9: "55.2", 0.99: "57.8", 0.999: "59.0", 0.9999: "58.9"}
EXTRA_COLUMNS = (("queue consistency", "diag_queue_consistency", 3),
                 ("oldest-quarter consistency", "diag_queue_consistency_oldest", 3),
                 ("f_k·f_q agreement", "diag_key_agreement", 3),
                 ("loss jitter", "loss_jitter", 3))


def make_plan(budget: str) -> Plan:
    """The momentum study at ``budget``: one setting per m."""
    settings = [Setting(f"m={m:g}", {"momentum": m}, {"key_momentum": m, "momentum_schedule": "constant"})
                for m in MOMENTA]
    notes = ["MoCo with the key encoder's momentum m varied, all else fixed. Paper: He et al. 2020, "
             "§4.1 \"Ablation: momentum\" (ImageNet, ResNet-50, K = 4096, linear top-1 %; m = 0 does not train)."]
    paper = {f"m={m:g}": v for m, v in PAPER.items()}
    if budget == "tiny":
        return Plan(STUDY, budget, None, dict(TINY_BASE, method="mocov2"), settings, (0,), TINY_STEPS,
                    notes, paper)
    if budget == "small":
        return Plan(STUDY, budget, "mocov2-fashion-mnist", dict(SMALL_BASE), settings, (0, 1),
                    None, notes, paper)
    # The paper's ablation: MoCo v1 on ImageNet with K = 4096.
    return Plan(STUDY, budget, "mocov1-imagenet", dict(data="<imagenet>", queue_size=4096), settings,
                (0,), None, notes, paper)


def plot(plan: Plan, records: list[dict[str, Any]], path: Path) -> None:
    """kNN top-1 per m, the loss curves, and the queue's consistency per m."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    plot_by_setting(axes[0], records, "knn_top1", "kNN top-1 % (mean ± sd over seeds)")
    plot_loss_curves(axes[1], records)
    plot_by_setting(axes[2], records, "diag_queue_consistency", "queue consistency (cosine)")
    plot_by_setting(axes[2], records, "diag_queue_consistency_oldest", "queue consistency (cosine)")
    axes[2].legend(["all keys", "oldest quarter"], fontsize=7)
    fig.suptitle(f"MoCo momentum m, budget {plan.budget}", fontsize=10)
    save_figure(fig, path)


def run(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    return main(STUDY, __doc__.splitlines()[0], make_plan, plot, EXTRA_COLUMNS, argv=argv)


if __name__ == "__main__":
    sys.exit(run())
