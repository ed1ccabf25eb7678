"""The ``<method>-cifar10`` presets: each resolves, trains on 32 px RGB images, and the key
numbers of three of them equal their published sources."""

import json
import math
from pathlib import Path

import pytest

from mocolab.config import build_config, list_presets
from mocolab.train import pretrain

CIFAR_METHODS = ["mocov1", "mocov2", "mocov3", "simclr", "simclr2", "invaspread", "instdisc",
                 "byol", "simsiam", "swav", "dino", "cpc", "cmc"]

# Per-method overrides that shrink what the presets size for a GPU (banks, queues, heads) so
# that two steps fit a CPU test; everything else (views, optimiser, schedules) stays the preset's.
TINY = {
    "mocov1": dict(queue_size=32), "mocov2": dict(queue_size=32),
    "instdisc": dict(nce_k=16), "cmc": dict(nce_k=16),
    "swav": dict(prototypes=16, swav_queue=32, hidden_dim=32),
    "dino": dict(out_dim=16, hidden_dim=32, dim=16),
    "byol": dict(hidden_dim=32, predictor_hidden_dim=32),
    "mocov3": dict(hidden_dim=32, predictor_hidden_dim=32),
    "simclr": dict(hidden_dim=32), "simclr2": dict(hidden_dim=32),
    "simsiam": dict(hidden_dim=32, dim=32, predictor_hidden_dim=8),
    "cpc": dict(dim=16, context_blocks=1),
}


def test_every_method_has_a_cifar10_preset():
    assert {f"{m}-cifar10" for m in CIFAR_METHODS} <= set(list_presets())


@pytest.mark.parametrize("method", CIFAR_METHODS)
def test_cifar10_preset_resolves_for_a_gpu(method):
    cfg = build_config(f"{method}-cifar10")
    assert (cfg.method, cfg.data, cfg.arch, cfg.stem) == (method, "cifar10", "resnet18", "cifar")
    assert cfg.width in (64, 32)  # CMC splits a ResNet-18 into two halves of width 32
    assert cfg.batch_size % cfg.bn_splits == 0


@pytest.mark.parametrize("method", CIFAR_METHODS)
def test_cifar10_preset_trains_two_steps_on_32px_rgb(method, tmp_path):
    # data="synthetic": 512 RGB images of 32 px, CIFAR-10's shape, without the download
    cfg = build_config(f"{method}-cifar10", data="synthetic", width=8, batch_size=16,
                       bn_splits=2, epochs=1,
                       max_steps=2, threads=1, progress=False, log_every=1, knn_every=0,
                       diagnostics_every=0, out_dir=str(tmp_path), run_name="r",
                       **TINY.get(method, {}))
    res = pretrain(cfg, final_eval=False)
    assert res["step"] == 2
    losses = [row["loss"] for row in _metric_rows(res["run_dir"])]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def _metric_rows(run_dir: str) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_cifar10_presets_match_their_sources():
    # vturrisi/solo-learn, scripts/pretrain/cifar/simclr.yaml: temperature 0.2, LARS lr 0.4
    # (batch 256, so no rescaling), weight_decay 1e-4, eta 0.02, proj 2048 -> 256.
    simclr = build_config("simclr-cifar10")
    assert (simclr.temperature, simclr.optimizer, simclr.lr, simclr.weight_decay, simclr.lars_eta,
            simclr.batch_size, simclr.hidden_dim, simclr.dim) == (0.2, "lars", 0.4, 1e-4, 0.02,
                                                                  256, 2048, 256)
    # vturrisi/solo-learn, scripts/pretrain/cifar/simsiam.yaml: SGD lr 0.5, weight_decay 1e-5,
    # batch 256, proj 2048 -> 2048, pred_hidden_dim 512, 1000 epochs.
    simsiam = build_config("simsiam-cifar10")
    assert (simsiam.optimizer, simsiam.lr, simsiam.weight_decay, simsiam.batch_size,
            simsiam.hidden_dim, simsiam.dim, simsiam.predictor_hidden_dim,
            simsiam.epochs) == ("sgd", 0.5, 1e-5, 256, 2048, 2048, 512, 1000)
    # vturrisi/solo-learn, scripts/pretrain/cifar/byol.yaml: momentum base_tau 0.99 -> final_tau
    # 1.0, LARS lr 1.0, weight_decay 1e-5, proj 4096 -> 256, pred_hidden_dim 4096.
    byol = build_config("byol-cifar10")
    assert (byol.key_momentum, byol.momentum_schedule, byol.optimizer, byol.lr, byol.weight_decay,
            byol.hidden_dim, byol.dim, byol.predictor_hidden_dim) == (0.99, "cosine", "lars", 1.0,
                                                                      1e-5, 4096, 256, 4096)
    # facebookresearch/moco colab/moco_cifar10_demo.ipynb: moco_k 4096, moco_m 0.99, moco_t 0.1,
    # bn_splits 8, batch 512 at lr 0.06 (= 0.03 x 512/256), wd 5e-4, 200 epochs, cosine.
    mocov1 = build_config("mocov1-cifar10")
    assert (mocov1.queue_size, mocov1.key_momentum, mocov1.temperature, mocov1.bn_splits,
            mocov1.batch_size, mocov1.lr * mocov1.batch_size / 256, mocov1.weight_decay,
            mocov1.epochs, mocov1.lr_schedule) == (4096, 0.99, 0.1, 8, 512, 0.06, 5e-4, 200, "cosine")
