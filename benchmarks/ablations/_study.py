"""What the four ablation studies share: run a list of configurations (one pretraining each,
through ``mocolab.train.pretrain``), collect what each run logged, and write the study's
CSV, PNG and markdown table.

A study is a :class:`Plan`: a preset and base options (from the budget), the settings to
compare (:class:`Setting`, each a label, the studied values and the options that make it)
and the seeds. :func:`main` gives every study the same command line::

    python benchmarks/ablations/<study>.py --budget tiny|small|full [--seeds N] [--steps N]
        [--threads N] [--out DIR] [--runs-dir DIR] [--data PATH] [--dry-run]

Runs are resumable at the run level: a run whose directory already holds ``results.json``
for the same configuration is read back, not trained again, so an interrupted study
continues where it stopped.

Budgets:
    tiny   the CI smoke test: synthetic data, width 8, a few steps; seconds.
    small  Fashion-MNIST with the demo's network (preset ``mocov2-fashion-mnist``) for one
           epoch a run; all four studies in about an hour on a 2-core CPU.
    full   the papers' settings (ImageNet with ``--data``, CIFAR-10 for shuffle-BN), for GPUs.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml

from mocolab.checkpoint import CheckpointError
from mocolab.config import (
    ConfigError,
    PretrainConfig,
    build_config,
    config_from_dict,
    field_names,
    load_preset,
)
from mocolab.data import DatasetError
from mocolab.methods.registry import get_method
from mocolab.train import METRICS_NAME, RESULTS_NAME, pretrain

BUDGETS = ("tiny", "small", "full")
REPO = Path(__file__).resolve().parents[2]

#: Options of every tiny run: the CI smoke test (synthetic 512 images, width 8, seconds).
TINY_BASE: dict[str, Any] = dict(data="synthetic", width=8, stem="compact", batch_size=32,
                                 bn_splits=4, queue_size=96, epochs=1, lr=0.06, knn_k=20,
                                 log_every=1)
#: Steps of a tiny run at the base batch of 32 (other batches: the same number of images).
TINY_STEPS = 4
#: Options added to the demo preset in the small budget: one epoch of Fashion-MNIST a run.
# The demo preset as it was when the studies were run (2026-11-25/26): its queue of 4096 keys,
# eager mode, channels-last; the preset has since moved to K 1024 and torch.compile.
SMALL_BASE: dict[str, Any] = dict(epochs=1, log_every=10, queue_size=4096, compile=False,
                                  channels_last=True)
#: Columns of the CSV after the study's own: what every run reports.
RESULT_COLUMNS = ("seed", "knn_top1", "knn_top5", "final_loss", "loss_jitter", "final_acc",
                  "diag_queue_consistency", "diag_queue_consistency_oldest", "diag_key_agreement",
                  "diag_alignment", "diag_uniformity", "diag_effective_rank", "steps", "images",
                  "seconds", "run")


class AblationError(ValueError):
    """A study cannot run as asked; the message names the option and the fix."""


@dataclass(frozen=True)
class Setting:
    """One configuration of a study.

    Attributes:
        label: short name for tables and legends (``"m=0.99"``).
        values: the studied variables as CSV columns (``{"momentum": 0.99}``).
        overrides: the ``build_config`` options that make this setting.
    """

    label: str
    values: dict[str, Any]
    overrides: dict[str, Any]


@dataclass
class Plan:
    """A study at one budget: base options, the settings, the seeds, the run length.

    Attributes:
        study: the study's name (output folder, run names).
        budget: ``tiny`` | ``small`` | ``full``.
        preset: the preset the options start from (``None``: the defaults).
        base: options shared by all settings (the budget's).
        settings: the configurations compared.
        seeds: the seeds each setting is run with.
        steps: when given, each run trains ``steps × base batch`` images (``max_steps`` scaled
            by its batch size, so settings with other batches see as many images).
        notes: lines for the markdown (what the study compares, the papers' numbers).
        paper: the paper's number per setting label (a column of the table).
    """

    study: str
    budget: str
    preset: str | None
    base: dict[str, Any]
    settings: list[Setting]
    seeds: Sequence[int] = (0,)
    steps: int | None = None
    notes: list[str] = field(default_factory=list)
    paper: dict[str, str] = field(default_factory=dict)

    def _base_for(self, setting: Setting) -> dict[str, Any]:
        """The shared options that ``setting``'s method has: a base sized for MoCo (its queue)
        also serves the settings that run SimCLR or InstDisc."""
        method = setting.overrides.get("method") or self.base.get("method") or \
            (load_preset(self.preset).get("method") if self.preset else None) or "mocov2"
        spec = get_method(str(method))
        keep = field_names() | set(spec.option_names()) | set(spec.renamed)
        return {k: v for k, v in self.base.items() if k in keep}

    def config(self, setting: Setting, seed: int, **execution: Any) -> PretrainConfig:
        """The resolved configuration of ``setting`` with ``seed`` (plus execution options:
        ``out_dir``, ``run_name``, ``threads``, ``device``...)."""
        base = self._base_for(setting)
        options = {**base, **setting.overrides, "seed": seed, "progress": False, **execution}
        if self.steps is not None:
            base_batch = build_config(self.preset, **self.base).batch_size
            batch = build_config(self.preset, **{**base, **setting.overrides}).batch_size
            options["max_steps"] = max(1, self.steps * base_batch // batch)
        return build_config(self.preset, **options)


def run_name(setting: Setting, seed: int) -> str:
    """A file-system-safe run directory name: ``<label>-s<seed>``."""
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in setting.label.replace("=", ""))
    return f"{safe}-s{seed}"


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a torn line is skipped)."""
    rows = []
    for line in (Path(run_dir) / METRICS_NAME).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def loss_curve(rows: Iterable[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(epoch, loss)`` of every logged training step."""
    return [(r["epoch"], r["loss"]) for r in rows if "loss" in r and "epoch" in r]


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """What a finished run reports: final kNN top-1/top-5 (``results.json``), the loss and
    contrastive accuracy over the last tenth of the logged steps, the loss's step-to-step
    jitter over the second half (the oscillation of a failing run: the standard deviation of
    consecutive differences), and the last value of each logged ``diag_*`` diagnostic."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS_NAME).read_text())
    rows = read_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    tail = train[-max(1, len(train) // 10):]
    half = [r["loss"] for r in train[len(train) // 2:]]
    diffs = [b - a for a, b in itertools.pairwise(half)]
    out: dict[str, Any] = {
        "knn_top1": results.get("knn", {}).get("top1"),
        "knn_top5": results.get("knn", {}).get("top5"),
        "final_loss": statistics.fmean(r["loss"] for r in tail) if tail else None,
        "loss_jitter": statistics.pstdev(diffs) if len(diffs) > 1 else None,
        "final_acc": statistics.fmean(r["acc"] for r in tail if "acc" in r) if any("acc" in r for r in tail) else None,
        "steps": results.get("step"),
    }
    for r in rows:
        out.update({k: v for k, v in r.items() if k.startswith("diag_")})
    return out


#: Options that say where or how fast a run goes, not what it computes: a finished run with
#: other values of these is still the same run.
EXECUTION_OPTIONS = frozenset({"out_dir", "run_name", "threads", "device", "progress", "data_root",
                               "num_workers", "workers"})


#: Options that a run chooses for its device when they are unset or auto (mocolab.device_defaults).
DEVICE_CHOSEN = frozenset({"compile", "channels_last", "stem", "augment_backend"})


def _same_config(run_dir: Path, cfg: PretrainConfig) -> bool:
    """Whether the run in ``run_dir`` was made with ``cfg`` (execution options aside)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return False
    try:  # through the config: a run of an older mocolab (every method's options) compares too
        old_cfg = config_from_dict(yaml.safe_load(path.read_text()))
        old = yaml.safe_load(yaml.safe_dump(old_cfg.to_dict(), sort_keys=False))
    except (ConfigError, TypeError, yaml.YAMLError):
        return False
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # left unset, these are chosen for the device when the run starts (config.yaml holds the
    # choice): an unset one matches what the run chose
    chosen = {k for k in DEVICE_CHOSEN if new.get(k) in (None, "auto")}
    drop = lambda d: {k: v for k, v in d.items()
                      if k not in EXECUTION_OPTIONS and k not in chosen}
    return drop(old) == drop(new)


def run_plan(plan: Plan, runs_dir: str | Path, *, threads: int | None = None, device: str = "auto",
             data: str | None = None, data_root: str | None = None,
             extra: Callable[[Path, PretrainConfig], dict[str, Any]] | None = None,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Pretrain every (setting, seed) of ``plan`` under ``runs_dir/<study>-<budget>/`` and
    return one record per run: the setting's values, the seed and :func:`summarize_run`'s
    measures (plus ``extra(run_dir, cfg)``, a study's own measures).

    A run already finished with the same configuration is read back, not trained again; a
    run left unfinished is started afresh.
    """
    root = Path(runs_dir) / f"{plan.study}-{plan.budget}"
    records = []
    total = len(plan.settings) * len(plan.seeds)
    for i, (setting, seed) in enumerate(((s, seed) for s in plan.settings for seed in plan.seeds), 1):
        name = run_name(setting, seed)
        execution = {"out_dir": str(root), "run_name": name, "threads": threads, "device": device,
                     "data": data, "data_root": data_root}
        cfg = plan.config(setting, seed, **{k: v for k, v in execution.items() if v is not None})
        run_dir = root / name
        reused = (run_dir / RESULTS_NAME).exists() and _same_config(run_dir, cfg)
        t0 = time.perf_counter()
        if reused:
            seconds = json.loads((run_dir / "ablation.json").read_text()).get("seconds") \
                if (run_dir / "ablation.json").exists() else None
            log(f"[{i}/{total}] {plan.study} {setting.label} seed {seed}: done before, read back")
        else:
            if run_dir.exists():  # unfinished, or made with other options: start afresh
                if any(run_dir.iterdir()) and not (run_dir / "config.yaml").exists():
                    raise AblationError(f"{run_dir} exists and is not a mocolab run; move it or "
                                        "choose another --runs-dir")
                shutil.rmtree(run_dir)
            log(f"[{i}/{total}] {plan.study} {setting.label} seed {seed}: training")
            pretrain(cfg)
            seconds = round(time.perf_counter() - t0, 1)
            (run_dir / "ablation.json").write_text(json.dumps({"seconds": seconds}) + "\n")
        record = {**setting.values, "setting": setting.label, "seed": seed, **summarize_run(run_dir)}
        if extra is not None:
            record.update(extra(run_dir, cfg))
        record["images"] = record["steps"] * cfg.batch_size if record.get("steps") is not None else None
        record["seconds"] = seconds
        record["run"] = str(run_dir)
        top1 = record.get("knn_top1")
        log(f"    kNN top-1 {top1:.2f}%" if top1 is not None else "    (no kNN: unlabelled data)")
        records.append(record)
    return records


# --- outputs ------------------------------------------------------------------------------

def columns(plan: Plan, records: Sequence[dict[str, Any]]) -> list[str]:
    """CSV columns: the setting label, the studied values, then :data:`RESULT_COLUMNS` and any
    other measure present (study extras), in a fixed order."""
    values = list(dict.fromkeys(k for s in plan.settings for k in s.values))
    cols = ["setting", *values, *RESULT_COLUMNS]
    extra = sorted({k for r in records for k in r} - set(cols))
    return cols[:-1] + extra + ["run"]


def write_csv(plan: Plan, records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per run (empty cells for measures a run lacks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(plan, records), extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: _fmt_csv(v) for k, v in r.items()})
    return path


def _fmt_csv(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else ("" if v is None else v)


def by_setting(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by setting label, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["setting"], []).append(r)
    return groups


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are present (sd ``None`` for one)."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def cell(values: Sequence[float | None], digits: int = 2) -> str:
    """``mean ± sd`` (or the single value; ``–`` when absent)."""
    m, s = mean_sd(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def machine() -> str:
    """The machine in words: CPU cores or the GPU, and torch's version."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


#: Table columns every study shows: (header, record key, digits).
BASE_TABLE = (("kNN top-1 %", "knn_top1", 2), ("kNN top-5 %", "knn_top5", 2),
              ("final loss", "final_loss", 3), ("contrastive acc", "final_acc", 3))


def markdown_table(plan: Plan, records: Sequence[dict[str, Any]],
                   extra_columns: Sequence[tuple[str, str, int]] = ()) -> str:
    """The study's markdown: a header line (date, machine, budget, run length), the notes and
    a table with one row per setting (mean ± sd over seeds) and the paper's number."""
    groups = by_setting(records)
    cols = [*BASE_TABLE, *extra_columns]
    cfg = plan.config(plan.settings[0], plan.seeds[0])
    if records and (Path(records[0]["run"]) / "config.yaml").exists():  # as run (--data, ...)
        config = yaml.safe_load((Path(records[0]["run"]) / "config.yaml").read_text())
        cfg = config_from_dict(config)
    images = records[0].get("images") if records else None
    length = (f"{images:,} training images a run ({images / 60000:.2g} epochs of Fashion-MNIST)"
              if images and cfg.data == "fashion-mnist" else
              f"{images:,} training images a run" if images else f"{cfg.epochs} epochs a run")
    batches = sorted({plan.config(s, plan.seeds[0]).batch_size for s in plan.settings})
    batch = "batch " + " / ".join(map(str, batches))
    lines = [f"{date.today()} · {machine()} · budget `{plan.budget}` · {cfg.data}, {cfg.arch} width "
             f"{cfg.width} ({cfg.stem} stem), {batch} · {length} · seeds "
             f"{', '.join(map(str, plan.seeds))}", ""]
    for note in plan.notes:
        lines += [note, ""]
    head = ["setting", "runs", *(c[0] for c in cols)] + (["paper"] if plan.paper else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in groups.items():
        row = [label, str(len(rs)), *(cell([r.get(key) for r in rs], d) for _, key, d in cols)]
        if plan.paper:
            row.append(plan.paper.get(label, ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------

def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    from mocolab.visualize._mpl import pyplot as _pyplot

    return _pyplot()


def plot_loss_curves(ax: Any, records: Sequence[dict[str, Any]], labels: Sequence[str] | None = None,
                     title: str = "training loss (first seed)") -> None:
    """The loss against the epoch, one line per setting (its first seed's run)."""
    for label, rs in by_setting(records).items():
        if labels is not None and label not in labels:
            continue
        curve = loss_curve(read_rows(rs[0]["run"]))
        if curve:
            ax.plot([e for e, _ in curve], [v for _, v in curve], label=label, linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_by_setting(ax: Any, records: Sequence[dict[str, Any]], key: str, title: str,
                    labels: Sequence[str] | None = None) -> None:
    """Mean ± sd of ``key`` per setting as points with error bars on a categorical axis."""
    groups = [(lb, rs) for lb, rs in by_setting(records).items() if labels is None or lb in labels]
    xs, ms, sds = [], [], []
    for i, (_, rs) in enumerate(groups):
        m, s = mean_sd([r.get(key) for r in rs])
        if m is not None:
            xs.append(i)
            ms.append(m)
            sds.append(s or 0.0)
    ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, linestyle="-")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7, rotation=20)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and close it."""
    from mocolab.visualize._mpl import save

    fig.tight_layout()
    return save(fig, path)


# --- the command line ------------------------------------------------------------------------

def parser(study: str, description: str) -> argparse.ArgumentParser:
    """The options every study script takes."""
    p = argparse.ArgumentParser(prog=f"benchmarks/ablations/{study}.py", description=description)
    p.add_argument("--budget", choices=BUDGETS, default="small",
                   help="tiny (smoke test, seconds) | small (Fashion-MNIST, CPU) | full (papers, GPUs)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the budget's)")
    p.add_argument("--steps", type=int, default=None,
                   help="cap each run at this many steps of the base batch (default: the budget's length)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data", default=None,
                   help="dataset (full budget: the ImageNet folder); default: the budget's")
    p.add_argument("--data-root", default=None, help="where built-in datasets are looked for")
    p.add_argument("--out", default=None, help=f"folder for the CSV, PNG and markdown (default docs/ablations/{study})")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "ablations"),
                   help="folder for the run directories (checkpoints, logs)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each run's options (those that differ from mocolab's defaults) and stop",
    )
    return p


def outputs(study: str, out: str | Path | None) -> tuple[Path, Path, Path]:
    """The study's CSV, PNG and markdown paths."""
    folder = Path(out) if out is not None else REPO / "docs" / "ablations" / study
    return folder / f"{study}.csv", folder / f"{study}.png", folder / f"{study}.md"


def main(study: str, description: str, make_plan: Callable[[str], Plan],
         plot: Callable[[Plan, list[dict[str, Any]], Path], None],
         extra_columns: Sequence[tuple[str, str, int]] = (),
         extra: Callable[[Path, PretrainConfig], dict[str, Any]] | None = None,
         argv: Sequence[str] | None = None) -> int:
    """Run a study from the command line; returns the exit status (2 with one line on bad input)."""
    args = parser(study, description).parse_args(argv)
    try:
        if args.seeds is not None and args.seeds < 1:
            raise AblationError(f"--seeds must be at least 1, got {args.seeds}")
        if args.steps is not None and args.steps < 1:
            raise AblationError(f"--steps must be at least 1, got {args.steps}")
        plan = make_plan(args.budget)
        if args.seeds is not None:
            plan.seeds = tuple(range(args.seeds))
        if args.steps is not None:
            plan.steps = args.steps
        needs_data = plan.base.get("data") == "<imagenet>"
        if needs_data and not args.data and not args.dry_run:
            raise AblationError(f"budget full of the {study} study trains on ImageNet: pass "
                                "--data /path/to/imagenet (a folder with train/ and val/)")
        if args.dry_run:
            for s in plan.settings:
                for seed in plan.seeds:
                    cfg = plan.config(s, seed, **({"data": args.data} if args.data else {}))
                    default = build_config(method=cfg.method).to_dict()
                    changed = {k: v for k, v in cfg.to_dict().items()
                               if v != default.get(k) and k not in ("progress",)}
                    print(f"{run_name(s, seed)}: {changed}")
            return 0
        csv_path, png_path, md_path = outputs(study, args.out)
        records = run_plan(plan, args.runs_dir, threads=args.threads, device=args.device,
                           data=args.data, data_root=args.data_root, extra=extra)
        write_csv(plan, records, csv_path)
        plot(plan, records, png_path)
        md_path.write_text(markdown_table(plan, records, extra_columns))
        print(f"Wrote {csv_path}, {png_path} and {md_path}")
        return 0
    except (AblationError, ConfigError, DatasetError, CheckpointError) as e:
        print(f"{study}: error: {e}", file=sys.stderr)
        return 2
