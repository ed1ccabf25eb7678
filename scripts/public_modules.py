"""Print the source files of mocolab's public modules: the package's ``__init__`` and every
module that defines a name of ``mocolab.__all__`` (``make lint`` runs ``mypy --strict`` on
them)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import mocolab


def public_modules() -> list[Path]:
    files = {Path(mocolab.__file__)}
    for name in mocolab.__all__:
        obj = getattr(mocolab, name)
        module = obj if inspect.ismodule(obj) else sys.modules[obj.__module__]
        files.add(Path(str(module.__file__)))
    return sorted(files)


if __name__ == "__main__":
    root = Path.cwd()
    print(
        "\n".join(
            str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in public_modules()
        )
    )
