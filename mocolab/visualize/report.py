"""``mocolab report RUN_DIR``: one self-contained HTML page about a run — its numbers, its
options, its training curves and pictures of what the representation does (retrieval grid,
embedding map, first-layer kernels, feature maps or a ViT's [CLS] attention maps), images
embedded as base64 data URIs so the page can be mailed or archived as one file. The PNGs are
written beside it too.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from ..safeio import save_json_or_warn, staged_folder, write_text_atomic

REPORT_DIR = "report"


def read_json(path: Path) -> dict[str, Any] | None:
    """A run's JSON result (``results.json``, ``eval_*.json``), or ``None`` with a warning
    when it is cut off, not JSON or not an object (the page is written without it)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        warnings.warn(
            f"{path} is damaged (cut off, or not a JSON object); the report leaves it out: "
            f"run that evaluation again to restore it",
            stacklevel=2,
        )
        return None
    return value


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out[f"{prefix}{k}"] = ", ".join(
                f"{x:.4g}" if isinstance(x, float) else str(x) for x in v
            )
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


def _format(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: dict[str, Any], cls: str = "") -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table{f' class={cls!r}' if cls else ''}>{cells}</table>"


#: The table titles of the protocols (``eval_<protocol>.json``).
PROTOCOLS = {
    "knn": "kNN",
    "linear": "linear probe",
    "linear_layers": "linear probe per stage",
    "finetune": "fine-tuning",
    "retrieval": "retrieval",
    "detect": "detection",
    "segment": "segmentation",
    "diagnostics": "diagnostics",
}
_NAMES = {
    "top1": "top-1 %",
    "top5": "top-5 %",
    "t": "τ",
    "train_images": "train images",
    "test_images": "test images",
    "train": "train images",  # eval_knn.json of older runs
    "test": "test images",
    "train_loss": "train loss",
}


