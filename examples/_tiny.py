"""What ``--tiny`` means for the examples: seconds instead of minutes, on generated images.

The tests run every example with ``--tiny`` (or ``MOCOLAB_EXAMPLES_TINY=1``); you do not need
this file to copy an example, only to run it with ``--tiny``.
"""

from __future__ import annotations

from pathlib import Path

# A run of two steps of 16 images with a narrow network: enough to go through every stage.
TINY_RUN = dict(
    data="synthetic",
    width=8,
    stem="compact",
    batch_size=16,
    epochs=1,
    max_steps=2,
    threads=1,
    progress=False,
    diagnostics_every=0,
    compile=False,
    compile_views="off",
)


def make_folder(root: Path, per_class: int = 12, classes: int = 3, size: int = 40) -> Path:
    """A folder of small PNGs in class sub-folders (``root/class_k/i.png``), each class a colour
    with noise: something a few steps can tell apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{k}" / f"{i}.png")
    return root
