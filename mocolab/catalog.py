"""The methods and their options as the command line shows them, read without importing torch.

``mocolab pretrain --help``, ``--method NAME --help`` and the shell completion need each
method's name, one-line summary, the run-level options it sets, and its own options (type,
default, help text, choices) — not the method. The method modules import torch at their top
(a second or more), so this module reads those declarations from the modules' source, with
:mod:`ast`: the options dataclass, the ``opt(...)`` fields (through the helpers that return
one, such as ``registry.temperature(0.2)``), base classes in other modules, module constants,
and the ``register_method(...)`` call. Nothing is listed by hand, so a new method module (or a
plug-in's, :mod:`mocolab.plugins`) is read as soon as it exists; a declaration the reader
cannot evaluate without running code makes it import the registry instead (correct, slower).
``tests/test_help.py`` checks that the two agree for every registered method.

A method module keeps its declarations static to stay fast: literals, names of module
constants, ``opt(...)`` and functions whose body is one ``return`` of such an expression.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import operator
import pkgutil
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plugins

PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class OptionInfo:
    """One option as a flag: ``--name`` of ``kind`` (``bool``, ``int``, ``float``, ``str`` or
    ``floats``, a list of numbers), its default, help text and allowed values (if a fixed set)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MethodInfo:
    """A method as the command line shows it.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``--help``.
        options: its own options, in declaration order.
        defaults: its values for run-level options left unset (``dim``, ``augment``, ...).
        renamed: old option names still accepted, mapped to the new ones.
        origin: the plug-in distribution that provides it; ``""`` for a built-in method.
    """

    name: str
    summary: str
    options: tuple[OptionInfo, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    origin: str = ""


# -- from the imported classes --------------------------------------------------------------------

_ANNOTATION_NAMES: dict[str, Any] = {
    "Optional": typing.Optional,
    "Union": typing.Union,
    "Literal": typing.Literal,
    "Tuple": typing.Tuple,  # noqa: UP006 (an annotation a plug-in may still write)
}


def option_kind(annotation: Any) -> str:
    """The flag kind of a field annotation (a type or, under ``from __future__ import
    annotations``, its text): ``int | None`` → ``"int"``, ``tuple[float, ...]`` → ``"floats"``."""
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, {**vars(builtins), **_ANNOTATION_NAMES})
        except Exception:
            return "str"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if members else str
    origin = typing.get_origin(annotation)
    if origin is tuple or origin is list:
        items = typing.get_args(annotation)
        return {int: "ints", str: "strs"}.get(items[0] if items else float, "floats")
    if origin is typing.Literal:
        return "str"
    if annotation in (bool, int, float, str):
        return str(annotation.__name__)
    return "str"


