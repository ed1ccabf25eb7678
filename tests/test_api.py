"""The public API: ``mocolab.__all__``, typed results, one name per way of loading weights,
``create_method`` / ``create_backbone`` by name."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mocolab
from mocolab import (
    ConfigError,
    FinetuneResult,
    KnnResult,
    LinearResult,
    PretrainResult,
    RetrievalResult,
    create_backbone,
    create_method,
    list_methods,
)
from mocolab.config import build_config
from mocolab.methods import Method, SimCLR
from mocolab.methods.registry import _REGISTRY, MethodOptions, get_method, register_method

INIT = Path(mocolab.__file__)


# --- __all__, dir(), lazy -------------------------------------------------------------------


def test_every_public_name_resolves_and_dir_shows_it():
    assert len(set(mocolab.__all__)) == len(mocolab.__all__)
    for name in mocolab.__all__:
        assert getattr(mocolab, name) is not None, name
    assert set(mocolab.__all__) <= set(dir(mocolab))
    assert "pretrain" in dir(mocolab) and "load_backbone" not in dir(mocolab)  # old names hidden
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mocolab.nope  # noqa: B018


def test_type_checkers_see_every_public_name():
    """Each name of ``__all__`` is imported at the top of ``mocolab/__init__.py`` or in its
    ``if TYPE_CHECKING:`` block, as ``X as X`` there (what ``mypy --strict`` reads)."""
    tree = ast.parse(INIT.read_text())
    seen = set()
    for node in tree.body:
        body = node.body if isinstance(node, ast.If) else [node]
        for sub in body:
            if isinstance(sub, ast.ImportFrom):
                for alias in sub.names:
                    if isinstance(node, ast.If):  # re-exported explicitly: X as X
                        assert alias.asname == alias.name, ast.unparse(sub)
                    seen.add(alias.asname or alias.name)
    assert set(mocolab.__all__) <= seen, set(mocolab.__all__) - seen


def test_import_and_all_load_no_torch():
    code = (
        "import sys, mocolab\n"
        "names = dir(mocolab), mocolab.__all__, mocolab.PretrainResult, mocolab.ConfigError\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_version_is_defined_once():
    """``mocolab.__version__`` is the only place: pyproject.toml reads it (dynamic)."""
    pyproject = (INIT.parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "mocolab.__version__"' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
    assert (INIT.parent / "py.typed").exists()


# --- one name per way of loading weights --------------------------------------------------


def test_old_names_of_the_loaders_warn_and_give_the_new_ones():
    from mocolab import checkpoint, encoder, weights

    with pytest.warns(DeprecationWarning, match="mocolab.load_encoder"):
        assert mocolab.load_backbone is encoder.load_encoder
    with pytest.warns(DeprecationWarning, match="mocolab.load_backbone_weights"):
        assert mocolab.load_foreign_backbone is weights.load_backbone_weights
    run = INIT.parents[1] / "tests" / "data" / "old_run"
    with pytest.warns(DeprecationWarning, match="load_backbone_and_info"):
        backbone, info = checkpoint.load_backbone(run)
    new_backbone, new_info = checkpoint.load_backbone_and_info(run)
    assert info == new_info
    for (k, a), (_, b) in zip(backbone.state_dict().items(), new_backbone.state_dict().items()):
        assert torch.equal(a, b), k


# --- typed results --------------------------------------------------------------------------


def test_results_are_typed_and_read_like_the_dicts_they_replace():
    knn = KnnResult(top1=80.0, top5=99.0, k=20, t=0.07, train_images=100, test_images=50)
    res = PretrainResult(run_dir=Path("runs/a"), step=4, total_steps=8, knn=knn)
    want = {
        "run_dir": "runs/a",
        "step": 4,
        "total_steps": 8,
        "knn": {"top1": 80.0, "top5": 99.0, "k": 20, "t": 0.07, "train_images": 100,
                "test_images": 50},
        "interrupted": False,
    }  # fmt: skip
    assert json.loads(json.dumps(res.to_dict())) == want
    assert res["run_dir"] == "runs/a" and res.run_dir == Path("runs/a")  # str as in 0.1.0
    assert {**res} == want and dict(res) == want and list(res) == list(want)
    assert res.get("signal") is None and "signal" not in res and res.get("step") == 4
    with pytest.raises(KeyError):
        res["signal"]
    stopped = dataclasses.replace(res, knn=None, interrupted=True, signal="SIGINT")
    assert stopped.get("interrupted") and stopped["signal"] == "SIGINT" and "knn" not in stopped
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.step = 5  # type: ignore[misc]
    assert LinearResult(1.0, 2.0, train_loss=0.5).to_dict() == {
        "top1": 1.0, "top5": 2.0, "train_loss": 0.5}  # fmt: skip
    assert FinetuneResult(1.0, 2.0, train_images=10, train_loss=0.5)["train_images"] == 10


def test_retrieval_result_keys_by_k():
    res = RetrievalResult(
        precision={5: 40.0, 1: 50.0}, recall={5: 4.0, 1: 1.0}, hit={5: 90.0, 1: 50.0},
        mean_ap={5: 45.0, 1: 50.0},
    )  # fmt: skip
    assert res.ks == [1, 5] and res.precision[5] == 40.0
    assert list(res.to_dict()) == [
        "precision@1", "recall@1", "hit@1", "mAP@1", "precision@5", "recall@5", "hit@5", "mAP@5",
    ]  # fmt: skip
    assert res["mAP@5"] == 45.0 and res["hit@1"] == 50.0


def test_the_evaluations_return_typed_results():
    from mocolab.evaluate import finetune, knn_accuracy, linear_probe, retrieval_metrics

    torch.manual_seed(0)
    labels = torch.arange(4).repeat(6)  # 24 points of 4 classes, each near its class's corner
    feats = torch.eye(4)[labels] + 0.05 * torch.randn(24, 4)
    knn = knn_accuracy(feats, labels, feats, labels, 4, k=3, temperature=0.1)
    assert isinstance(knn, KnnResult) and (knn.top1, knn.k, knn.t) == (100.0, 3, 0.1)
    linear = linear_probe(feats, labels, feats, labels, 4, epochs=30)
    assert isinstance(linear, LinearResult) and linear.top1 == 100.0 and linear.train_loss > 0
    ret = retrieval_metrics(feats, labels, feats, labels, ks=(1, 5), exclude_self=True)
    assert isinstance(ret, RetrievalResult) and ret.precision[1] == 100.0 and ret.hit[5] == 100.0
    assert ret.precision[5] == pytest.approx(100.0)  # each class has 5 other points
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    net = create_backbone("resnet18", in_channels=1, image_size=8, width=4)
    tuned = finetune(net, images, labels[:8], images, labels[:8], 4, size=8, mean=(0.5,),
                     std=(0.5,), fraction=1.0, epochs=1)  # fmt: skip
    assert isinstance(tuned, FinetuneResult) and tuned.train_images == 8


# --- create_method, create_backbone, list_methods ----------------------------------------


def test_create_method_takes_the_methods_options_by_name():
    model = create_method("mocov2", image_size=32, queue_size=128, temperature=0.1, dim=32)
    assert model.dictionary is not None and model.dictionary.size == 128
    assert model.temperature == 0.1 and model.dictionary.keys().shape == (128, 32)
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    # the papers' values when not given: MoCo v2's τ 0.2, BYOL's m 0.996
    assert create_method("mocov2", image_size=32).temperature == 0.2
    assert create_method("byol", image_size=32).momentum_encoder.momentum == 0.996
    gray = create_method("simclr", in_channels=1, image_size=28, width=8)
    assert gray.backbone.conv1.in_channels == 1 and gray.backbone.num_features == 64


def test_create_method_names_what_is_wrong():
    with pytest.raises(ConfigError, match=r"unknown option 'queue' \(did you mean 'queue_size'\?\)"):
        create_method("mocov2", queue=256)
    with pytest.raises(ConfigError, match=r"'queue_size' \(an option of [^)]*mocov1, mocov2"):
        create_method("byol", queue_size=256)
    with pytest.raises(ConfigError, match=r"unknown method 'mocov4'; did you mean 'mocov\d'"):
        create_method("mocov4")
    with pytest.raises(ConfigError, match="--queue-size"):  # an invalid value: the option's check
        create_method("mocov2", queue_size=-1)
    with pytest.raises(ConfigError, match="unknown option 'lr'"):  # a training option
        create_method("mocov2", lr=0.1)


def test_every_registered_method_is_created_by_name(one_thread):
    """No list of names: what the registry holds is what create_method builds (each method
    whose defaults make a valid run at 64 px; one that needs more, e.g. a ViT, is left out)."""
    names = list_methods()
    assert names == list(_REGISTRY) and {"mocov1", "mocov2", "mocov3", "simclr", "byol"} <= set(names)
    built = []
    for name in names:
        try:
            build_config(method=name, crop_size=64, width=4)
        except ConfigError:
            continue
        model = create_method(name, image_size=64, width=4, num_images=16)
        assert isinstance(model, Method), name
        built.append(name)
    assert len(built) >= 21, built  # the methods of 0.1.0 all build so


def test_a_method_registered_later_is_listed_and_created():
    @dataclasses.dataclass
    class ToyOptions(MethodOptions):
        temperature: float = 0.5

    @register_method(
        "toy-api", options=ToyOptions, defaults={"head_layers": 2, "dim": 16, "augment": "simclr"}
    )
    def build(backbone, cfg, o, ctx):
        return SimCLR(backbone, dim=cfg.dim, head_layers=cfg.head_layers, temperature=o.temperature)

    try:
        assert "toy-api" in list_methods()
        model = create_method("toy-api", image_size=32, width=4, temperature=0.3)
        assert isinstance(model, SimCLR) and model.temperature == 0.3
        assert get_method("toy-api").options is ToyOptions
    finally:
        del _REGISTRY["toy-api"]


def test_create_backbone():
    net = create_backbone("resnet18", image_size=224, width=8)
    assert net.conv1.kernel_size == (7, 7) and net.num_features == 64  # imagenet stem, 8·width
    assert create_backbone("resnet50", image_size=28, width=4).num_features == 128  # 32·width
    assert create_backbone("resnet18", image_size=28).conv1.stride == (2, 2)  # compact stem
    vit = create_backbone("vit_tiny", image_size=32, patch_size=8, vit_depth=1)
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
    cmc = create_backbone(method="cmc", image_size=32, width=4)
    assert cmc(torch.zeros(2, 3, 32, 32)).shape[0] == 2
    with pytest.raises(ConfigError, match="unknown option 'queue_size'"):
        create_backbone("resnet18", queue_size=3)
    with pytest.raises(ConfigError, match="--arch 'resnet19' is not known"):
        create_backbone("resnet19")
    with pytest.raises(ConfigError, match="--patch-size is a ViT"):
        create_backbone("resnet18", patch_size=8)
