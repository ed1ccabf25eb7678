"""``opt``: an options dataclass's field with its command-line help text.

A leaf (it imports nothing from mocolab), so the run-level config and every method's options
declare their fields the same way without importing each other: the flags, the YAML keys and
their help come from one declaration.

>>> from dataclasses import dataclass, fields
>>> @dataclass
... class Options:
...     temperature: float = opt(0.2, "τ of the softmax")
>>> Options().temperature, fields(Options)[0].metadata["help"]
(0.2, 'τ of the softmax')
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A config field with its command-line help text (one source for both)."""
    return field(default=default, metadata={"help": help})
