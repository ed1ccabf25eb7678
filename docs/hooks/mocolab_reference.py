"""MkDocs hook: the reference pages generated at build time from the package itself.

* ``reference/api.md``: one mkdocstrings entry per public name (``mocolab.__all__``) and per
  part module a user composes; the docstrings are the text.
* ``reference/cli.md``: the ``--help`` of every ``mocolab`` command, printed by the parsers.
* ``changelog.md``: the repository's ``CHANGELOG.md``.

A page marks where the generated text goes with an HTML comment (``<!-- generated: api -->``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# The modules of parts a user composes into a method, or calls on a run (the rest of the
# package — the loop's internals, the CLI — is reached through these and the top level).
PART_MODULES = (
    "mocolab.augment",
    "mocolab.backbones",
    "mocolab.heads",
    "mocolab.dictionaries",
    "mocolab.momentum",
    "mocolab.distributed",
    "mocolab.losses",
    "mocolab.masking",
    "mocolab.methods",
    "mocolab.evaluate",
    "mocolab.encoder",
    "mocolab.checkpoint",
    "mocolab.export",
    "mocolab.embed",
    "mocolab.utilisation",
)

def public_names() -> list[str]:
    """The names a user imports from ``mocolab``."""
    import mocolab

    return list(mocolab.__all__)


def _target(obj: Any) -> str | None:
    """The dotted path where ``obj`` is defined (for mkdocstrings), or None for a plain value."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        return f"{module}.{qualname}"
    return None


def _fields_table(obj: Any) -> list[str]:
    """A dataclass of options (fields made by ``mocolab.option.opt``, with a help text): its
    fields as a table, from the dataclass itself."""
    import dataclasses

    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        return []
    rows = []
    for f in dataclasses.fields(obj):
        help_ = f.metadata.get("help")
        if help_ is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "—"
        cell = str(help_).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{f.name}` | `{default!r}` | {cell} |")
    if not rows:
        return []
    return ["", "| field | default | meaning |", "|---|---|---|", *rows, ""]


def api_markdown() -> str:
    """The body of the API reference: the top-level names, then the part modules."""
    import mocolab

    out = ["## The `mocolab` package", ""]
    seen: dict[str, str] = {}
    for name in public_names():
        obj = getattr(mocolab, name)
        target = _target(obj)
        anchor = f'<a id="mocolab.{name}"></a>'
        if target is None:
            out += [anchor, "", f"### `mocolab.{name}`", "", f"`{obj!r}`", ""]
        elif target in seen:
            first = seen[target]
            out += [anchor, "", f"### {name}", "",
                    f"The same object as [`mocolab.{first}`](#mocolab.{first}).", ""]  # fmt: skip
        else:
            seen[target] = name
            table = _fields_table(obj)
            out += [anchor, "", f"::: {target}", "    options:", "      heading_level: 3",
                    "      show_root_full_path: false",
                    *(["      show_signature: false"] if table else []), "", *table]  # fmt: skip
    for module in PART_MODULES:
        if module in seen:
            continue
        out += [f"## `{module}`", "", f"::: {module}", "    options:",
                "      show_root_heading: false", "      heading_level: 3", ""]  # fmt: skip
    return "\n".join(out)


def _help(argv: list[str]) -> str:
    """What ``mocolab ARGV --help`` prints, from the package's own parser."""
    from mocolab import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    return buffer.getvalue().rstrip()


def _commands() -> list[list[str]]:
    """Every command line with its own ``--help``: the subcommands, nested (``eval knn``)."""
    import argparse

    from mocolab import cli

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for action in parser._actions:  # argparse keeps subcommands here
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, [*prefix, name])
        return found

    return walk(cli.build_parser(), [])


def _method_names() -> list[str]:
    from mocolab.methods.registry import load_methods

    return sorted(load_methods())


def cli_markdown() -> str:
    """The body of the CLI reference: each command's ``--help``, and each method's options."""
    os.environ["COLUMNS"] = "78"  # argparse wraps help at the terminal width: the page's
    out = []
    for argv in _commands():
        title = " ".join(["mocolab", *argv])
        anchor = "-".join(["mocolab", *argv])
        out += [f"## `{title}` {{ #{anchor} }}", "", "```text", _help(argv), "```", ""]
        if argv == ["pretrain"]:
            out += ["### The methods' own options", "",
                    "`mocolab pretrain --method NAME --help` adds the options of NAME:", ""]  # fmt: skip
            for name in _method_names():
                text = _help(["pretrain", "--method", name])
                own = re.search(rf"^{re.escape(name)} options.*?(?=^\S|\Z)", text, re.S | re.M)
                body = own.group(0).rstrip() if own else f"{name} has no options of its own."
                out += [f"#### `--method {name}` {{ #method-{name} }}", "", "```text", body,
                        "```", ""]  # fmt: skip
    return "\n".join(out)


def changelog_markdown() -> str:
    """The repository's CHANGELOG.md, its first heading dropped (the page has its own)."""
    path = ROOT / "CHANGELOG.md"
    if not path.is_file():
        return "*(The release notes, `CHANGELOG.md`, are not part of this checkout.)*"
    text = path.read_text(encoding="utf-8")
    return re.sub(r"\A# [^\n]*\n", "", text.lstrip())


GENERATORS = {"api": api_markdown, "cli": cli_markdown, "changelog": changelog_markdown}
MARK = re.compile(r"<!-- generated: (\w+) -->")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace each ``<!-- generated: NAME -->`` mark with its generated Markdown."""

    def fill(match: re.Match[str]) -> str:
        return GENERATORS[match.group(1)]()

    return MARK.sub(fill, markdown)


def on_startup(**kwargs: Any) -> None:
    """The package is imported from this checkout (the tree beside ``docs/``)."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    importlib.invalidate_caches()
