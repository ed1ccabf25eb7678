"""mocolab: self-supervised visual representation learning by contrast.

Contrastive learning as a dictionary look-up: a query must match its key and differ from the
other keys. The parts are first-class objects — views (:mod:`mocolab.augment`), backbones
(:mod:`mocolab.backbones`), heads, dictionaries of keys (:mod:`mocolab.dictionaries`), momentum
encoders (:mod:`mocolab.momentum`), losses (:mod:`mocolab.losses`) — and a method
(:mod:`mocolab.methods`) is a short composition of them, trained by one loop (:mod:`mocolab.train`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy re-exports keep `import mocolab` light and free of import cycles.
    if name in ("pretrain",):
        from .train import pretrain

        return pretrain
    if name in ("PretrainConfig", "build_config"):
        from . import config

        return getattr(config, name)
    if name in ("Encoder", "load_encoder", "load_backbone"):
        # mocolab.load_backbone(path): the backbone ready for inference, with its input
        # normalisation (the Encoder; .backbone is the bare network, .info the run's info).
        # mocolab.checkpoint.load_backbone gives the bare backbone and the info as a pair.
        from . import encoder

        return getattr(encoder, "load_encoder" if name == "load_backbone" else name)
    if name == "load_foreign_backbone":
        from .weights import load_foreign_backbone

        return load_foreign_backbone
    if name == "export_backbone":
        from .export import export_backbone

        return export_backbone
    if name == "embed_folder":
        from .embed import embed_folder

        return embed_folder
    raise AttributeError(f"module 'mocolab' has no attribute {name!r}")
