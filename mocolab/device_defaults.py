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
"""

from __future__ import annotations

import dataclasses

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
