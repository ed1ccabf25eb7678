"""Ablation 4: temperature τ, and the steps from MoCo v1 to v2 (MLP head, augmentation,
cosine schedule).

Two parts in one study:

- a sweep of τ with MoCo v2's settings otherwise (the v2 note uses τ = 0.2 with the MLP head,
  the best of the values it tried on ImageNet);
- the v1 → v2 ladder of Chen et al. 2020 (Table 1, ImageNet, ResNet-50, 200 epochs, linear
  top-1 %): MoCo v1 60.6; + MLP head (τ 0.2) 66.2; + aug+ (blur) 63.4; MLP + aug+ 67.3;
  + cosine LR 67.5. The ladder uses the papers' crops (20–100 % of the image).

Usage:
    python benchmarks/ablations/temperature.py --budget small     # Fashion-MNIST, CPU
    python benchmarks/ablations/temperature.py --budget full --data /path/to/imagenet
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

STUDY = "temperature"
EXTRA_COLUMNS = (("alignment", "diag_alignment", 3), ("uniformity", "diag_uniformity", 3),
                 ("effective rank", "diag_effective_rank", 1))
#: The v1 → v2 ladder: (label, head layers, augmentation, LR schedule, τ, the v2 note's top-1).
LADDER = (("v1", 1, "mocov1", "step", 0.07, "60.6"),
          ("v1 + MLP", 2, "mocov1", "step", 0.2, "66.2"),
          ("v1 + aug+", 1, "mocov2", "step", 0.07, "63.4"),
          ("v1 + MLP + aug+", 2, "mocov2", "step", 0.2, "67.3"),
          ("v2 (+ cosine)", 2, "mocov2", "cosine", 0.2, "67.5"))
NOTES = ["τ sweep: MoCo v2 (2-layer head, aug+, cosine LR) with τ varied. v1 → v2 ladder: the "
         "steps of Chen et al. 2020, Table 1, each with the τ the note uses (0.07 with the linear "
         "head, 0.2 with the MLP head) and crops of 20–100 %.",
         "Paper (ImageNet, ResNet-50, 200 epochs, linear top-1 %): MoCo v1 60.6 → + MLP 66.2, "
         "+ aug+ 63.4, + both 67.3, + cosine 67.5 (MoCo v2); with the MLP head the note uses "
         "τ = 0.2, the best of the values it tried."]


def settings(temperatures: tuple[float, ...]) -> list[Setting]:
    """The τ sweep (v2 settings), then the ladder."""
    out = [Setting(f"τ={t:g}", {"part": "temperature", "temperature": t, "head_layers": 2,
                                "augment": "mocov2", "lr_schedule": "cosine"},
                   {"method": "mocov2", "temperature": t}) for t in temperatures]
    out += [Setting(label, {"part": "v1→v2", "temperature": t, "head_layers": h, "augment": aug,
                            "lr_schedule": sched},
                    {"method": "mocov2", "head_layers": h, "augment": aug, "lr_schedule": sched,
                     "temperature": t, "crop_scale": (0.2, 1.0)})
            for label, h, aug, sched, t, _ in LADDER]
    return out


def make_plan(budget: str) -> Plan:
    """The temperature / v1 → v2 study at ``budget``."""
    paper = {label: top1 for label, *_, top1 in LADDER}
    if budget == "tiny":
        return Plan(STUDY, budget, None, dict(TINY_BASE, method="mocov2"), settings((0.1, 0.2)), (0,),
                    TINY_STEPS, NOTES, paper)
    if budget == "small":
        return Plan(STUDY, budget, "mocov2-fashion-mnist", dict(SMALL_BASE),
                    settings((0.05, 0.1, 0.2, 0.5)), (0, 1), None, NOTES, paper)
    return Plan(STUDY, budget, "mocov2-imagenet", dict(data="<imagenet>"),
                settings((0.07, 0.1, 0.2, 0.3, 0.5)), (0,), None, NOTES, paper)


def plot(plan: Plan, records: list[dict[str, Any]], path: Path) -> None:
    """kNN top-1 against τ, along the v1 → v2 ladder, and the ladder's loss curves."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sweep = [s.label for s in plan.settings if s.values["part"] == "temperature"]
    ladder = [s.label for s in plan.settings if s.values["part"] == "v1→v2"]
    plot_by_setting(axes[0], records, "knn_top1", "kNN top-1 % against τ (MoCo v2)", sweep)
    plot_by_setting(axes[1], records, "knn_top1", "kNN top-1 %, MoCo v1 → v2", ladder)
    plot_loss_curves(axes[2], records, ladder, "training loss, v1 → v2 (first seed)")
    fig.suptitle(f"Temperature and MoCo v1 → v2, budget {plan.budget}", fontsize=10)
    save_figure(fig, path)


def run(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    return main(STUDY, __doc__.splitlines()[0], make_plan, plot, EXTRA_COLUMNS, argv=argv)


if __name__ == "__main__":
    sys.exit(run())
