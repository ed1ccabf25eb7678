"""SwAV and DINO: multi-crop views of two sizes, prototypes, the teacher's global views, the
center, the teacher temperature warmup and the frozen last layers, against explicit formulas."""


import pytest
import torch
import torch.nn.functional as F

from mocolab.augment import local_crop_size, recipe
from mocolab.backbones import resnet
from mocolab.config import ConfigError, build_config
from mocolab.losses import dino_loss, swav_loss
from mocolab.methods import DINO, SwAV, build_method
from mocolab.methods.dino import teacher_temperature

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def multi_crop_views(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(n, 1, 8, 8, generator=g) for _ in range(2)]


def swav(freeze=0):
    torch.manual_seed(0)
    return SwAV(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=8, hidden_dim=16,
                num_prototypes=6, num_local=2, temperature=0.1, freeze_prototypes_niters=freeze).train()


def dino(freeze=0):
    torch.manual_seed(0)
    return DINO(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=8, out_dim=10,
                hidden_dim=16, num_local=2, momentum=0.9, teacher_temperature=0.07,
                warmup_teacher_temperature=0.04, teacher_temperature_warmup=0.5,
                freeze_last_layer_niters=freeze).train()


def test_multi_crop_recipes_and_sizes():
    cfg = build_config(method="swav")
    model = build_method(dataclass_replace(cfg, width=8), 1, "compact")
    assert model.num_views == 8
    assert model.view_recipes(cfg.augment) == ["swav-global"] * 2 + ["swav-local"] * 6
    d = build_config(method="dino", num_local_crops=3, out_dim=16)
    model = build_method(dataclass_replace(d, width=8), 1, "compact")
    assert model.view_recipes(d.augment) == ["dino-global1", "dino-global2"] + ["dino-local"] * 3
    with pytest.raises(ConfigError, match="--augment"):
        model.view_recipes("a,b,c,d")
    assert local_crop_size(224) == 96 and local_crop_size(28) == 12
    assert recipe("swav-local", 224).size == 96 and recipe("swav-local", 224).scale == (0.05, 0.14)
    assert recipe("dino-global2", 224).solarize_p == 0.2 and recipe("dino-local", 224).size == 96


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_swav_loss_is_the_swapped_prediction_of_normalised_scores():
    model = swav()
    views = multi_crop_views()
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)  # the forward normalises the prototypes first
    out = model(views)
    c = model.prototypes.weight.detach()
    torch.testing.assert_close(c.norm(dim=1), torch.ones(6))
    with torch.no_grad():
        z = [F.normalize(model.query_encoder(torch.cat(views[:2])), dim=1).chunk(2),
             F.normalize(model.query_encoder(torch.cat(views[2:])), dim=1).chunk(2)]
        scores = [s @ c.T for s in (*z[0], *z[1])]
    torch.testing.assert_close(out.loss, swav_loss(scores, 0.1, 0.05, 3), rtol=1e-4, atol=1e-5)


def test_swav_prototypes_frozen_for_the_first_iterations():
    model = swav(freeze=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for step in range(3):
        before = model.prototypes.weight.detach().clone()
        opt.zero_grad()
        out = model(multi_crop_views(step))
        out.loss.backward()
        grad = model.prototypes.weight.grad
        if step < 2:
            assert torch.count_nonzero(grad) == 0  # frozen: no gradient, only the decay
            opt.step()
            model.prototypes.normalize_()
            torch.testing.assert_close(model.prototypes.weight, before)  # direction unchanged
        else:
            assert grad.abs().sum() > 0
        model.on_step_end(out, step, 10)
    assert int(model.step) == 3 and "step" in model.state_dict()


def test_dino_teacher_sees_only_the_global_views_and_the_center_moves():
    model = dino()
    views = multi_crop_views()
    out = model(views)
    with torch.no_grad():
        # each size batched together, as the method does (BN statistics per forward pass)
        student = [*model.query_encoder(torch.cat(views[:2])).chunk(2),
                   *model.query_encoder(torch.cat(views[2:])).chunk(2)]
        teacher = model.teacher_encoder(torch.cat(views[:2])).chunk(2)
    expected = dino_loss(student, list(teacher), torch.zeros(1, 10), 0.1, 0.04)  # τ_t starts at 0.04
    assert abs(out.loss.item() - expected.item()) < 1e-5
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher_encoder.parameters())
    info = model.on_step_end(out, 0, 4)
    mean = torch.cat(teacher).mean(dim=0, keepdim=True)
    torch.testing.assert_close(model.center.center, 0.1 * mean, rtol=1e-4, atol=1e-6)  # 0.9·0 + 0.1·mean
    assert info["momentum"] == pytest.approx(0.9)
    # τ_t: 0.04 → 0.07 linearly over half of the 4 steps, then 0.07
    assert float(model.teacher_temp) == pytest.approx(0.04 + 0.03 * 1 / 2)
    assert [teacher_temperature(s, 4, 0.04, 0.07, 0.5) for s in range(4)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_dino_head_last_layer_is_weight_normalised_and_frozen_at_first():
    model = dino(freeze=1)
    head = model.query_encoder.head
    h = torch.randn(4, model.backbone.num_features)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)
        x = F.normalize(head.mlp(h), dim=1)
        v = head.last_layer.weight
        expected = x @ (v / v.norm(dim=1, keepdim=True)).T  # W = V / ‖V‖, g = 1
    torch.testing.assert_close(head(h), expected)
    out = model(multi_crop_views())
    out.loss.backward()
    assert torch.count_nonzero(head.last_layer.weight.grad) == 0
    model.zero_grad()
    model.on_step_end(out, 0, 10)
    model(multi_crop_views()).loss.backward()
    assert head.last_layer.weight.grad.abs().sum() > 0


def test_dino_and_swav_options_are_validated():
    with pytest.raises(ConfigError, match="--sinkhorn-epsilon"):
        build_config(method="swav", sinkhorn_epsilon=0)
    with pytest.raises(ConfigError, match="--teacher-temperature-warmup"):
        build_config(method="dino", teacher_temperature_warmup=1.5)
    with pytest.raises(ConfigError, match="--center-momentum"):
        build_config(method="dino", center_momentum=1.0)
