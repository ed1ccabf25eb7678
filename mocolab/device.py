"""Where a run computes and how: the device, ``torch.compile`` when it works there, AMP.

Helpers for the training loop and the commands that load a model (evaluation, embedding); they
hold no state of a run.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. A requested CUDA device must exist.

    >>> select_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None


def amp_dtype(option: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp``: ``auto`` is bf16 on CUDA and off (fp32) elsewhere."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AMP_DTYPES[option]


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found" notice, which inductor's C++ builds log on a
    machine without CUDA (true, and not news to someone training on a CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def compile_works(device: torch.device, flag: str = "--compile") -> bool:
    """Whether ``torch.compile`` (inductor) can build and run a kernel on ``device`` here: on a
    CPU it needs a C++ compiler, on CUDA Triton. A tiny function is compiled to find out, so a
    missing toolchain costs a warning and eager speed, not a crash at the first step."""
    if device.type == "cpu":  # inductor's C++ build logs "No CUDA runtime is found": noise
        logger = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
            logger.addFilter(_NoCudaRuntimeNotice())  # that line only; its other messages stay
    try:
        x = torch.ones(4, device=device)
        torch.testing.assert_close(
            torch.compile(lambda t: (t * 2).relu().sum())(x), torch.tensor(8.0, device=device)
        )
        return True
    except Exception as e:  # inductor reports a missing compiler in many exception types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        off = "--no-compile" if flag == "--compile" else f"{flag.split()[0]} off"
        warnings.warn(
            f"{flag}: torch.compile does not work on this machine ({type(e).__name__}: "
            f"{first}); training without it, slower. On a CPU it needs a C++ compiler "
            f"(e.g. apt-get install g++); {off} hides this warning.",
            stacklevel=2,
        )
        return False


def views_compile_mode(option: str, device: torch.device, compile_model: bool) -> bool | str:
    """``ViewGenerator``'s ``compile`` for ``--compile-views``: ``auto`` compiles on CUDA (where
    the eager pipeline's many small kernels cost the model time) and wherever the model is
    compiled too (``--compile``), when inductor works there."""
    if option == "off" or (option == "auto" and device.type != "cuda" and not compile_model):
        return False
    if not compile_works(device, "--compile-views " + option):
        return False
    return "reduce-overhead" if option == "graphs" else True