def protocol_table(sources: list[tuple[str, dict[str, Any]]]) -> str:
    """One protocol's results as one table: a row per quantity, a column per source (the
    start and the end of training, ``mocolab eval``, this page)."""
    flat = [(name, _flatten(values)) for name, values in sources]
    keys = list(dict.fromkeys(k for _, values in flat for k in values))
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in flat)
    body = "".join(
        f"<tr><th>{html.escape(_NAMES.get(k, k))}</th>"
        + "".join(f"<td>{html.escape(_format(v[k])) if k in v else ''}</td>" for _, v in flat)
        + "</tr>"
        for k in keys
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _percent(fraction: float) -> str:
    """``0.0493`` → ``'4.9 %'``, ``0.00012`` → ``'0.012 %'``."""
    x = 100 * fraction
    return f"{x:.1f} %" if x >= 1 else f"{x:.2g} %"


def _source(sources: list[tuple[str, dict[str, Any]]], *names: str) -> dict[str, Any] | None:
    """The values of the first of ``names`` among ``sources``."""
    found = dict(sources)
    return next((found[n] for n in names if n in found), None)


def headline(numbers: dict[str, list[tuple[str, dict[str, Any]]]], speed: dict | None) -> str:
    """The block at the top: kNN and linear top-1 of the trained encoder, beside the kNN of
    the encoder the run started from, and the run's utilisation."""
    cards = []
    knn = numbers.get(PROTOCOLS["knn"], [])
    end = _source(knn, "end of training", "mocolab eval knn")
    start = _source(knn, "start of training")
    if end is not None:
        note = (
            f"encoder at the start: {start['top1']:.2f} % ({end['top1'] - start['top1']:+.1f})"
            if start is not None
            else "no kNN of the encoder at the start in this run's log"
        )
        cards.append(("kNN top-1", f"{end['top1']:.2f} %", note))
    linear = _source(numbers.get(PROTOCOLS["linear"], []), "mocolab eval linear")
    if linear is not None:
        cards.append(
            ("linear top-1", f"{linear['top1']:.2f} %", "frozen features, mocolab eval linear")
        )
    if speed is not None and "mfu" in speed:
        cards.append(
            (
                "model FLOP utilisation",
                _percent(speed["mfu"]),
                f"{speed['tflops']:.3g} TFLOP/s; waiting for data {100 * speed['data_wait']:.0f} %"
                " of the time",
            )
        )
    if not cards:
        return ""
    return (
        "<div class='headline'>"
        + "".join(
            f"<div><div class='label'>{html.escape(label)}</div><div class='value'>"
            f"{html.escape(value)}</div><div class='note'>{html.escape(note)}</div></div>"
            for label, value, note in cards
        )
        + "</div>"
    )


def training_text(
    cfg: dict[str, Any], info: dict[str, Any], rows: list[dict[str, Any]], results: dict
) -> str:
    """``"32 steps of 32 images (2 epochs)"``, or ``"step 16 of 32 …"`` for an unfinished run."""
    done, batch = int(info["step"]), int(cfg.get("batch_size") or 0)
    per_epoch = next(
        (r["step"] / r["epoch"] for r in rows if r.get("epoch") and r.get("step")),
        (info.get("num_images") or 0) // max(batch, 1) or None,
    )
    total = results.get("total_steps")
    if total is None and per_epoch and cfg.get("epochs"):
        total = min(round(cfg["epochs"] * per_epoch), cfg.get("max_steps") or 2**62)

    if total is None or done >= total:
        if not per_epoch:
            return f"{done} steps of {batch} images"
        n = done / per_epoch
        return f"{done} steps of {batch} images ({n:.3g} epoch{'' if n == 1 else 's'})"
    if not per_epoch:
        return f"step {done} of {total}, batches of {batch} images"
    return (
        f"step {done} of {total} ({done / per_epoch:.3g} of {total / per_epoch:.3g} epochs), "
        f"batches of {batch} images"
    )


def utilisation_summary(run: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The medians of the logged rows' ``images_per_s``, ``tflops``, ``mfu`` and
    ``data_wait`` (the first row left out when there are more than two: it holds the first
    step's warm-up), with the step's FLOPs and the peak from ``utilisation.json``; ``None``
    when the log has no utilisation."""
    from ..utilisation import RUN_FILE

    logged = [r for r in rows if "data_wait" in r]
    if not logged:
        return None
    if len(logged) > 2:
        logged = logged[1:]
    out: dict[str, Any] = {"rows": len(logged)}
    for key in ("images_per_s", "tflops", "mfu", "data_wait"):
        values = sorted(r[key] for r in logged if isinstance(r.get(key), (int, float)))
        if values:
            out[key] = statistics.median(values)
    facts = run / RUN_FILE
    if facts.exists():
        out.update(json.loads(facts.read_text()))
    return out


def _utilisation_html(speed: dict[str, Any]) -> str:
    """The section on speed: the step, the peak, what the run reached, and how to read it."""
    from ..utilisation import format_flops

    rows: dict[str, str] = {}
    if speed.get("step_flops"):
        per = " per process" if speed.get("processes", 1) > 1 else ""
        rows["one step"] = f"{format_flops(speed['step_flops'])}{per}, forward and backward"
    peak = speed.get("peak")
    if peak:
        rows["peak"] = (
            f"{format_flops(peak['flops'], 'FLOP/s')}: {peak['device']}, {peak['dtype']} "
            f"({peak['how']})"
        )
    n = speed["rows"]
    if "tflops" in speed:
        mfu = f" = {_percent(speed['mfu'])} of the peak (MFU)" if "mfu" in speed else ""
        rows["achieved"] = f"{format_flops(speed['tflops'] * 1e12, 'FLOP/s')}{mfu}"
    if "images_per_s" in speed:
        rows["images / s"] = f"{speed['images_per_s']:.1f}"
    wait = speed["data_wait"]
    rows["waiting for data"] = f"{_percent(wait)} of the time"
    if wait >= 0.5:
        reading = (
            "The loop waits for data most of the time: the data path (reading, decoding, "
            "views) limits this run, not the model."
        )
    elif wait >= 0.2:
        reading = "The loop waits for data a good part of the time: both data and model count."
    else:
        reading = "The loop rarely waits for data: the model's computation sets the pace."
    return (
        _table(rows)
        + f"<p class='note'>Medians of {n} logged row{'s' if n > 1 else ''}. {reading}</p>"
    )


def detection_figures(run: Path, out: Path) -> list[tuple[str, Path, str]]:
    """The pictures ``mocolab eval detect`` drew (``detect_examples.png``), copied into
    ``out``, with a caption from ``eval_detect.json``; none when the run has no evaluation."""
    import shutil

    result, png = run / "eval_detect.json", run / "detect_examples.png"
    if not (result.exists() and png.exists()):
        return []
    res = read_json(result)
    if res is None:
        return []
    shutil.copyfile(png, out / png.name)
    start = "a random init of this run's network" if res.get("init") == "random" else "this run"
    scores = ", ".join(
        f"{name} AP {res[k]['AP']:.1f}"
        for k, name in (("bbox", "box"), ("segm", "mask"))
        if k in res
    )
    caption = (
        f"Predictions (class, score{', mask' if 'segm' in res else ''}; score ≥ 0.5, or "
        f"dashed: an image's 3 best when none reaches it) of "
        f"{res.get('detector', 'the detector')} fine-tuned for {res.get('epochs')} epochs "
        f"from {start} on {res.get('data')}, on its first test images ({scores})."
    )
    return [("Detection on test images", out / png.name, caption)]


def segmentation_figures(run: Path, out: Path) -> list[tuple[str, Path, str]]:
    """The picture ``mocolab eval segment`` drew (``segment_examples.png``), copied into
    ``out``, with a caption from ``eval_segment.json``; none without that evaluation."""
    import shutil

    result, png = run / "eval_segment.json", run / "segment_examples.png"
    if not (result.exists() and png.exists()):
        return []
    res = read_json(result)
    if res is None:
        return []
    shutil.copyfile(png, out / png.name)
    return [
        (
            "Segmentation of test images",
            out / png.name,
            f"Test images, their label maps and the predictions of an FCN head fine-tuned with "
            f"this run's backbone for {res.get('iters')} steps on {res.get('data')} (mIoU "
            f"{res.get('miou', 0):.1f} %, pixel accuracy {res.get('pixel_acc', 0):.1f} %).",
        )
    ]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f5f5f5; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 0 2.5em; } .grid > div { flex: 0 1 auto; }
h3 { font-size: 1em; margin: 1em 0 0.3em; }
td { font-variant-numeric: tabular-nums; }
.headline { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
.headline > div { flex: 1 1 220px; background: #f3f6fb; border: 1px solid #dde4ef;
  border-radius: 6px; padding: 0.7em 1em; }
.headline .label { font-size: 0.85em; color: #555; }
.headline .value { font-size: 2em; font-weight: 600; margin: 0.1em 0; }
.headline .note, p.note { font-size: 0.85em; color: #555; }
table.facts th { width: 7em; }
details { margin-top: 2em; border-top: 1px solid #ddd; padding-top: 0.5em; }
summary { cursor: pointer; font-size: 1.2em; font-weight: 600; }
.options { columns: 3 18em; font-size: 0.8em; margin-top: 0.8em; }
.options > div { break-inside: avoid; padding: 1px 0; overflow-wrap: anywhere; }
.options b { font-weight: 600; }
"""


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    data: str | None = None,
    data_root: str | None = None,
    device: str = "auto",
    queries: int = 8,
    k: int = 8,
    layer: str = "layer2",
    image_index: int = 0,
    embedding: str = "tsne",
    max_points: int = 1000,
    diagnostics: bool = True,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir`` (default ``RUN_DIR/report``).

    The report is built in a temporary folder beside ``out_dir`` and swapped in when it is
    complete: a failure (a full disk) or a kill leaves the previous report, page and
    pictures, as it was. A folder that holds other files than a report's keeps them.

    Args:
        run_dir: a run directory or checkpoint file.
        out_dir: where the page and pictures go.
        data, data_root, device: as for ``mocolab eval``.
        queries, k: rows and neighbours of the retrieval grid.
        layer, image_index: the feature maps drawn: this backbone layer on this test image
            (ViTs: the attention maps of this image and the next three; ``layer`` unused).
        embedding: ``tsne``, ``umap`` or ``auto`` (UMAP when installed).
        max_points: test images on the embedding map.
        diagnostics: measure the representation diagnostics when the run has no
            ``eval_diagnostics.json`` yet (a few seconds on small runs).
        seed: picks the queries and the map's points.

    Returns:
        The path of the HTML page.
    """
    from ..checkpoint import find_checkpoint

    find_checkpoint(run_dir)  # a missing run: that error, before any folder is made
    path = Path(run_dir)
    final = Path(out_dir) if out_dir else (path if path.is_dir() else path.parent) / REPORT_DIR
    # a report's own folder is replaced as a whole; one holding other files keeps them
    own = not final.is_dir() or not any(final.iterdir()) or (final / "index.html").is_file()
    note = "" if out_dir else "pass --out FOLDER to write the report elsewhere"
    with staged_folder(final, replace=own, keep_previous=own, last="index.html", note=note) as out:
        _write_report_into(
            out,
            run_dir,
            beside=out_dir is not None,
            data=data,
            data_root=data_root,
            device=device,
            queries=queries,
            k=k,
            layer=layer,
            image_index=image_index,
            embedding=embedding,
            max_points=max_points,
            diagnostics=diagnostics,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    return final / "index.html"


def _write_report_into(
    out: Path,
    run_dir: str | Path,
    *,
    beside: bool,
    data: str | None,
    data_root: str | None,
    device: str,
    queries: int,
    k: int,
    layer: str,
    image_index: int,
    embedding: str,
    max_points: int,
    diagnostics: bool,
    batch_size: int,
    seed: int,
    progress: bool,
) -> Path:
    """The report's files, written into ``out`` (the temporary folder of
    :func:`write_report`); ``beside``: measured diagnostics go into ``out`` (``--out`` was
    given) rather than into the run."""
    import torch

    from ..evaluate.context import prepare
    from ..evaluate.retrieval import retrieval_metrics, retrieve
    from .attention import attention_figure, has_attention
    from .curves import read_metrics, training_curves
    from .embedding import embedding_map
    from .kernels import feature_maps, first_layer_kernels
    from .retrieval import retrieval_grid

    ctx = prepare(
        run_dir,
        data=data,
        data_root=data_root,
        device=device,
        protocol="report",
        labels=False,
        progress=progress,
    )
    vit = has_attention(ctx.backbone)  # a ViT: attention maps instead of feature maps
    if not vit and (layer not in dict(ctx.backbone.named_modules()) or not layer):
        from ..config import ConfigError

        tops = ", ".join(n for n, _ in ctx.backbone.named_children())
        raise ConfigError(
            f"--layer: the backbone has no layer {layer!r}; choose one of {tops} "
            "(or a dotted sub-module name such as layer3.1.conv2)"
        )
    run = ctx.run_dir
    cfg, info = ctx.config, ctx.info
    figures: list[tuple[str, Path, str]] = []  # (title, png, caption)
    # one table per protocol: its results from each source, (source, values)
    numbers: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    metrics = run / "metrics.jsonl"
    panels = None
    if metrics.exists() and metrics.stat().st_size:
        try:
            panels = training_curves(metrics, out / "curves.png")
        except ValueError as e:  # no row of metrics in it (damaged)
            warnings.warn(f"{metrics}: {e}; the report has no training curves", stacklevel=2)
    if panels:
        figures.append(
            (
                "Training curves",
                out / "curves.png",
                "Logged every few steps: " + ", ".join(panels) + ".",
            )
        )

    # retrieval grid and metrics: test images query the train split (or the data itself)
    labelled = ctx.labelled
    bank_labels, query_labels = (
        (ctx.train.labels, ctx.test.labels) if labelled and ctx.test is not None else (None, None)
    )
    bank_set = ctx.train
    query_set = ctx.test if ctx.test is not None else ctx.train
    bank = ctx.features("train", batch_size, progress)
    query = ctx.features("test", batch_size, progress) if ctx.test is not None else bank
    kk = min(k, len(bank_set) - int(not labelled))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(query_set), generator=g)[:queries].sort().values
    if labelled:
        sims, idx = retrieve(query[picks], bank, kk)
    else:
        sims_all, idx_all = retrieve(query, bank, kk, exclude_self=True)
        sims, idx = sims_all[picks], idx_all[picks]
    retrieval_grid(
        query_set.images[picks],
        bank_set.images[idx],
        out / "retrieval.png",
        query_labels=query_labels[picks] if query_labels is not None else None,
        neighbour_labels=bank_labels[idx] if bank_labels is not None else None,
        similarities=sims,
        classes=bank_set.classes,
    )
    where = (
        f"test images of {query_set.name} and their nearest train images of {bank_set.name}"
        if labelled
        else f"images of {query_set.name} and their nearest other images"
    )
    figures.append(
        (
            "Nearest-neighbour retrieval",
            out / "retrieval.png",
            f"{len(picks)} {where}, by cosine similarity of frozen backbone features "
            "(the number under each image).",
        )
    )
    if labelled and query_labels is not None and bank_labels is not None:
        ks = sorted({1, 5, kk} & set(range(1, len(bank_set) + 1)))
        numbers["retrieval"] = [
            (
                "test → train, this page",
                retrieval_metrics(query, query_labels, bank, bank_labels, ks).to_dict(),
            )
        ]

    # embedding map
    n_map = min(max_points, len(query_set))
    pts = torch.randperm(len(query_set), generator=g)[:n_map].sort().values
    embedding_map(
        query[pts],
        out / "embedding.png",
        labels=query_set.labels[pts] if query_set.labels is not None else None,
        classes=query_set.classes,
        method=embedding,
        seed=seed,
        title=f"{n_map} images of {query_set.name} ({embedding})",
    )
    figures.append(
        (
            "Embedding map",
            out / "embedding.png",
            f"{embedding.upper() if embedding != 'auto' else 'UMAP or t-SNE'} of the "
            "L2-normalised backbone features"
            + (
                ", coloured by class."
                if query_set.labels is not None
                else " (the data has no labels: one colour; groups are what the encoder "
                "learned to tell apart)."
            ),
        )
    )

    # what the network looks at
    first_layer_kernels(ctx.backbone, out / "kernels.png")
    figures.append(
        (
            "First-layer kernels",
            out / "kernels.png",
            "The first convolution's kernels, each scaled to its own range.",
        )
    )
    index = min(max(image_index, 0), len(query_set) - 1)
    if vit:
        shown = query_set.images[index : index + 4]
        attention_figure(
            ctx.backbone,
            shown,
            out / "attention.png",
            size=info["crop_size"],
            mean=info["mean"],
            std=info["std"],
        )
        figures.append(
            (
                "[CLS] attention maps",
                out / "attention.png",
                f"Images {index}–{index + len(shown) - 1} of {query_set.name} and, per head, "
                "the last block's attention of the [CLS] token to the patches (DINO, "
                "Fig. 1), upsampled and overlaid; each map min-max scaled on its own.",
            )
        )
    else:
        try:
            feature_maps(
                ctx.backbone,
                query_set.images[index],
                layer,
                out / "feature_maps.png",
                size=info["crop_size"],
                mean=info["mean"],
                std=info["std"],
            )
        except ValueError as e:  # a layer whose output is not a stack of maps
            from ..config import ConfigError

            raise ConfigError(f"--layer: {e}") from None
        figures.append(
            (
                f"Feature maps of {layer}",
                out / "feature_maps.png",
                f"Image {index} of {query_set.name} and the most active channels of {layer}.",
            )
        )

    figures += detection_figures(run, out)
    figures += segmentation_figures(run, out)

    # numbers: the run's own results, every eval_*.json, diagnostics
    rows = read_metrics(metrics) if metrics.exists() else []
    results_path = run / "results.json"
    results = (read_json(results_path) or {}) if results_path.exists() else {}
    knn = numbers.setdefault(PROTOCOLS["knn"], [])
    start = next((r for r in rows if r.get("step") == 0 and "knn_top1" in r), None)
    if start is not None:  # the online check before the first step (mocolab.train.knn_at_init)
        n_train, n_test = len(ctx.train), len(ctx.test if ctx.test is not None else ctx.train)
        own = data is None  # the sizes are the run's own data's
        knn.append(
            (
                "start of training",
                {
                    "top1": start["knn_top1"],
                    "top5": start.get("knn_top5"),
                    "k": cfg.get("knn_k"),
                    "t": cfg.get("knn_t"),
                    "train_images": min(cfg.get("knn_bank") or n_train, n_train) if own else None,
                    "test_images": min(cfg.get("knn_queries") or n_test, n_test) if own else None,
                    "step": 0,
                },
            )
        )
    if isinstance(results.get("knn"), dict) and results["knn"]:
        knn.append(("end of training", {**results["knn"], "step": results.get("step")}))
    # measured diagnostics are kept beside the page when --out is given (the run directory
    # may be read-only), else in the run; a folder that refuses them costs a warning
    folders = [run, out] if beside else [run]
    unsaved = None
    if diagnostics and not any((f / "eval_diagnostics.json").exists() for f in folders):
        from ..evaluate.diagnostics import run_diagnostics

        diag = run_diagnostics(
            run_dir, data=data, data_root=data_root, device=device, max_images=512, seed=seed
        )
        if not save_json_or_warn(folders[-1] / "eval_diagnostics.json", diag):
            unsaved = diag
    saved = {p.name: p for f in folders for p in sorted(f.glob("eval_*.json"))}
    for name in sorted(saved):
        protocol = name[len("eval_") : -len(".json")]
        value = read_json(saved[name])
        if value is not None:
            numbers.setdefault(PROTOCOLS.get(protocol, protocol), []).append(
                (f"mocolab eval {protocol.split('_')[0]}", value)
            )
    if unsaved is not None:
        numbers.setdefault(PROTOCOLS["diagnostics"], []).append(("this page", unsaved))
    order = list(PROTOCOLS.values())  # the protocols in their order, then any other
    numbers = dict(
        sorted(
            ((name, sources) for name, sources in numbers.items() if sources),
            key=lambda item: order.index(item[0]) if item[0] in order else len(order),
        )
    )

    # the page
    vit_backbone: Any = ctx.backbone
    shape = (
        f"patch {vit_backbone.patch_size}, depth {len(vit_backbone.blocks)}"
        if vit
        else f"stem {info.get('stem')}, width {info.get('width')}"
    )
    title = f"{cfg.get('method')} · {cfg.get('arch')} {shape.split(', ')[-1]} · {cfg.get('data')}"
    images = f" ({info['num_images']} images)" if info.get("num_images") else ""
    facts = {
        "method": cfg.get("method"),
        "backbone": f"{cfg.get('arch')} ({shape}), input "
        f"{info['in_channels']}×{info['crop_size']}²",
        "data": f"{info.get('dataset')}{images}",
        "training": training_text(cfg, info, rows, results),
        "run": str(run),
        "written": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    speed = utilisation_summary(run, rows)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>mocolab report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>mocolab report: {html.escape(title)}</h1>",
        headline(numbers, speed),
        _table(facts, "facts"),
        "<h2>Evaluations</h2>",
    ]
    if not any(name != PROTOCOLS["retrieval"] for name in numbers):
        parts.append("<p>No evaluation yet: run <code>mocolab eval knn RUN_DIR</code>.</p>")
    parts.append("<div class='grid'>")
    for name, sources in numbers.items():
        parts.append(f"<div><h3>{html.escape(name)}</h3>{protocol_table(sources)}</div>")
    parts.append("</div>")
    if speed:
        parts.append(f"<h2>Speed and utilisation</h2>{_utilisation_html(speed)}")
    for name, png, caption in figures:
        parts.append(
            f"<h2>{html.escape(name)}</h2><figure><img src='{_data_uri(png)}' "
            f"alt='{html.escape(name)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    options = _flatten(info["config"])
    parts.append(
        f"<details><summary>Options ({len(options)} set in the run's config.yaml)</summary>"
        "<div class='options'>"
        + "".join(
            f"<div><b>{html.escape(k)}</b> {html.escape(_format(v))}</div>"
            for k, v in options.items()
        )
        + "</div></details>"
    )
    parts.append("</body></html>\n")
    page = out / "index.html"
    write_text_atomic(page, "\n".join(parts))
    return page


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mocolab report``."""
    p = subparsers.add_parser(
        "report",
        help="write an HTML report of a run (numbers, curves, pictures)",
        description="Write RUN_DIR/report/index.html: a self-contained page "
        "with the run's numbers, options, training curves, "
        "retrieval grid, embedding map, kernels and feature maps "
        "(ViTs: [CLS] attention maps).",
    )
    p.add_argument("run_dir", help="a run directory or checkpoint file")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--data", help="draw on another dataset (default: the run's)")
    p.add_argument("--data-root", help="where built-in datasets are looked for")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--queries", type=int, default=8, help="rows of the retrieval grid (default 8)")
    p.add_argument("--k", type=int, default=8, help="neighbours per row (default 8)")
    p.add_argument(
        "--layer", default="layer2", help="backbone layer of the feature maps (default layer2)"
    )
    p.add_argument(
        "--image",
        type=int,
        default=0,
        help="test image of the feature maps (ViTs: first of the "
        "four attention-map images; default 0)",
    )
    p.add_argument(
        "--embedding",
        choices=("tsne", "umap", "auto"),
        default="tsne",
        help="2-D map: tsne, umap (pip install umap-learn) or auto",
    )
    p.add_argument("--max-points", type=int, default=1000, help="points on the map (default 1000)")
    p.add_argument(
        "--no-diagnostics",
        dest="diagnostics",
        action="store_false",
        help="do not measure the diagnostics when eval_diagnostics.json is missing",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run(args: argparse.Namespace) -> int:
    """``mocolab report``: write the page and print where it is."""
    from ..config import ConfigError

    if args.queries < 1 or args.k < 1 or args.max_points < 3:
        raise ConfigError("--queries and --k must be positive and --max-points at least 3")
    try:
        page = write_report(
            args.run_dir,
            args.out,
            data=args.data,
            data_root=args.data_root,
            device=args.device,
            queries=args.queries,
            k=args.k,
            layer=args.layer,
            image_index=args.image,
            embedding=args.embedding,
            max_points=args.max_points,
            diagnostics=args.diagnostics,
            progress=args.progress,
        )
    except ImportError as e:
        raise ConfigError(str(e)) from None
    print(f"Report: {page}")
    from ..loggers import attach_artifact

    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    sent = attach_artifact(run_dir, Path(page).parent)  # the run's W&B / MLflow runs, if any
    if sent:
        print(f"Report added to the run's {' and '.join(sent)} run")
    return 0
