"""SwAV's queue of past large-crop features (Caron et al. 2020, §4): FIFO filling, codes from
Sinkhorn over [queue; batch] against an explicit reference, and exact resume with the queue."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F

from mocolab.backbones import resnet
from mocolab.checkpoint import load_checkpoint
from mocolab.config import ConfigError, build_config
from mocolab.losses import swav_loss
from mocolab.methods import SwAV
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_codes(scores, epsilon=0.05, iterations=3):
    """SwAV's Sinkhorn-Knopp written out with explicit loops over rows and columns (B×K in)."""
    q = [[torch.exp(scores[b, k] / epsilon) for b in range(scores.shape[0])] for k in range(scores.shape[1])]
    k_, b_ = len(q), len(q[0])
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k_ for v in row] for row in q]  # each prototype: mass 1/K
        cols = [sum(q[k][b] for k in range(k_)) for b in range(b_)]
        q = [[q[k][b] / cols[b] / b_ for b in range(b_)] for k in range(k_)]  # each sample: 1/B
    return torch.tensor([[q[k][b] * b_ for k in range(k_)] for b in range(b_)])


def test_codes_come_from_sinkhorn_over_queue_and_batch():
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(3, 4, generator=g) for _ in range(3)]  # 2 large views + 1 small, N=3, K=4
    queue = [torch.randn(5, 4, generator=g) for _ in range(2)]  # Q=5 stored scores per large view
    loss = swav_loss(batch, temperature=0.1, queue_scores=queue)
    expected = 0.0
    for i in (0, 1):
        q = reference_codes(torch.cat([queue[i], batch[i]]))[-3:]  # the batch's rows only
        for v in range(3):
            if v != i:
                log_p = torch.log(torch.softmax(batch[v] / 0.1, dim=1))
                expected += -(q * log_p).sum(dim=1).mean() / 2
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-5)
    # the queue changes the codes (equipartition over 8 samples, not 3)
    assert abs(loss.item() - swav_loss(batch, temperature=0.1).item()) > 1e-3


def views(step, n=4):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + [torch.randn(n, 1, 8, 8, generator=g)]


def test_queue_fills_fifo_after_its_start_and_is_used_once_full():
    torch.manual_seed(0)
    model = SwAV(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=8, hidden_dim=16,
                 num_prototypes=6, num_local=1, freeze_prototypes_niters=0, queue_length=8,
                 queue_start_step=1).train()
    pushed = []
    for step in range(4):
        x = views(step)
        with torch.no_grad():
            z = F.normalize(model.query_encoder(torch.cat(x[:2])), dim=1).chunk(2)  # large crops
            out = model(x)
        if step < 3:  # step 0: not started; steps 1, 2: filling (4 + 4 = 8 rows)
            torch.testing.assert_close(out.loss, swav_loss(
                [s @ model.prototypes.weight.T for s in (*z, F.normalize(model.query_encoder(x[2]), dim=1))],
                0.1), rtol=1e-5, atol=1e-6)
        else:  # full: the codes use the queue, scored with the current prototypes
            c = model.prototypes.weight
            z_small = F.normalize(model.query_encoder(x[2]), dim=1)
            expected = swav_loss([z[0] @ c.T, z[1] @ c.T, z_small @ c.T], 0.1,
                                 queue_scores=[torch.cat(pushed[j::2]) @ c.T for j in (0, 1)])
            torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
        if step >= 1:
            pushed += [z[0], z[1]]
        model.on_step_end(out, step, 10)
        expected_filled = min(8, 4 * max(0, step))
        assert int(model.queues[0].filled) == expected_filled
    # FIFO: oldest first, the last 8 rows of crop 0 pushed at steps 2 and 3 (steps 1's dropped)
    torch.testing.assert_close(model.queues[0].ordered(), torch.cat([pushed[2], pushed[4]]))
    torch.testing.assert_close(model.queues[1].ordered(), torch.cat([pushed[3], pushed[5]]))


def test_queue_is_in_the_checkpoint_and_resume_is_exact(tmp_path):
    kw = dict(method="swav", data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
              num_local_crops=1, prototypes=10, hidden_dim=16, dim=8, swav_queue=64,
              swav_queue_start_epoch=0, freeze_prototypes_niters=0, epochs=1, max_steps=6,
              progress=False, log_every=1, threads=1, diagnostics_every=0, out_dir=str(tmp_path))
    full = pretrain(build_config(**kw, run_name="full"), final_eval=False)

    def interrupt(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = pretrain(build_config(**kw, run_name="part"), on_step=interrupt, final_eval=False)
    assert part["step"] == 3
    assert int(load_checkpoint(part["run_dir"])["model"]["queues.0.filled"]) == 64  # 2 × 32, full
    pretrain(resume=part["run_dir"], final_eval=False)
    a, b = load_checkpoint(full["run_dir"]), load_checkpoint(part["run_dir"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_queue_options_are_validated():
    with pytest.raises(ConfigError, match="--swav-queue"):
        build_config(method="dino", swav_queue=128)
    with pytest.raises(ConfigError, match="--swav-queue"):
        build_config(method="swav", swav_queue=-1)
