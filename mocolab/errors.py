"""The errors mocolab raises for a user to read: one base, one class per cause.

A leaf module (it imports nothing from mocolab), so every layer can raise them without an
import cycle. Each message names the cause and the fix; the command line prints it on one line
(no traceback) and exits with status 2.

>>> issubclass(ConfigError, MocolabError) and issubclass(ConfigError, ValueError)
True
>>> try:
...     raise DatasetError("no such folder: x; pass --data an existing folder")
... except MocolabError as e:
...     print(e)
no such folder: x; pass --data an existing folder
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "MocolabError",
    "NonFiniteLossError",
    "OutputError",
    "unknown_name",
]


class MocolabError(Exception):
    """The base of every error mocolab raises about its input or a run's state."""


class ConfigError(MocolabError, ValueError):
    """An option has an invalid value; the message names the option and the fix."""


class CheckpointError(MocolabError, ValueError):
    """A checkpoint is missing, corrupt, unsafe or of another kind; the message says which."""


class DatasetError(MocolabError, ValueError):
    """A dataset could not be found, read or used; the message names the cause and the fix."""


class NonFiniteLossError(MocolabError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class OutputError(MocolabError, RuntimeError):
    """A file could not be written (a full or read-only disk); the message names the file, the
    space needed and what was kept. The command line exits with status 74 (``EX_IOERR``)."""


def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
    """The message for a name that is not among ``known``: the closest one, then all of them.

    >>> unknown_name("--method", "mocov4", ["mocov1", "mocov2", "simclr"])
    "--method 'mocov4' is not known (did you mean mocov2?); choose one of mocov1, mocov2, simclr"
    """
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{what} {name!r} is not known{hint}; choose one of {', '.join(known)}"
