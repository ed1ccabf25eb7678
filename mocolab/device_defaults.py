"""Options whose default depends on the device a run trains on, and the crashing combinations
of options refused before they crash.

Two options are left unset (``None``) by :class:`~mocolab.config.PretrainConfig` and decided
here, once the device is known:

* ``channels_last``: on with CUDA (faster convolutions, the papers' setting); off on a CPU,
  where it gives nothing (``benchmarks/step_modes.py``: 1.00× eager, 1.53× vs 1.56× compiled)
  and where, at ResNet widths below :data:`CHANNELS_LAST_MIN_CPU_WIDTH`, torch 2.14.1 dies in
  the backward of a strided 1×1 convolution (a segfault, no message).
* ``stem``: for an image folder on a CPU, ``compact`` (a 3×3/2 convolution: feature maps of
  half the side, as the ``cifar`` stem makes of 32-px images) where the side would get the
  ``cifar`` stem (32-95 px; the folder default is 64): a step 4.6× cheaper in the backbone
  (forward + backward of ResNet-18 width 16 on 32 images of 64 px, one thread: 0.40 s vs
  1.87 s), which brings a first run on 10,000 photos near 10 minutes on 2 cores.
* ``compile``: on for an image folder on a CPU (1.5× faster steps on the project's 2-core CPU
  for about 35 s of compilation; a warning and eager mode where inductor cannot build, e.g.
  without a C++ compiler); off elsewhere (the built-in demos keep their measured presets, CUDA
  the papers' eager setting).

``--augment-backend auto`` (the default) is decided once the view size is known
(:func:`choose_view_path`): the batched views on CUDA and for shards; on a CPU, whichever of
the batched views (eager, or compiled as a folder run makes them) and the per-image views
(PIL in DataLoader workers) :data:`CPU_VIEW_RATES` measured faster at that size.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .backbones import default_stem, is_vit
from .config import ConfigError, PretrainConfig
from .data import BUILTIN_DATASETS
from .data.folder import DEFAULT_IMAGE_SIZE

CHANNELS_LAST_MIN_CPU_WIDTH = 16
"""Below this ResNet width, channels-last on a CPU crashes torch 2.14.1's backward of a strided
1×1 convolution (``pretrain --data synthetic --width 8 --channels-last``: exit 139 or ``double
free or corruption``); width 16 (the demo's) runs."""


def is_folder(data: str) -> bool:
    """Whether ``--data`` names a folder of images rather than a built-in dataset."""

    return str(data).lower() not in BUILTIN_DATASETS


def apply_device_defaults(
    cfg: PretrainConfig, device: torch.device, *, choose_stem: bool = True, resuming: bool = False
) -> PretrainConfig:
    """``cfg`` with ``channels_last``, ``compile`` and ``stem`` decided for ``device`` where
    they were left unset (see the module's docstring), after refusing a crashing combination.

    >>> cfg = apply_device_defaults(PretrainConfig(data="photos"), torch.device("cpu"))
    >>> cfg.channels_last, cfg.compile, cfg.stem
    (False, True, 'compact')
    >>> cfg = apply_device_defaults(PretrainConfig(), torch.device("cpu"))  # the demo
    >>> cfg.channels_last, cfg.compile, cfg.stem
    (False, False, None)

    ``choose_stem=False`` leaves the stem alone: a resumed run keeps the stem its checkpoint
    was trained with (runs saved before this default have ``stem: null`` in their options).
    ``resuming=True`` keeps a resumed run's own ``channels_last`` without the refusal below:
    runs saved before this default hold ``channels_last: true`` (the CPU default then), and
    they ran with it.

    Raises:
        ConfigError: ``--channels-last`` asked for on a CPU with a ResNet narrower than
            :data:`CHANNELS_LAST_MIN_CPU_WIDTH`.
    """
    cuda = device.type == "cuda"
    channels_last = cuda if cfg.channels_last is None else cfg.channels_last
    cpu_folder = device.type == "cpu" and is_folder(cfg.data)
    compile_ = cpu_folder if cfg.compile is None else cfg.compile
    if (
        channels_last
        and not resuming
        and device.type == "cpu"
        and not is_vit(cfg.arch)
        and cfg.width < CHANNELS_LAST_MIN_CPU_WIDTH
    ):
        raise ConfigError(
            f"--channels-last on a CPU with --width {cfg.width} crashes torch {torch.__version__} "
            f"(a segfault in the backward of a strided 1×1 convolution below width "
            f"{CHANNELS_LAST_MIN_CPU_WIDTH}) and makes no CPU step faster; drop --channels-last "
            f"(or use --width {CHANNELS_LAST_MIN_CPU_WIDTH} or more)"
        )
    stem = cfg.stem
    if choose_stem and stem is None and cpu_folder and not is_vit(cfg.arch):
        side = cfg.crop_size or cfg.image_size or DEFAULT_IMAGE_SIZE
        stem = "compact" if default_stem(side) == "cifar" else None
    return dataclasses.replace(cfg, channels_last=channels_last, compile=compile_, stem=stem)


CPU_VIEW_RATES: dict[int, tuple[float, float, float]] = {
    28: (1321, 6803, 20197),
    64: (904, 2215, 3479),
    96: (708, 1072, 1326),
    128: (483, 527, 655),
    160: (317, 328, 345),
    224: (196, 97, 122),
}
"""Images/s (two MoCo v2 views each) of the view paths on a CPU, by view side: (per image
with PIL in 2 DataLoader workers, batched eager, batched compiled), fed from a folder's cache
as training reads it. ``python benchmarks/data_path.py --sizes 28 64 96 128 160 224`` (1,024
JPEGs, batch 64, 2 torch threads, medians of 3 rounds), x86_64, 2 cores, 24 GiB, torch
2.14.1, 2026-12-07, a quiet machine (docs/data.md, "Which view path")."""


def per_image_speedup(size: int, compiled: bool) -> float:
    """How many times faster the per-image views are than the batched ones (``compiled`` or
    eager) on a CPU at ``size`` px, by :data:`CPU_VIEW_RATES`: read off at a measured size,
    interpolated between two (linearly in log size, on the log of the ratio), the nearest
    measured size's beyond them.

    >>> per_image_speedup(224, compiled=True) > 1  # PIL in the workers wins on large views
    True
    >>> per_image_speedup(28, compiled=False) < 1  # batched views win on small ones
    True
    """

    def log_ratio(side: int) -> float:
        per_image, eager, fused = CPU_VIEW_RATES[side]
        return math.log(per_image / (fused if compiled else eager))

    sides = sorted(CPU_VIEW_RATES)
    if size <= sides[0] or size >= sides[-1]:
        return math.exp(log_ratio(sides[0] if size <= sides[0] else sides[-1]))
    hi = next(s for s in sides if s >= size)
    lo = sides[sides.index(hi) - 1]
    if hi == size:
        return math.exp(log_ratio(size))
    w = math.log(size / lo) / math.log(hi / lo)
    return math.exp((1 - w) * log_ratio(lo) + w * log_ratio(hi))


def choose_view_path(
    cfg: PretrainConfig,
    device: torch.device,
    size: int,
    *,
    shards: bool,
    compiled_views: bool,
) -> tuple[PretrainConfig, str | None]:
    """``cfg`` with ``--augment-backend auto`` decided for ``device`` and ``size``-px views, and
    the line that says the choice (``None`` when ``cfg`` already names a backend: the user's
    choice, or a resumed run's own).

    Batched on CUDA (the views cost 2 % of a ResNet-50 step there) and for shards (streamed
    into the batched path only); on a CPU the faster by :func:`per_image_speedup`, against
    the batched mode the run makes (``compiled_views``).

    >>> cfg, line = choose_view_path(PretrainConfig(), torch.device("cpu"), 28, shards=False,
    ...                              compiled_views=False)
    >>> cfg.augment_backend
    'batched'
    """
    if cfg.augment_backend != "auto":
        return cfg, None
    note = "--augment-backend to choose"
    if device.type != "cpu" or shards:
        where = "shards" if shards else device.type
        return dataclasses.replace(cfg, augment_backend="batched"), (
            f"views: batched{' (compiled)' if compiled_views else ''}, for {where}; {note}"
        )
    ratio = per_image_speedup(size, compiled_views)
    mode = "compiled" if compiled_views else "eager"
    if ratio > 1:
        workers = (
            f"{cfg.workers} worker{'s' * (cfg.workers != 1)}"
            if cfg.workers
            else "in the main process"
        )
        return dataclasses.replace(cfg, augment_backend="torchvision"), (
            f"views: per-image (PIL, {workers}), {ratio:.1f}× faster than batched ({mode}) "
            f"at {size} px on a CPU; {note}"
        )
    return dataclasses.replace(cfg, augment_backend="batched"), (
        f"views: batched ({mode}), {1 / ratio:.1f}× faster than per-image at {size} px on a "
        f"CPU; {note}"
    )
