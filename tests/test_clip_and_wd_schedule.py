"""DINO's per-parameter gradient clipping and cosine weight-decay schedule, as general options
of the one training loop, against hand-computed values."""

import math

import pytest
import torch

from mocolab.config import ConfigError, build_config
from mocolab.optim import clip_gradients
from mocolab.schedules import cosine_weight_decay
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_clip_gradients_clips_each_parameter_on_its_own():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 2, 1))
    a.grad = torch.tensor([3.0, 4.0])  # ‖g‖ = 5 > 2: scaled by 2/5
    b.grad = torch.tensor([1.0, 0.0])  # ‖g‖ = 1 ≤ 2: unchanged (a global norm would shrink it)
    clip_gradients([a, b, c], 2.0)  # c has no gradient: skipped
    torch.testing.assert_close(a.grad, torch.tensor([1.2, 1.6]), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 0.0]))
    assert c.grad is None


def test_cosine_weight_decay_at_start_middle_and_end():
    assert cosine_weight_decay(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_weight_decay(50, 100, 0.04, 0.4) == pytest.approx(0.22)  # (0.04 + 0.4) / 2
    assert cosine_weight_decay(25, 100, 0.04, 0.4) == pytest.approx(0.4 - 0.36 * (1 + math.sqrt(0.5)) / 2)
    assert cosine_weight_decay(100, 100, 0.04, 0.4) == pytest.approx(0.4)


def test_loop_clips_and_schedules_the_weight_decay(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        norms = [float(p.grad.norm()) for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((max(norms), [g["weight_decay"] for g in self.param_groups]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=1, max_steps=4, progress=False, threads=1,
                       diagnostics_every=0, out_dir=str(tmp_path), run_name="r", optimizer="adamw",
                       lr=1e-3, weight_decay=0.04, weight_decay_end=0.4, clip_grad=1e-3)
    pretrain(cfg, final_eval=False)
    assert len(seen) == 4
    for s, (max_norm, wds) in enumerate(seen):
        assert max_norm <= 1e-3 * (1 + 1e-4)  # every parameter's gradient clipped to 1e-3
        expected = 0.4 - 0.36 * (1 + math.cos(math.pi * s / 4)) / 2
        assert wds == pytest.approx([expected, 0.0])  # weights scheduled; biases and BN: none


def test_clip_and_wd_options_are_validated():
    with pytest.raises(ConfigError, match="--clip-grad"):
        build_config(clip_grad=-1)
    with pytest.raises(ConfigError, match="--weight-decay-end"):
        build_config(weight_decay=0.0, weight_decay_end=0.4)
