"""``opt``: an options dataclass's field with its command-line help text (and its choices).

A leaf (it imports nothing from mocolab), so the run-level config and every method's options
declare their fields the same way without importing each other: the flags, the YAML keys and
their help come from one declaration.

>>> from dataclasses import dataclass, fields
>>> @dataclass
... class Options:
...     temperature: float = opt(0.2, "τ of the softmax")
>>> Options().temperature, fields(Options)[0].metadata["help"]
(0.2, 'τ of the softmax')

An option with a fixed set of values names them (``--help`` shows them, the shell completes
them, the command line refuses others); the options' own checks still say why:

>>> @dataclass
... class Schedules:
...     schedule: str = opt("cosine", "cosine | constant", choices=("cosine", "constant"))
>>> fields(Schedules)[0].metadata["choices"]
('cosine', 'constant')
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its command-line help text (one source for both) and, for an
    option with a fixed set of values, those values."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)
