"""Pictures a person can look at (PNG files, matplotlib on the Agg backend) and the HTML report.

- :func:`retrieval_grid`: queries and their nearest neighbours, framed green / red by class.
- :func:`first_layer_kernels`, :func:`feature_maps`: what the first layer learnt, what a layer
  sees in an image.
- :func:`cls_attention_maps`, :func:`attention_figure`: where a ViT's [CLS] token looks.
- :func:`embedding_map`: t-SNE (scikit-learn) or UMAP (when installed) of embeddings by class.
- :func:`training_curves`: loss, LR, momentum, kNN accuracy... from ``metrics.jsonl``.
- :func:`write_report`: all of it in one self-contained HTML page (``mocolab report``).
"""

_EXPORTS = {
    "training_curves": "curves",
    "embedding_map": "embedding",
    "project_2d": "embedding",
    "feature_maps": "kernels",
    "first_layer_kernels": "kernels",
    "layer_output": "kernels",
    "write_report": "report",
    "retrieval_grid": "retrieval",
    "cls_attention_maps": "attention",
    "attention_figure": "attention",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy re-exports: `mocolab --help` and the CLI parser stay free of torch and matplotlib.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mocolab.visualize' has no attribute {name!r}")
