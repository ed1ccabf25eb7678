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


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>"
        f"{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


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
.grid { display: flex; flex-wrap: wrap; gap: 2em; } .grid > div { flex: 1 1 300px; }
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
    from .curves import training_curves
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
    numbers: dict[str, dict[str, Any]] = {}

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
        numbers["retrieval (test → train)"] = retrieval_metrics(
            query, query_labels, bank, bank_labels, ks
        ).to_dict()

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
    results = run / "results.json"
    if results.exists():
        knn = (read_json(results) or {}).get("knn")
        if isinstance(knn, dict) and knn:
            numbers["kNN at the end of training"] = knn
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
        key = name[: -len(".json")].replace("eval_", "eval ")
        value = read_json(saved[name])
        if value is not None:
            numbers[key] = value
    if unsaved is not None:
        numbers["eval diagnostics"] = unsaved

    # the page
    vit_backbone: Any = ctx.backbone
    shape = (
        f"patch {vit_backbone.patch_size}, depth {len(vit_backbone.blocks)}"
        if vit
        else f"stem {info.get('stem')}, width {info.get('width')}"
    )
    title = f"{cfg.get('method')} · {cfg.get('arch')} {shape.split(', ')[-1]} · {cfg.get('data')}"
    header = {
        "run": str(run),
        "method": cfg.get("method"),
        "backbone": f"{cfg.get('arch')} ({shape})",
        "data": info.get("dataset"),
        "step": info["step"],
        "input": f"{info['in_channels']}×{info['crop_size']}²",
        "written": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>mocolab report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>mocolab report: {html.escape(title)}</h1>",
        _table(header),
        "<h2>Numbers</h2>",
    ]
    if not numbers:
        parts.append("<p>No evaluation yet: run <code>mocolab eval knn RUN_DIR</code>.</p>")
    parts.append("<div class='grid'>")
    for name, vals in numbers.items():
        parts.append(f"<div><h3>{html.escape(name)}</h3>{_table(_flatten(vals))}</div>")
    parts.append("</div>")
    for name, png, caption in figures:
        parts.append(
            f"<h2>{html.escape(name)}</h2><figure><img src='{_data_uri(png)}' "
            f"alt='{html.escape(name)}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    from yaml import safe_dump

    parts.append(
        f"<h2>Options</h2><pre>{html.escape(safe_dump(info['config'], sort_keys=False))}</pre>"
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
