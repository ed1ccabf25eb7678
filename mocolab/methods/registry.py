"""The method registry: each method module registers itself, as timm's ``@register_model``.

A method module declares

- a dataclass of its own options (a subclass of :class:`MethodOptions`) whose defaults are its
  paper's, with a ``validate(cfg)`` for the checks that involve them;
- a builder, decorated with :func:`register_method`, that makes the method from its backbone,
  the run-level :class:`~mocolab.config.PretrainConfig` and its options;
- in the decorator, its defaults for the run-level options it sizes (``dim``, ``head_layers``,
  ``augment`` — its view recipes —, ``lr_schedule``), which its presets may override.

Every module of :mod:`mocolab.methods` is imported by :func:`load_methods`, so a new method is
one new module (plus its presets and tests): no list of names to extend anywhere else. So are
the modules that installed plug-in distributions declare under the entry-point group
``mocolab.methods`` (:mod:`mocolab.plugins`): their methods register the same way. The CLI
flags of a method's options are generated from its dataclass, as the run-level ones are from
``PretrainConfig``; a flag that several methods declare has one type and one meaning (one help
text), each method keeping its paper's default (``tests/test_registry.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import plugins
from ..backbones import is_vit
from ..errors import ConfigError, unknown_name
from ..option import opt

if TYPE_CHECKING:
    from torch import nn

    from ..config import PretrainConfig
    from .base import Method


@dataclass
class MethodOptions:
    """The options of one method (a subclass per method; its defaults are the paper's)."""

    def validate(self, cfg: PretrainConfig) -> None:
        """Raise :class:`~mocolab.config.ConfigError` naming the first invalid option."""


@dataclass
class BuildContext:
    """What a builder may need beyond the config: the training set's size (memory banks), the
    inputs' normalisation (CMC's Lab split) and the crop side (a ViT's position embedding)."""

    num_images: int | None = None
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    image_size: int | None = None


Builder = Callable[["nn.Module", "PretrainConfig", Any, BuildContext], "Method"]
BackboneBuilder = Callable[[Mapping[str, Any], int, str, int, int], "nn.Module"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, options class, builder and defaults for run-level options.

    Attributes:
        name: the ``--method`` value.
        options: the dataclass of its own options.
        build: ``build(backbone, cfg, options, ctx) -> Method``.
        defaults: its values for run-level options left unset (``dim``, ``head_layers``,
            ``augment``, ``lr_schedule``, ...).
        renamed: old option names still read from old presets and checkpoints, mapped to
            the new ones (a deprecation warning for presets and flags).
        backbone: ``backbone(config, in_channels, stem, width, bn_splits)`` when the method
            trains its own kind of backbone (CMC's two ResNets, CPC's patch grid); ``None``:
            the ``--arch`` backbone.
        summary: one line for ``--help``.
    """

    name: str
    options: type[MethodOptions]
    build: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    backbone: BackboneBuilder | None = None
    summary: str = ""

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]


_REGISTRY: dict[str, MethodSpec] = {}
_ORIGINS: dict[str, str] = {}  # method name -> the plug-in distribution that registered it
_plugins_loaded = False


def register_method(
    name: str,
    *,
    options: type[MethodOptions],
    defaults: Mapping[str, Any] | None = None,
    renamed: Mapping[str, str] | None = None,
    backbone: BackboneBuilder | None = None,
    summary: str = "",
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as ``--method name`` (see :class:`MethodSpec`)."""

    def decorate(build: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(
            name, options, build, dict(defaults or {}), dict(renamed or {}), backbone, summary
        )
        return build

    return decorate


def load_methods() -> dict[str, MethodSpec]:
    """Import every module of :mod:`mocolab.methods` (each registers its methods), then the
    plug-ins' (:mod:`mocolab.plugins`); the registry. A plug-in that fails to import (or
    registers a name already taken) is reported on one line and skipped."""
    global _plugins_loaded
    package = importlib.import_module(__package__ or "mocolab.methods")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in plugins.entries(plugins.METHODS_GROUP):
            before = set(_REGISTRY)
            try:
                target: Any = importlib.import_module(entry.module)
                for attr in (
                    entry.value.partition(":")[2].strip().split(".") if ":" in entry.value else []
                ):
                    target = getattr(target, attr)
            except Exception as e:  # any error of a third party's code: reported, skipped
                for name in set(_REGISTRY) - before:  # what it registered before failing
                    del _REGISTRY[name]
                plugins.report_broken(entry, e)
                continue
            _ORIGINS.update(dict.fromkeys(set(_REGISTRY) - before, entry.distribution))
    return _REGISTRY


def method_origin(name: str) -> str:
    """The plug-in distribution that provides method ``name``; ``""`` for a built-in one."""
    return _ORIGINS.get(name, "")


def method_names() -> list[str]:
    """The registered ``--method`` values, in registration order."""
    return list(load_methods())


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; a :class:`~mocolab.config.ConfigError` naming the
    registered ones otherwise."""
    registry = load_methods()
    if name not in registry:
        raise ConfigError(unknown_name("--method", name, sorted(registry)))
    return registry[name]


def owners(option: str) -> list[str]:
    """The methods that have an option named ``option``."""
    return [n for n, s in load_methods().items() if option in s.option_names()]


def split_options(
    method: str, values: Mapping[str, Any], shared: set[str], *, strict: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route flat ``values`` (a preset, flags, a checkpoint's config) to the run-level options
    (names in ``shared``) and ``method``'s own. Old names of the method's options are renamed
    (with a ``FutureWarning``, shown to users, when ``strict``). An option of another method,
    or of none, is
    a :class:`~mocolab.config.ConfigError` naming it and the method when ``strict``, and
    dropped otherwise (a checkpoint written before the registry holds every method's options)."""
    spec = get_method(method)
    own = set(spec.option_names())
    run: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in values.items():
        if key in shared:
            run[key] = value
        elif key in own:
            options[key] = value
        elif key in spec.renamed:
            new = spec.renamed[key]
            if strict:
                warnings.warn(
                    f"{method}: option {key!r} is now {new!r} (--{new.replace('_', '-')}); "
                    "the old name will be removed",
                    FutureWarning,
                    stacklevel=3,
                )
            options.setdefault(new, value)
        elif strict:
            others = owners(key)
            where = f"it is an option of {', '.join(others)}" if others else "no method has it"
            raise ConfigError(
                f"option {key!r} (--{key.replace('_', '-')}) is not an option of "
                f"--method {method}: {where}; see mocolab pretrain --method {method} --help"
            )
    return run, options


# -- option declarations shared by several methods: one name, one type, one help text ----------
def temperature(default: float) -> Any:
    return opt(default, "τ of the loss's softmax (each method's paper's value)")


def key_momentum(default: float) -> Any:
    return opt(
        default, "m of the momentum (key / target / teacher) encoder EMA, θk ← m·θk + (1−m)·θq"
    )


def momentum_schedule(default: str) -> Any:
    return opt(
        default,
        "constant (MoCo v1/v2) | cosine (m ramped to 1: BYOL, MoCo v3, DINO) | "
        "linear (m ramped linearly to 1: I-JEPA, MSN)",
        choices=("constant", "cosine", "linear"),
    )


def queue_size(default: int) -> Any:
    return opt(default, "K, the number of keys in the queue (65536 on ImageNet)")


def predictor_hidden_dim(default: int | None) -> Any:
    return opt(default, "predictor hidden width (BYOL, MoCo v3: the head's; SimSiam: dim/4)")


def nce_k(default: int) -> Any:
    return opt(
        default,
        "memory-bank entries drawn as noise per batch (InstDisc 4096; CMC 16384; PIRL 32000)",
    )


def bank_momentum(default: float) -> Any:
    return opt(default, "λ of the memory-bank update v ← normalize(λv + (1−λ)f) (0.5)")


def bank_loss(default: str) -> Any:
    return opt(
        default,
        "memory-bank objective: nce (the papers') | softmax (InfoNCE over the same "
        "entries; CMC's later default)",
        choices=("nce", "softmax"),
    )


def num_local_crops(default: int) -> Any:
    return opt(default, "multi-crop: small views besides the 2 large ones (SwAV 6, DINO 8)")


def check(ok: bool, message: str) -> None:
    """Raise :class:`~mocolab.config.ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def check_positive(name: str, value: float | None) -> None:
    """``value`` is ``None`` (the default) or > 0."""
    check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")


def check_momentum(m: float, schedule: str) -> None:
    check(0.0 <= m <= 1.0, f"--key-momentum must be in [0, 1] (0.999 in MoCo), got {m}")
    check(
        schedule in ("constant", "cosine", "linear"),
        f"--momentum-schedule must be constant, cosine or linear, got {schedule!r}",
    )


def check_vit(cfg: PretrainConfig, method: str) -> None:
    """The run's ``--arch`` is a Vision Transformer (the masked-image methods drop patch tokens)."""
    check(
        is_vit(cfg.arch),
        f"--method {method} masks a ViT's patch tokens; choose --arch vit_tiny, vit_small or "
        f"vit_base (not {cfg.arch})",
    )


def check_temperature(t: float) -> None:
    check(t > 0, f"--temperature must be > 0 (0.2 for MoCo v2), got {t}")
