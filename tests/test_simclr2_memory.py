"""SimCLR v2's optional memory (Chen et al. 2020b, §2): a momentum encoder whose keys, queued,
are extra negatives next to the batch's own views."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mocolab.backbones import resnet
from mocolab.checkpoint import load_checkpoint
from mocolab.config import ConfigError, build_config
from mocolab.methods import SimCLR
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model(memory=6):
    torch.manual_seed(0)
    return SimCLR(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=4, head_layers=3,
                  hidden_dim=16, temperature=0.5, memory=memory, momentum=0.9).train()


def views(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)]


def test_loss_is_nt_xent_with_the_queue_as_extra_negatives_and_keys_get_no_gradient():
    m = model()
    x1, x2 = views(0)
    out = m([x1, x2])
    with torch.no_grad():
        z = torch.cat([F.normalize(m.query_encoder(x1), dim=1), F.normalize(m.query_encoder(x2), dim=1)])
    queue = m.queue.keys()
    expected = 0.0
    for a in range(8):  # anchor a: its positive is the other view of its image
        pos = (a + 4) % 8
        cands = [z[a] @ z[j] / 0.5 for j in range(8) if j != a] + [z[a] @ k / 0.5 for k in queue]
        expected += -(z[a] @ z[pos] / 0.5 - torch.logsumexp(torch.stack(cands), 0)) / 8
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())  # the memory network: no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.query_encoder.parameters())
    # after the step: θk ← 0.9·θk + 0.1·θq and the 2N keys of both views are enqueued
    key_before = [p.detach().clone() for p in m.key_encoder.parameters()]
    with torch.no_grad():
        for p in m.query_encoder.parameters():
            p.add_(0.01)
        k = F.normalize(m.key_encoder(torch.cat([x1, x2])), dim=1)
    info = m.on_step_end(out, 0, 10)
    assert info["momentum"] == pytest.approx(0.9)
    for kb, pk, pq in zip(key_before, m.key_encoder.parameters(), m.query_encoder.parameters()):
        torch.testing.assert_close(pk, 0.9 * kb + 0.1 * pq)
    assert int(m.queue.filled) == 6
    torch.testing.assert_close(m.queue.ordered(), k[2:])  # FIFO: 8 keys into 6 slots, newest kept


def test_simclr2_with_memory_trains_and_checkpoints_its_memory(tmp_path):
    cfg = build_config(method="simclr2", simclr2_memory=True, queue_size=64, key_momentum=0.99,
                       data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       epochs=1, max_steps=4, progress=False, threads=1, diagnostics_every=0,
                       out_dir=str(tmp_path), run_name="r")
    res = pretrain(cfg, final_eval=False)
    ckpt = load_checkpoint(res["run_dir"])
    assert int(ckpt["model"]["queue.filled"]) == 64 and any(k.startswith("key_encoder.") for k in ckpt["model"])
    losses = [r["loss"] for r in map(json.loads, (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)

def test_memory_is_simclr2_only_and_off_by_default():
    assert build_config(method="simclr2").simclr2_memory is False
    with pytest.raises(ConfigError, match="--simclr2-memory"):
        build_config(method="simclr", simclr2_memory=True)
