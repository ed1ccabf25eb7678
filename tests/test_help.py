"""``mocolab pretrain --help``: fast (no torch), complete (the chosen or default method's own
options, choices, each default once), the same as the registry says for every method; an
unknown method named with the known ones; ``--version``; shell completion."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import pytest

import mocolab
from mocolab import catalog, cli
from mocolab.cli import main
from mocolab.config import ARCHS, PretrainConfig, build_config
from mocolab.errors import ConfigError
from mocolab.option import opt


def _help(argv: list[str]) -> str:
    """The help text of ``mocolab pretrain`` for the command line ``argv``."""
    parser = cli.build_parser(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["pretrain"].format_help()


def test_pretrain_help_imports_no_torch():
    code = (
        "import sys\n"
        "from mocolab.cli import main\n"
        "for argv in (['pretrain', '--help'], ['pretrain', '--method', 'dino', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "import mocolab\n"
        "print(mocolab.__version__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')"
        " or m.startswith('mocolab.methods')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *text, version, imported = out.stdout.strip().splitlines()
    assert imported == "[]", f"--help imported {imported}"
    assert version == mocolab.__version__
    text = "\n".join(text)
    assert "mocov2 options" in text and "--queue-size" in text  # the default method's own
    assert "dino options" in text and "--teacher-temperature" in text


def test_every_method_reads_from_its_source_as_it_registers(monkeypatch):
    """The fast help (the sources read) and the registry (the modules imported) agree on
    every registered method: its options with their kinds, defaults, help texts and choices,
    its summary and the run-level options it sets; and so does every help text."""
    static = catalog.read_methods.__wrapped__()  # read again, not a cached copy
    registered = catalog.from_registry()
    assert sorted(static) == sorted(registered)
    for name, info in registered.items():
        assert static[name] == info, name
    for name in sorted(registered):
        texts = []
        for methods in (static, registered):
            monkeypatch.setattr(catalog, "methods", lambda fast, m=methods: m)
            texts.append(_help(["pretrain", "--method", name, "--help"]))
        assert texts[0] == texts[1], name
        assert "(default: None)" not in texts[0], name
        assert f"{name} options" in texts[0]


def test_a_shared_option_has_one_kind_help_and_set_of_choices():
    seen: dict[str, tuple[str, catalog.OptionInfo]] = {}
    for name, info in catalog.read_methods().items():
        for o in info.options:
            if o.name in seen:
                owner, first = seen[o.name]
                assert (o.kind, o.help, o.choices) == (first.kind, first.help, first.choices), (
                    f"--{o.name}: {owner} and {name} differ"
                )
            seen.setdefault(o.name, (name, o))


def test_help_lists_the_methods_options_with_choices_and_each_default_once():
    text = _help(["pretrain", "--method", "dim", "--help"])
    assert "dim options (Deep InfoMax (Hjelm et al. 2019)" in text
    assert "--mi-estimator {jsd,infonce,dv}" in text
    assert "--local-stage {layer1,layer2,layer3,layer4}" in text
    assert "--optimizer {sgd,lars,adamw}" in text and "STR" not in re.sub(r"--\S+ STR", "", text)
    assert "dim sets --dim 64, --head-layers 1, --augment dim, --lr-schedule constant" in text
    flat = " ".join(text.split())  # argparse wraps lines
    # a help text that states its default gets none appended; one that does not gets its value
    assert "(default: the method's, 128; BYOL, MoCo v3 256; SimSiam 2048)" in flat
    assert flat.count("(default: the method's, 128") == 1
    assert "--mi-units INT width of the MI critic networks (1x1 convs on C, on Y) (default: 2048)" in flat
    assert "--data-root STR where built-in datasets are looked for / downloaded --image-size" in flat
    plain = " ".join(_help(["pretrain", "--help"]).split())
    assert "mocov2 options" in plain and "--queue-size INT" in plain  # the default method
    assert "--temperature FLOAT τ of the loss's softmax (each method's paper's value) (default: 0.2)" in plain
    assert "dino DINO (Caron et al. 2021)" in plain  # the list of methods
    preset = " ".join(_help(["pretrain", "--preset", "swav-cifar10", "--help"]).split())
    assert "swav options" in preset and "--sinkhorn-epsilon" in preset


@pytest.mark.parametrize("help_", [["--help"], []])
def test_an_unknown_method_is_an_error_naming_the_close_and_the_known_ones(help_, capsys):
    assert main(["pretrain", "--method", "simclr3", *help_]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--method 'simclr3' is not known (did you mean simclr" in err
    assert "choose one of amdim, byol," in err and "mocov2" in err
    with pytest.raises(ConfigError, match="did you mean mocov"):
        build_config(method="mocov4")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mocolab {mocolab.__version__}"


def test_choices_are_what_validation_accepts():
    """Each choice of an option passes its checks; a value outside them fails them."""
    vit_only = {"mae", "ijepa", "msn", "ibot", "dinov2"}  # methods that mask a ViT's patches

    def build(method: str, name: str, value: object) -> None:
        extra = {"arch": {"patch_size": 4, "crop_size": 16}}.get(name, {}) if str(value).startswith("vit") else {}
        if method in vit_only:
            extra = {"arch": "vit_tiny", "patch_size": 4, "crop_size": 16}
        build_config(method=method, **{name: value}, **extra)

    options = [("mocov2", o) for o in catalog.options_of(PretrainConfig)]
    options += [(m, o) for m, info in catalog.read_methods().items() for o in info.options]
    checked = 0
    for method, o in options:
        if o.choices is None or o.name == "method":
            continue
        for value in o.choices:
            build(method, o.name, value)
        with pytest.raises(ConfigError):
            build(method, o.name, "bogus")
        checked += 1
    assert checked >= 15
    from mocolab.backbones import ARCHS as BACKBONE_ARCHS

    assert ARCHS == BACKBONE_ARCHS


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_knows_every_methods_flags_and_choices(shell, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for flag in ("--queue-size", "--out-dim", "--sinkhorn-epsilon", "--logger", "--k"):
        assert flag in script, flag
    assert "infonce" in script and "tsne" in script  # choices of --mi-estimator, --embedding
    assert "pretrain" in script and "report" in script


def test_completion_without_shtab_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shtab", None)
    assert main(["completion", "bash"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mocolab: error: mocolab completion needs the shtab package: pip install shtab"
    )


def test_options_of_reads_kinds_defaults_and_choices():
    @dataclasses.dataclass
    class Options:
        rate: float = opt(0.5, "a rate")
        mode: str = opt("a", "a | b", choices=("a", "b"))
        size: int | None = opt(None, "a size")
        on: bool = opt(True, "a switch")
        scales: tuple[float, ...] = opt((0.2, 1.0), "a range")

    assert catalog.options_of(Options) == (
        catalog.OptionInfo("rate", "float", 0.5, "a rate"),
        catalog.OptionInfo("mode", "str", "a", "a | b", ("a", "b")),
        catalog.OptionInfo("size", "int", None, "a size"),
        catalog.OptionInfo("on", "bool", True, "a switch"),
        catalog.OptionInfo("scales", "floats", (0.2, 1.0), "a range"),
    )
