"""Options as they enter from YAML (or Python): a loader that refuses duplicate keys, and a
type check of a mapping against any dataclass's field annotations.

YAML guesses types (``32.0`` is a float, ``"no"`` a string, ``.inf`` a number); a dataclass
does not check them. :func:`check_types` does, for any options dataclass, from its
annotations: one line naming the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import sys
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError


def _config_error(message: str) -> Exception:
    return ConfigError(message)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML silently keeps
    the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


MAX_YAML_VALUES = 100_000
"""The most values (scalars, lists, mappings) a YAML file may hold once its aliases are
expanded: options files hold a few hundred; a "billion laughs" file holds billions."""


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML safely, refusing duplicate keys and aliases that expand to more than
    :data:`MAX_YAML_VALUES` values (or into themselves).

    Raises:
        ConfigError: invalid YAML, a duplicate key, too many values after expanding aliases,
            or nesting too deep, in one line naming ``source``.
    """
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None and "line" not in problem else ""
        raise _config_error(f"{source} is not valid YAML: {problem[:200]}{where}") from None
    except RecursionError:
        raise _config_error(f"{source} nests lists or mappings too deeply to be options") from None
    try:
        size = _expanded_size(value, {}, set())
    except RecursionError:
        raise _config_error(f"{source} nests lists or mappings too deeply to be options") from None
    if size > MAX_YAML_VALUES:
        raise _config_error(
            f"{source} expands to more than {MAX_YAML_VALUES} values through its aliases (*name) "
            f"or refers to itself; options files are small: write the values out"
        )
    return value


def _expanded_size(value: Any, memo: dict[int, int], active: set[int]) -> int:
    """The values in ``value`` with every shared (aliased) list or mapping counted each time
    it appears, computed once per object; a cycle counts as more than the limit."""
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key in active:
        return MAX_YAML_VALUES + 1  # an alias inside itself: endless
    if key not in memo:
        active.add(key)
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total = 1
        for item in items:
            total += _expanded_size(item, memo, active)
            if total > MAX_YAML_VALUES:
                break
        active.discard(key)
        memo[key] = total
    return memo[key]


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 6
_SHORT.maxlevel = 2


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` shortened for a one-line message (nested and long values elided, at
    most about ``limit`` characters), computed without expanding ``value``."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Mismatch(Exception):
    pass


_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    type(None): "null (unset)",
}
_PLURALS = {bool: "true or false values", int: "integers", float: "finite numbers", str: "strings"}


def _expected(tp: Any) -> str:
    """``int | None`` → ``'an integer or null (unset)'``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not args:
            return "a list"
        if origin is list or args[-1] is Ellipsis:  # any length, one type
            return f"a list of {_PLURALS.get(args[0], _expected(args[0]))}"
        return f"a list of {len(args)}: " + ", ".join(_expected(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _conform(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (an int for a float field becomes a float, a list for a tuple
    field a tuple), or :class:`_Mismatch`. Annotations it does not know are accepted as is."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _conform(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if (len(args) == 2 and args[1] is Ellipsis) or origin is list:
            items = [_conform(v, args[0]) if args else v for v in value]
        else:
            if len(value) != len(args):
                raise _Mismatch
            items = [_conform(v, a) for v, a in zip(value, args)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise _Mismatch
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise _Mismatch
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch
    return value


def _field_types(dataclass_type: type) -> dict[str, Any]:
    """The fields' annotations as types; one that names a class imported only for the type
    checker (``if TYPE_CHECKING``) is taken as ``Any``."""
    try:
        return typing.get_type_hints(dataclass_type)
    except NameError:
        namespace = vars(sys.modules[dataclass_type.__module__])
        hints: dict[str, Any] = {}
        for f in dataclasses.fields(dataclass_type):
            try:
                hints[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type
            except NameError:
                hints[f.name] = Any
        return hints


def check_types(dataclass_type: type, mapping: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``mapping`` (option name → value, e.g. a YAML preset) against the annotations of
    ``dataclass_type``'s fields, for any dataclass; unknown keys are refused too.

    Returns the values conformed to their fields (ints in float fields as floats, lists in
    tuple fields as tuples).

    Raises:
        ConfigError: one line naming ``source``, the key, the value and the expected type.

    Examples:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Opts:
        ...     lr: float = 0.1
        ...     steps: int | None = None
        >>> check_types(Opts, {"lr": 1, "steps": 3}, "opts.yaml")
        {'lr': 1.0, 'steps': 3}
        >>> check_types(Opts, {"steps": 2.5}, "opts.yaml")
        Traceback (most recent call last):
        ...
        mocolab.errors.ConfigError: opts.yaml: steps: expected an integer or null (unset), ...
    """
    hints = _field_types(dataclass_type)
    known = {f.name for f in dataclasses.fields(dataclass_type)}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _config_error(f"{source}: unknown option {short_repr(key)}{hint}")
        tp = hints[key]
        try:
            out[key] = _conform(value, tp)
        except _Mismatch:
            note = ""
            yes_no = ("yes", "no", "on", "off", "true", "false", "y", "n")
            if (
                "true or false" in _expected(tp)
                and isinstance(value, str)
                and value.lower() in yes_no
            ):
                note = " (write true or false, unquoted)"
            elif isinstance(value, float) and not math.isfinite(value):
                note = " (infinite and NaN values are not allowed)"
            raise _config_error(
                f"{source}: {key}: expected {_expected(tp)}, got {short_repr(value)} "
                f"(a {type(value).__name__}){note}"
            ) from None
    return out
