"""Plug-in methods: a method (its options, help, presets) from another installed distribution,
through the entry-point groups ``mocolab.methods`` and ``mocolab.presets``; a broken plug-in
is one line and leaves the other methods working.

The distributions are built and installed for real (``pip install --target``) into a folder
that a fresh interpreter gets on its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import mocolab

ROOT = Path(mocolab.__file__).resolve().parent.parent

PLAINCLR = '''\
"""PlainCLR: SimCLR without a BN in its projection head (mocolab's README, "Add a method")."""
from dataclasses import dataclass

import torch.nn.functional as F

from mocolab.config import PretrainConfig
from mocolab.heads import projection_head
from mocolab.losses import nt_xent_logits
from mocolab.methods import registry as r
from mocolab.methods.base import LossOutput, Method, encoder
from mocolab.option import opt


class PlainCLR(Method):
    def __init__(self, backbone, *, dim: int, temperature: float, scale: float) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, projection_head(backbone.num_features, dim))
        self.temperature = temperature / scale

    def forward(self, views, generator=None, index=None) -> LossOutput:
        z1, z2 = (F.normalize(self.query_encoder(x), dim=1) for x in views)  # N×C each
        logits, labels = nt_xent_logits(z1, z2, self.temperature)
        return LossOutput(F.cross_entropy(logits, labels))


@dataclass
class PlainCLROptions(r.MethodOptions):
    temperature: float = r.temperature(0.1)  # a flag several methods share: one help text
    logit_scale: float = opt(1.0, "multiplies the logits (a plug-in's own option)")
    pairing: str = opt("views", "views | shuffled", choices=("views", "shuffled"))

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_temperature(self.temperature)
        r.check(self.logit_scale > 0, f"--logit-scale must be > 0, got {self.logit_scale}")


@r.register_method("plainclr", options=PlainCLROptions, summary="PlainCLR (a plug-in)",
                   defaults={"dim": 32, "head_layers": 2, "augment": "simclr"})
def build(backbone, cfg: PretrainConfig, o: PlainCLROptions, ctx: r.BuildContext) -> PlainCLR:
    return PlainCLR(backbone, dim=cfg.dim, temperature=o.temperature, scale=o.logit_scale)
'''

PRESET = dict(method="plainclr", data="synthetic", width=8, stem="compact", batch_size=16,
              bn_splits=2, crop_size=16, epochs=1, threads=1, log_every=1, diagnostics_every=0,
              progress=False, logit_scale=2.0, logger="none")  # fmt: skip


def _distribution(folder: Path, name: str, package: str, files: dict[str, str], entry_points: str) -> Path:
    src = folder / name
    for path, text in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text(text)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1.0"

        [tool.setuptools]
        packages = ["{package}"]

        [tool.setuptools.package-data]
        {package} = ["configs/*.yaml"]
        """)
        + entry_points
    )
    return src


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder with two plug-in distributions installed: mocolab-plainclr (a method and a
    preset) and mocolab-broken (a module that fails to import)."""
    tmp = tmp_path_factory.mktemp("plugins")
    plainclr = _distribution(
        tmp,
        "mocolab-plainclr",
        "mocolab_plainclr",
        {
            "mocolab_plainclr/__init__.py": PLAINCLR,
            "mocolab_plainclr/configs/plainclr-synthetic.yaml": yaml.safe_dump(PRESET),
        },
        '[project.entry-points."mocolab.methods"]\nplainclr = "mocolab_plainclr"\n\n'
        '[project.entry-points."mocolab.presets"]\nplainclr = "mocolab_plainclr.configs"\n',
    )
    broken = _distribution(
        tmp,
        "mocolab-broken",
        "mocolab_broken",
        {"mocolab_broken/__init__.py": 'raise RuntimeError("broken on purpose")\n'},
        '[project.entry-points."mocolab.methods"]\nbroken = "mocolab_broken"\n',
    )
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(plainclr), str(broken)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"},
    )  # fmt: skip
    assert (target / "mocolab_plainclr" / "configs" / "plainclr-synthetic.yaml").is_file()
    return target


def _python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_a_plugins_method_has_its_options_and_presets_in_help_without_torch(site, tmp_path):
    code = textwrap.dedent("""\
        import sys
        from mocolab.cli import main
        for argv in (["pretrain", "--method", "plainclr", "--help"],
                     ["pretrain", "--preset", "plainclr-synthetic", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0
        print("torch" in sys.modules)
        """)
    out = _python(site, code, tmp_path)
    assert out.returncode == 0, out.stderr
    *help_text, torch_loaded = out.stdout.strip().splitlines()
    assert torch_loaded == "False"
    text = " ".join(" ".join(help_text).split())
    assert "plainclr options (PlainCLR (a plug-in), from the plug-in mocolab-plainclr" in text
    assert "--logit-scale FLOAT multiplies the logits (a plug-in's own option) (default: 1.0)" in text
    assert "--pairing {views,shuffled}" in text
    assert "--temperature FLOAT τ of the loss's softmax (each method's paper's value) (default: 0.1)" in text
    assert "plainclr sets --dim 32, --head-layers 2, --augment simclr" in text
    assert "plainclr-synthetic" in text  # the plug-in's preset among --preset's
    assert "plainclr PlainCLR (a plug-in) [plug-in mocolab-plainclr]" in text
    assert text.count("plainclr options") == 2  # by --method, and by the preset's method


def test_a_plugins_method_trains_from_its_preset_and_a_broken_one_is_one_line(site, tmp_path):
    code = textwrap.dedent(f"""\
        from mocolab import catalog
        from mocolab.cli import main
        assert main(["pretrain", "--preset", "plainclr-synthetic", "--max-steps", "3",
                     "--pairing", "shuffled", "--out-dir", {str(tmp_path)!r}, "--run-name", "p",
                     "--no-final-eval"]) == 0
        assert main(["pretrain", "--method", "mocov2", "--print-config"]) == 0
        assert catalog.read_methods()["plainclr"] == catalog.from_registry()["plainclr"]
        assert "broken" not in catalog.from_registry()
        """)
    out = _python(site, code, tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "p"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["method"], config["logit_scale"], config["pairing"], config["dim"]) == (
        "plainclr", 2.0, "shuffled", 32)  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    warnings = [line for line in out.stderr.splitlines() if "mocolab-broken" in line]
    assert warnings == [
        "mocolab: warning: the plug-in 'mocolab-broken' (entry point broken = mocolab_broken) "
        "is skipped: RuntimeError: broken on purpose"
    ]