def options_of(config_class: type) -> tuple[OptionInfo, ...]:
    """The flags of an options dataclass (fields with ``flag: False`` metadata left out)."""
    found = []
    for f in dataclasses.fields(config_class):
        if not f.metadata.get("flag", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        found.append(
            OptionInfo(
                f.name,
                option_kind(f.type),
                default,
                f.metadata.get("help", ""),
                tuple(choices) if choices is not None else None,
            )
        )
    return tuple(found)


def describe(spec: Any, origin: str = "") -> MethodInfo:
    """The :class:`MethodInfo` of a registered :class:`~mocolab.methods.registry.MethodSpec`."""
    return MethodInfo(
        spec.name,
        spec.summary,
        options_of(spec.options),
        dict(spec.defaults),
        dict(spec.renamed),
        origin,
    )


def from_registry() -> dict[str, MethodInfo]:
    """Every registered method (built-in and plug-in), from the imported registry (torch)."""
    from .methods.registry import load_methods, method_origin

    return {name: describe(spec, method_origin(name)) for name, spec in load_methods().items()}


def methods(fast: bool) -> dict[str, MethodInfo]:
    """Every method: read from the sources when ``fast`` and the registry is not imported yet
    (the imported registry otherwise, and where a source is not static)."""
    import sys

    if fast and "mocolab.methods.registry" not in sys.modules:
        try:
            return read_methods()
        except NotStatic:
            pass
    return from_registry()


# -- from the sources -------------------------------------------------------------------------------


class NotStatic(Exception):
    """A declaration that cannot be evaluated without running its module."""


@dataclass(frozen=True)
class _External:
    """A name from a module that is not read (the standard library, torch, ...)."""

    module: str
    name: str


@dataclass(frozen=True)
class _ModuleRef:
    name: str


@dataclass(frozen=True)
class _Def:
    """A function or class defined in a module that is read."""

    module: str
    node: ast.FunctionDef | ast.ClassDef = field(compare=False)
    name: str


@dataclass(frozen=True)
class _Field:
    """What ``opt(...)`` or ``dataclasses.field(...)`` evaluates to."""

    default: Any
    help: str
    choices: tuple[str, ...] | None
    flag: bool = True


_OPT = ("mocolab.option", "opt")
_REGISTER = ("mocolab.methods.registry", "register_method")
_BUILTINS: dict[str, Any] = {
    name: getattr(builtins, name)
    for name in (
        "abs", "bool", "dict", "float", "frozenset", "int", "len", "list", "max", "min",
        "range", "round", "set", "sorted", "str", "sum", "tuple", "zip",
    )
}  # fmt: skip
_PURE_METHODS = {
    (str, n) for n in ("join", "format", "lower", "upper", "replace", "strip", "split", "title")
} | {(dict, "get"), (dict, "keys"), (dict, "values"), (dict, "items")}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitOr: operator.or_,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


class _Module:
    """A module's top-level bindings, from its source."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.is_package = path.name == "__init__.py"
        try:
            text = path.read_text(encoding="utf-8")
            self.tree = ast.parse(text, str(path))
            self.lines = text.splitlines(keepends=True)
        except (OSError, SyntaxError, ValueError) as e:
            raise NotStatic(f"{path}: {e}") from None
        self.bindings: dict[str, Any] = {}
        for stmt in self.tree.body:
            self._bind(stmt)

    def _bind(self, stmt: ast.stmt) -> None:
        bind = self.bindings
        if isinstance(stmt, ast.Import):
            for a in stmt.names:
                if a.asname:
                    bind[a.asname] = ("module", a.name)
                else:
                    top = a.name.split(".")[0]
                    bind[top] = ("module", top)
        elif isinstance(stmt, ast.ImportFrom):
            base = self.absolute(stmt.module, stmt.level)
            for a in stmt.names:
                if a.name != "*":
                    bind[a.asname or a.name] = ("from", base, a.name)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in _target_names(target):
                    bind[name] = ("expr", stmt.value) if isinstance(target, ast.Name) else None
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if stmt.value is not None:
                bind[stmt.target.id] = ("expr", stmt.value)
        elif isinstance(stmt, ast.AugAssign):
            for name in _target_names(stmt.target):
                bind[name] = None
        elif isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            bind[stmt.name] = ("def", stmt)
        elif isinstance(stmt, ast.AsyncFunctionDef):
            bind[stmt.name] = None
        elif isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            pass  # imports for annotations only
        else:  # names bound under if / try / for / with: known only by running the module
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    bind[node.id] = None
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.alias)):
                    bind[getattr(node, "asname", None) or node.name.split(".")[0]] = None

    def absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        parts = self.name.split(".")
        if not self.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - level + 1]
        return ".".join(parts + ([module] if module else []))


def _target_names(target: ast.expr) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


class _Reader:
    """Evaluates the declarations of the modules under ``roots`` (mocolab's and a plug-in's
    top-level packages) from their source; any other module's names stay opaque."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = set(roots) | {"mocolab"}
        self.modules: dict[str, _Module | None] = {}
        self.values: dict[tuple[str, str], Any] = {}
        self.classes: dict[tuple[str, str], dict[str, OptionInfo]] = {}

    # modules and names
    def module(self, name: str) -> _Module | None:
        """The module ``name`` if it is read (under ``roots``) and exists, else ``None``."""
        if name.split(".")[0] not in self.roots:
            return None
        if name not in self.modules:
            path = self._path(name)
            self.modules[name] = _Module(name, path) if path is not None else None
        return self.modules[name]

    @staticmethod
    def _path(name: str) -> Path | None:
        if name == "mocolab" or name.startswith("mocolab."):
            path: Path | None = PACKAGE.parent.joinpath(*name.split("."))
        else:
            path = plugins.module_path(name)
        if path is None:
            return None
        if path.is_dir():
            return path / "__init__.py" if (path / "__init__.py").is_file() else None
        if path.suffix == ".py" and path.is_file():
            return path
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py")
        return None

    def lookup(self, module: str, name: str) -> Any:
        """The value of ``module.name``: its top-level binding, else its submodule."""
        key = (module, name)
        if key in self.values:
            if self.values[key] is _PENDING:
                raise NotStatic(f"{module}.{name} refers to itself")
            return self.values[key]
        mod = self.module(module)
        if mod is None:
            if module.split(".")[0] in self.roots:
                raise NotStatic(f"module {module} not found")
            return _External(module, name)
        self.values[key] = _PENDING
        try:
            value = self._binding(mod, name)
        finally:
            self.values.pop(key, None)
        self.values[key] = value
        return value

    def _binding(self, mod: _Module, name: str) -> Any:
        if name not in mod.bindings:
            if mod.is_package and self.module(f"{mod.name}.{name}") is not None:
                return _ModuleRef(f"{mod.name}.{name}")
            raise NotStatic(f"{mod.name} has no static name {name!r}")
        binding = mod.bindings[name]
        if binding is None:
            raise NotStatic(f"{mod.name}.{name} is bound by code that must run")
        kind = binding[0]
        if kind == "module":
            return self._module_value(binding[1])
        if kind == "from":
            base, attr = binding[1], binding[2]
            if self.module(base) is None and base.split(".")[0] not in self.roots:
                return _External(base, attr)
            return self.lookup(base, attr)
        if kind == "def":
            return _Def(mod.name, binding[1], name)
        return self.eval(binding[1], mod, {})

    def _module_value(self, name: str) -> Any:
        if self.module(name) is not None:
            return _ModuleRef(name)
        if name.split(".")[0] in self.roots:
            raise NotStatic(f"module {name} not found")
        return _External(name, "")

    # expressions
    def eval(self, node: ast.expr, mod: _Module, local: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in local:
                return local[node.id]
            if node.id in mod.bindings:
                return self.lookup(mod.name, node.id)
            if node.id in _BUILTINS:
                return _BUILTINS[node.id]
            raise NotStatic(f"{mod.name}: unknown name {node.id!r}")
        if isinstance(node, ast.Attribute):
            return self._attribute(self.eval(node.value, mod, local), node.attr)
        if isinstance(node, ast.Call):
            return self._call(node, mod, local)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items: list[Any] = []
            for elt in node.elts:
                if isinstance(elt, ast.Starred):
                    items.extend(self.eval(elt.value, mod, local))
                else:
                    items.append(self.eval(elt, mod, local))
            kind = {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)]
            return kind(items)
        if isinstance(node, ast.Dict):
            out: dict[Any, Any] = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(self.eval(v, mod, local))
                else:
                    out[self.eval(k, mod, local)] = self.eval(v, mod, local)
            return out
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.eval(node.left, mod, local), self.eval(node.right, mod, local)
            return _BINARY[type(node.op)](_plain(left), _plain(right))
        if isinstance(node, ast.UnaryOp):
            value = _plain(self.eval(node.operand, mod, local))
            ops: dict[type, Callable[[Any], Any]] = {
                ast.USub: operator.neg,
                ast.UAdd: operator.pos,
                ast.Not: operator.not_,
            }
            if type(node.op) in ops:
                return ops[type(node.op)](value)
        if isinstance(node, ast.BoolOp):
            value = None
            for v in node.values:
                value = _plain(self.eval(v, mod, local))
                if isinstance(node.op, ast.And) != bool(value):
                    return value
            return value
        if isinstance(node, ast.Compare) and all(type(o) in _COMPARE for o in node.ops):
            left = _plain(self.eval(node.left, mod, local))
            for op, right_node in zip(node.ops, node.comparators):
                right = _plain(self.eval(right_node, mod, local))
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            test = _plain(self.eval(node.test, mod, local))
            return self.eval(node.body if test else node.orelse, mod, local)
        if isinstance(node, ast.Subscript):
            value = _plain(self.eval(node.value, mod, local))
            return value[_plain(self._slice(node.slice, mod, local))]
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    value = _plain(self.eval(v.value, mod, local))
                    convert: dict[int, Callable[[Any], str]] = {115: str, 114: repr, 97: ascii}
                    if v.conversion != -1:
                        value = convert[v.conversion](value)
                    spec = "" if v.format_spec is None else self.eval(v.format_spec, mod, local)
                    parts.append(format(value, spec))
                else:
                    parts.append(_plain(self.eval(v, mod, local)))
            return "".join(parts)
        raise NotStatic(f"{mod.name}: {ast.unparse(node)!r} is not a static expression")

    def _slice(self, node: ast.expr, mod: _Module, local: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Slice):
            bound = [None if b is None else self.eval(b, mod, local) for b in
                     (node.lower, node.upper, node.step)]  # fmt: skip
            return slice(*bound)
        return self.eval(node, mod, local)

    def _attribute(self, value: Any, attr: str) -> Any:
        if isinstance(value, _ModuleRef):
            return self.lookup(value.name, attr)
        if isinstance(value, _External):
            return _External(value.module, f"{value.name}.{attr}".lstrip("."))
        if (type(value), attr) in _PURE_METHODS:
            return getattr(value, attr)
        raise NotStatic(f"attribute {attr!r} of {type(value).__name__} is not static")

    def _call(self, node: ast.Call, mod: _Module, local: Mapping[str, Any]) -> Any:
        func = self.eval(node.func, mod, local)
        args: list[Any] = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                args.extend(_plain(self.eval(a.value, mod, local)))
            else:
                args.append(self.eval(a, mod, local))
        kwargs: dict[str, Any] = {}
        for k in node.keywords:
            if k.arg is None:
                kwargs.update(_plain(self.eval(k.value, mod, local)))
            else:
                kwargs[k.arg] = self.eval(k.value, mod, local)
        if isinstance(func, _Def) and (func.module, func.name) == _OPT:
            bound = _bind(["default", "help", "choices"], args, kwargs, {"choices": None})
            choices = bound["choices"]
            return _Field(bound["default"], bound["help"], None if choices is None else
                          tuple(choices))  # fmt: skip
        if func == _External("dataclasses", "field"):
            if "default_factory" in kwargs:
                raise NotStatic("a default_factory is not a static default")
            metadata = kwargs.get("metadata") or {}
            choices = metadata.get("choices")
            return _Field(
                kwargs.get("default"),
                metadata.get("help", ""),
                None if choices is None else tuple(choices),
                bool(metadata.get("flag", True)),
            )
        if isinstance(func, _Def) and isinstance(func.node, ast.FunctionDef):
            return self._call_function(func, args, kwargs)
        if callable(func) and not isinstance(func, (_Def, _External, _ModuleRef)):
            return func(*map(_plain, args), **{k: _plain(v) for k, v in kwargs.items()})
        raise NotStatic(f"{mod.name}: the call {ast.unparse(node)!r} is not static")

    def _call_function(self, func: _Def, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """A function whose body is one ``return`` (after a docstring), called statically."""
        node = func.node
        assert isinstance(node, ast.FunctionDef)
        body = node.body[1:] if _is_docstring(node.body[0]) else node.body
        if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
            raise NotStatic(f"{func.module}.{func.name} is more than one return")
        mod = self.module(func.module)
        assert mod is not None
        a = node.args
        if a.vararg or a.kwarg or a.posonlyargs:
            raise NotStatic(f"{func.module}.{func.name} takes *args or **kwargs")
        names = [p.arg for p in a.args]
        defaults = {p.arg: d for p, d in zip(a.args[len(a.args) - len(a.defaults) :], a.defaults)}
        defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
        evaluated = {k: self.eval(v, mod, {}) for k, v in defaults.items()}
        local = _bind(names + [p.arg for p in a.kwonlyargs], args, kwargs, evaluated)
        return self.eval(body[0].value, mod, local)

    # classes and registrations
    def options(self, cls: Any) -> dict[str, OptionInfo]:
        """The flag fields of the dataclass ``cls`` (a :class:`_Def`), bases' first."""
        if not (isinstance(cls, _Def) and isinstance(cls.node, ast.ClassDef)):
            raise NotStatic(f"{cls!r} is not a class of a module that is read")
        key = (cls.module, cls.name)
        if key in self.classes:
            return self.classes[key]
        mod = self.module(cls.module)
        assert mod is not None
        node = cls.node
        fields: dict[str, OptionInfo] = {}
        for base in reversed(node.bases):
            fields.update(self.options(self.eval(base, mod, {})))
        if any(self._is_dataclass(d, mod) for d in node.decorator_list):
            for stmt in node.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                annotation = ast.unparse(stmt.annotation)
                if "ClassVar" in annotation or "InitVar" in annotation:
                    continue
                name = stmt.target.id
                value = None if stmt.value is None else self.eval(stmt.value, mod, {})
                if not isinstance(value, _Field):
                    value = _Field(value, "", None)
                if not value.flag:
                    fields.pop(name, None)
                    continue
                fields[name] = OptionInfo(
                    name, option_kind(annotation), value.default, value.help, value.choices
                )
        self.classes[key] = fields
        return fields

    def _is_dataclass(self, decorator: ast.expr, mod: _Module) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        try:
            value = self.eval(target, mod, {})
        except NotStatic:
            return False
        return value == _External("dataclasses", "dataclass")

    def registrations(self, module: str, origin: str) -> list[MethodInfo]:
        """The methods ``module`` registers with ``register_method(...)`` at its top level."""
        mod = self.module(module)
        if mod is None:
            raise NotStatic(f"module {module} not found")
        calls: list[ast.Call] = []
        for stmt in mod.tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
                calls += [d for d in stmt.decorator_list if isinstance(d, ast.Call)]
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                calls.append(stmt.value.func if isinstance(stmt.value.func, ast.Call) else
                             stmt.value)  # fmt: skip
        found = []
        for call in calls:
            try:
                func = self.eval(call.func, mod, {})
            except NotStatic:
                continue
            if not (isinstance(func, _Def) and (func.module, func.name) == _REGISTER):
                continue
            found.append(self._registration(call, mod, origin))
        if self._mentions(mod) != len(found):
            raise NotStatic(f"{module} calls register_method in a way that must run")
        return found

    @staticmethod
    def _mentions(mod: _Module) -> int:
        """How many times the module's code names ``register_method`` (outside imports)."""
        count = 0
        for stmt in mod.tree.body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                continue
            first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            if "register_method" not in "".join(mod.lines[first - 1 : stmt.end_lineno]):
                continue  # the text first: walking every statement's tree is slow
            count += sum(
                1
                for node in ast.walk(stmt)
                if (isinstance(node, ast.Name) and node.id == "register_method")
                or (isinstance(node, ast.Attribute) and node.attr == "register_method")
            )
        return count

    def _registration(self, call: ast.Call, mod: _Module, origin: str) -> MethodInfo:
        args = [self.eval(a, mod, {}) for a in call.args]
        kwargs = {k.arg: k.value for k in call.keywords if k.arg is not None}
        if len(args) != 1 or len(kwargs) != len(call.keywords) or "options" not in kwargs:
            raise NotStatic(f"{mod.name}: register_method({ast.unparse(call)}) is not static")

        def value(key: str, default: Any) -> Any:
            return self.eval(kwargs[key], mod, {}) if key in kwargs else default

        options = self.options(self.eval(kwargs["options"], mod, {}))
        return MethodInfo(
            str(args[0]),
            str(value("summary", "")),
            tuple(options.values()),
            dict(value("defaults", None) or {}),
            dict(value("renamed", None) or {}),
            origin,
        )


_PENDING = object()


def _plain(value: Any) -> Any:
    if isinstance(value, (_External, _ModuleRef, _Def, _Field)):
        raise NotStatic(f"{value!r} is not a plain value")
    return value


def _bind(
    names: list[str], args: list[Any], kwargs: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    if len(args) > len(names) or set(kwargs) - set(names):
        raise NotStatic("a call with arguments the function does not take")
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    if set(names) - set(bound):
        raise NotStatic("a call without all of the function's arguments")
    return bound


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _method_modules(path: Path, name: str) -> list[str]:
    """The module ``name`` at ``path`` and, for a package, every module inside it."""
    if path.is_file():
        return [name]
    found = [name] if (path / "__init__.py").is_file() else []
    for info in pkgutil.iter_modules([str(path)]):
        found += _method_modules(_source(path / info.name), f"{name}.{info.name}")
    return found


def _source(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    raise NotStatic(f"{path} has no Python source")


@functools.lru_cache(maxsize=1)
def read_methods() -> dict[str, MethodInfo]:
    """Every method, built-in and plug-in, read from the sources (no method module is imported).

    Raises:
        NotStatic: a module declares something that only running it tells.
    """
    found: dict[str, MethodInfo] = {}
    folder = PACKAGE / "methods"
    builtin = [
        m
        for info in pkgutil.iter_modules([str(folder)])
        for m in _method_modules(_source(folder / info.name), f"mocolab.methods.{info.name}")
    ]
    reader = _Reader([])
    for module in builtin:
        for info in reader.registrations(module, ""):
            found[info.name] = info
    for entry in plugins.entries(plugins.METHODS_GROUP):
        path = plugins.module_path(entry.module)
        if path is None:
            raise NotStatic(f"{entry.describe()}: module not found")  # the import reports it
        plugin_reader = _Reader([entry.module.split(".")[0]])
        for module in _method_modules(path, entry.module):
            for info in plugin_reader.registrations(module, entry.distribution):
                if info.name in found:
                    raise NotStatic(f"{info.name} registered twice")  # the import reports it
                found[info.name] = info
    return found
