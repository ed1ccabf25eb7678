"""Plug-ins: methods and presets from other installed distributions, through entry points.

A distribution adds methods as timm's and pytest's plug-ins do, by declaring entry points in
its ``pyproject.toml``:

.. code-block:: toml

    [project.entry-points."mocolab.methods"]
    plainclr = "mocolab_plainclr"          # a module that registers its methods when imported

    [project.entry-points."mocolab.presets"]
    plainclr = "mocolab_plainclr.configs"  # a package folder whose *.yaml files are presets

The module of a ``mocolab.methods`` entry point is written like a module of
:mod:`mocolab.methods`: an options dataclass and a builder decorated with
:func:`~mocolab.methods.register_method` (``from mocolab.methods import registry as r``).
mocolab imports it with its own methods, so ``--method NAME``, its flags, its ``--help`` and
its presets work as a built-in method's. A plug-in that fails to import is reported on one line
naming its distribution and the error, and skipped: the other methods still work.

This module imports nothing from mocolab but :mod:`mocolab.errors`: finding the plug-ins (and
their files) imports none of them.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

METHODS_GROUP = "mocolab.methods"
PRESETS_GROUP = "mocolab.presets"


@dataclass(frozen=True)
class PluginEntry:
    """One entry point of a plug-in distribution.

    Attributes:
        name: the entry point's name (by convention the method's or the distribution's).
        value: what it points to, ``module`` or ``module:attribute``.
        distribution: the name of the distribution that declares it.
    """

    name: str
    value: str
    distribution: str

    @property
    def module(self) -> str:
        return self.value.split(":", 1)[0].strip()

    def describe(self) -> str:
        return f"the plug-in {self.distribution!r} (entry point {self.name} = {self.value})"


@functools.cache
def entries(group: str) -> list[PluginEntry]:
    """The entry points of ``group`` that the installed distributions declare, sorted by
    distribution and name (found from their metadata once per process: nothing is imported)."""
    from importlib.metadata import entry_points

    found = {
        PluginEntry(ep.name, ep.value, ep.dist.name if ep.dist is not None else "?")
        for ep in entry_points(group=group)
    }
    return sorted(found, key=lambda e: (e.distribution, e.name, e.value))


_reported: set[str] = set()


def report_broken(entry: PluginEntry, error: BaseException | str) -> None:
    """Print one line naming the plug-in's distribution and the error (once per process)."""
    cause = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    line = f"mocolab: warning: {entry.describe()} is skipped: {cause}".splitlines()[0]
    if line not in _reported:
        _reported.add(line)
        print(line, file=sys.stderr)


def module_path(name: str) -> Path | None:
    """Where the source of module ``name`` is (a ``.py`` file, or a package's folder), found
    without importing it or its parent packages; ``None`` when it is not installed."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations is not None:
        folders = [Path(p) for p in spec.submodule_search_locations]
        path: Path | None = folders[0] if folders else None
    else:
        folders, path = [], Path(spec.origin) if spec.origin else None
    for part in rest:
        path = None
        for folder in folders:
            if (folder / part).is_dir():
                path, folders = folder / part, [folder / part]
                break
            if (folder / f"{part}.py").is_file():
                path, folders = folder / f"{part}.py", []
                break
        if path is None:
            return None
    return path


def preset_dirs() -> list[tuple[Path, PluginEntry]]:
    """The folders of presets that plug-ins declare (group ``mocolab.presets``); one that is
    missing is reported and skipped."""
    found = []
    for entry in entries(PRESETS_GROUP):
        path = module_path(entry.module)
        if path is None or not path.is_dir():
            report_broken(entry, f"its presets folder {entry.module!r} was not found")
            continue
        found.append((path, entry))
    return found
