"""AMDIM: Deep InfoMax across two augmented views and across scales.

Bachman, Hjelm & Buchwalter, "Learning Representations by Maximizing Mutual Information Across
Views", NeurIPS 2019, and the official code (``Philip-Bachman/amdim-public`` at its HEAD,
commit 8754ae149ed28da8066f696f95ba4ca0e3ffebd8: ``model.py``, ``costs.py`` ``LossMultiNCE`` /
``NCE_MI_MULTI``, ``train.py``, ``task_self_supervised.py``, ``datasets.py``).

Two views of each image (the official augmentation: random resized crop of 30-100% with aspect
0.7-1.4, colour jitter, grayscale: the ``amdim`` recipe) go through one encoder, which gives
features at several scales (§3.3): the global ``1×1`` vector and two local maps (the paper's
``5×5`` and ``7×7`` of its own encoder at 128 px). Here the encoder is a mocolab ResNet: the
global vector is its pooled feature, the two maps are the ResNet stages of ``--local-stages``
(coarse, fine: layer4 and layer3 by default, 4×4 and 8×8 at 128 px with the ImageNet stem),
each mapped to the ``--dim`` "fake RKHS" by a residual 1×1-conv network (the official
``FakeRKHSConvNet`` of ``model.py``: conv-ReLU-conv plus an identity-initialised shortcut,
then BN, the block's second conv initialised to 0 by ``FakeRKHSConvNet.init_weights``, which
``train.py`` calls through ``model.init_weights(init_scale=1.0)``; the global one is the same
network on the 1×1 map, where the official encoder ends in a ``ConvResNxN`` to ``n_rkhs``
whose second conv is zero-initialised the same way, then BN).

The predictions, in both directions between the views (§3.3; the official ``1t5``, ``1t7``,
``5t5`` tasks): view 1's global vector predicts every location of view 2's coarse map and
of its fine map, and a location of view 1's coarse map drawn at random per image predicts the
locations of view 2's coarse map; and the same from view 2 to view 1. Each prediction is an
InfoNCE over locations (:func:`~mocolab.infomax.location_nce`): a positive location of the
same image against every location of the batch's other images (of every rank), scores
``s = q·c/√D`` soft-clipped by ``c·tanh(s/c)``, c = 20 (``--score-clip``, the code's
``tclip``). The loss (``task_self_supervised.py``) is the sum of the three tasks (each the mean
of its two directions) plus the regulariser ``λ/2 · Σ mean(s²)`` over the six predictions,
λ = 5e-2 (``--score-penalty``; ``costs.py`` ``NCE_MI_MULTI._model_scores``: ``lgt_reg = 5e-2 *
(raw_scores**2.).mean()`` on the scores before clipping, since commit
627eca39142b3a0dfab82f29e1fa31e11d4c1db8; the first check-in, fc820d97, had 4e-2).

Simplifications: the official encoder (its own ResNet of ``ndf``/``n_depth`` with
unpadded convolutions) is replaced by mocolab's ResNets; the online evaluation classifiers
trained with the encoder are left out (mocolab evaluates with kNN / linear protocols after
training); each view is flipped on its own (the code flips once for both). The evaluated
backbone is the ResNet's pooled feature, like every other method; the paper evaluates the
global ``1×1`` features through its classifiers (``mocolab eval linear --layer`` evaluates a
stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import distributed
from ..backbones import STAGES, check_resnet, stage_channels, stage_maps
from ..errors import ConfigError
from ..infomax import location_nce, positive_mask
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder, fallback_generator
from .dim import MINetwork

if TYPE_CHECKING:
    from ..config import PretrainConfig


def parse_stages(value: str) -> tuple[str, str]:
    """``--local-stages``: two ResNet stages, ``coarse,fine`` (the paper's 5×5 and 7×7)."""
    names = tuple(s.strip() for s in value.split(","))
    if len(names) != 2 or not all(s in STAGES for s in names):
        raise ValueError(f"--local-stages must name two of {', '.join(STAGES)}, got {value!r}")
    return names[0], names[1]


def random_locations(maps: Tensor, generator: torch.Generator) -> Tensor:
    """One location per image drawn uniformly: ``N×D×L`` maps → ``N×D`` (the official
    ``_sample_src_ftr`` with its one-hot masks: the source of the local-to-local task)."""
    n, _, locations = maps.shape
    pick = torch.randint(0, locations, (n,), generator=generator, device=maps.device)
    return maps[torch.arange(n, device=maps.device), :, pick]


class AMDIM(Method):
    """Augmented multiscale Deep InfoMax.

    Args:
        backbone: a mocolab ResNet (its pooled feature is the evaluated encoder).
        dim: width of the embeddings the scores are computed in (the code's ``n_rkhs``).
        local_stages: the coarse and the fine map (the paper's 5×5, 7×7).
        score_clip: c of the tanh clipping (20).
        score_penalty: λ of the score regulariser (5e-2, the official ``lgt_reg``).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 1024,
        local_stages: tuple[str, str] = ("layer4", "layer3"),
        score_clip: float | None = 20.0,
        score_penalty: float = 5e-2,
    ) -> None:
        super().__init__()
        check_resnet(backbone, "--method amdim")

        def rkhs(channels: int) -> MINetwork:  # the official FakeRKHSConvNet, zero-initialised
            return MINetwork(channels, dim, hidden_norm=False, out_norm="batch", zero_init=True)

        self.query_encoder = encoder(backbone, rkhs(backbone.num_features))  # global 1×1
        coarse, fine = local_stages
        self.coarse_net = rkhs(stage_channels(backbone, coarse))
        self.fine_net = rkhs(stage_channels(backbone, fine))
        self.local_stages = (coarse, fine)
        self.score_clip = score_clip
        self.score_penalty = score_penalty

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The three scales of a view: global ``N×D``, coarse ``N×D×L_c``, fine ``N×D×L_f``."""
        backbone = self.backbone
        coarse, fine = self.local_stages
        maps = stage_maps(backbone, x, (coarse, fine, STAGES[-1]))
        g = self.query_encoder.head(torch.flatten(backbone.avgpool(maps[STAGES[-1]]), 1))
        return g, self.coarse_net(maps[coarse]).flatten(2), self.fine_net(maps[fine]).flatten(2)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        gen = generator if generator is not None else fallback_generator(x1.device)
        (g1, c1, f1), (g2, c2, f2) = self.embed(x1), self.embed(x2)
        # every rank's maps are targets (with gradient back to the rank that computed them)
        c1_all, f1_all, c2_all, f2_all = (
            distributed.all_gather_with_grad(t) for t in (c1, f1, c2, f2)
        )
        n = x1.shape[0]
        mask = positive_mask(n, c1_all.shape[0], distributed.rank() * n, x1.device)
        s1, s2 = random_locations(c1, gen), random_locations(c2, gen)  # N×D each

        def both_ways(q1: Tensor, t2: Tensor, q2: Tensor, t1: Tensor) -> tuple[Tensor, Tensor]:
            loss_a, pen_a = location_nce(q1, t2, mask, self.score_clip)  # view 1 → view 2
            loss_b, pen_b = location_nce(q2, t1, mask, self.score_clip)  # view 2 → view 1
            return 0.5 * (loss_a + loss_b), pen_a + pen_b

        global_coarse, pen_gc = both_ways(g1, c2_all, g2, c1_all)  # the code's 1t5
        global_fine, pen_gf = both_ways(g1, f2_all, g2, f1_all)  # 1t7
        coarse_coarse, pen_cc = both_ways(s1, c2_all, s2, c1_all)  # 5t5
        penalty = 0.5 * self.score_penalty * (pen_gc + pen_gf + pen_cc)
        loss = global_coarse + global_fine + coarse_coarse + penalty
        return LossOutput(
            loss,
            {
                "nce_global_coarse": global_coarse.detach(),
                "nce_global_fine": global_fine.detach(),
                "nce_coarse_coarse": coarse_coarse.detach(),
                "score_penalty": penalty.detach(),
            },
        )


@dataclass
class AMDIMOptions(r.MethodOptions):
    """AMDIM's own options (the official code's: tclip 20, the score regulariser 5e-2)."""

    local_stages: str = opt(
        "layer4,layer3",
        "coarse,fine: the two ResNet stages whose maps the global vector predicts "
        "(the paper's 5x5 and 7x7)",
    )
    score_clip: float = opt(20.0, "c of the tanh score clipping s <- c*tanh(s/c) (tclip; 0: off)")
    score_penalty: float = opt(0.05, "λ of the score regulariser λ*mean(s^2) (the code's 5e-2)")

    def validate(self, cfg: PretrainConfig) -> None:
        try:
            parse_stages(self.local_stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        r.check(self.score_clip >= 0, f"--score-clip must be >= 0, got {self.score_clip}")
        r.check(self.score_penalty >= 0, f"--score-penalty must be >= 0, got {self.score_penalty}")


# AMDIM: the code's n_rkhs embeddings (1024 by default), two views of the ``amdim`` recipe.
@r.register_method(
    "amdim",
    options=AMDIMOptions,
    summary="AMDIM, DIM across views and scales (Bachman et al. 2019)",
    defaults={"dim": 1024, "head_layers": 2, "augment": "amdim", "lr_schedule": "step"},
)
def _amdim(backbone: nn.Module, cfg: PretrainConfig, o: AMDIMOptions, ctx: r.BuildContext) -> AMDIM:
    return AMDIM(
        backbone,
        dim=cfg.dim,
        local_stages=parse_stages(o.local_stages),
        score_clip=o.score_clip or None,
        score_penalty=o.score_penalty,
    )
