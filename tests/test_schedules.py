import math

from mocolab.schedules import learning_rate, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.03, 256) == 0.03
    assert abs(scaled_lr(0.03, 512) - 0.06) < 1e-12


def test_cosine_with_warmup():
    assert learning_rate(0, 110, 1.0, "cosine", warmup_steps=10) == 0.1
    assert learning_rate(9, 110, 1.0, "cosine", warmup_steps=10) == 1.0
    assert learning_rate(10, 110, 1.0, "cosine", warmup_steps=10) == 1.0
    mid = learning_rate(60, 110, 1.0, "cosine", warmup_steps=10)
    assert abs(mid - 0.5 * (1 + math.cos(math.pi * 0.5))) < 1e-12
    assert learning_rate(110, 110, 1.0, "cosine", warmup_steps=10) < 1e-12


def test_step_schedule_drops_at_milestones():
    # MoCo v1: ×0.1 at epochs 120 and 160 of 200
    assert learning_rate(119, 200, 0.03, "step", milestones=(0.6, 0.8)) == 0.03
    assert abs(learning_rate(120, 200, 0.03, "step", milestones=(0.6, 0.8)) - 0.003) < 1e-12
    assert abs(learning_rate(160, 200, 0.03, "step", milestones=(0.6, 0.8)) - 0.0003) < 1e-12
