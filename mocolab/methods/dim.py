"""Deep InfoMax: maximise the mutual information between a feature map and the global vector.

Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler & Bengio, "Learning Deep
Representations by Mutual Information Estimation and Maximization", ICLR 2019, and the
official code (``rdevon/DIM`` at commit bac4765a8126746675f517c7bfa1b04b88044d51:
``cortex_DIM/models/dim.py``, ``nn_modules/mi_networks.py``, ``functions/dim_losses.py``,
``models/prior_matching.py``).

The encoder gives a local feature map ``C(x)`` (M×M locations: a ResNet stage read by
:func:`~mocolab.backbones.stage_maps`, ``--local-stage``) and the global vector
``Y = E(x)`` (the pooled feature through a linear layer to 64-d, §4). The objective (Eq. 8)

``max  α·Î(X; Y) + β·(1/M²)·Σ_ij Î(C_ij(X); Y) − γ·D(V ‖ U_Y)``

- local MI (β): every location's feature against the global vector of the same image
  (positive) and of the other images of the batch, of every rank (negatives), scored by the
  "encoder-and-dot" critic (App. A.2): a 1×1-conv net on the locations and one on ``Y`` (the
  official ``MI1x1ConvNet``: conv-BN-ReLU-conv plus an identity-initialised linear shortcut,
  then layer norm over channels; 2048 units), and their dot product;
- global MI (α, ``--global-weight``): ``C(x)`` encoded by a fresh copy of the rest of the
  encoder (the stages after ``--local-stage``, pooled, then linear to the MI units: the
  official ``GlobalDIM`` copies the encoder's remaining layers), dotted with a linear map of
  ``Y``;
- the estimator (``--mi-estimator``, :mod:`mocolab.infomax`): JSD (default, Eq. 4), InfoNCE
  (Eq. 5) or DV (Eq. 2);
- prior matching (γ, ``--prior-weight``): a discriminator D (64 → 1000 → 200 → 1, ReLU, as the
  official ``PriorMatching``) tells samples of the uniform prior on [0, 1]^64 from
  ``sigmoid(Y)``; D minimises the GAN cross-entropy ``E_U[sp(−D)] + E_Y[sp(D)]`` on a
  detached ``Y``, and the encoder the non-saturating ``γ·E_Y[sp(−D(Y))]`` (``generator_loss(…,
  'non-saturating')``). The official code steps two optimisers; here both terms go into the
  one loss, the encoder's term through D with its parameters detached (``torch.func``), so
  neither player's gradient reaches the other.

The paper's local-only DIM(L) is α = 0, β = 1, γ = 0.1 (the defaults). Where mocolab follows
the official code over the text: the JSD estimator keeps the code's ``log 2`` shifts (a
constant); in InfoNCE an image's own other locations are left out of the negatives (the
code gives them a score of −10). Where mocolab follows the text: the DV estimator is Eq. 2 as
written, because the official ``donsker_varadhan_loss`` does not run on local features and
would sum the scores of all N² pairs in its positive term (:func:`~mocolab.infomax.dv_mi`).
Simplifications: the discriminator's gradient penalty of the official ``Discriminator`` is
left out; no random subsampling of locations (``local_samples``). The evaluated backbone is
the ResNet's pooled feature, like every other method; the paper evaluates the last conv layer,
the fc layer and ``Y`` (``mocolab eval linear --layer`` evaluates a stage).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..backbones import STAGES, check_resnet, stage_channels, stage_maps
from ..infomax import ESTIMATORS, location_scores, mi_estimate, positive_mask
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder, fallback_generator

if TYPE_CHECKING:
    from ..config import PretrainConfig


class MINetwork(nn.Module):
    """A 1×1-conv critic network with an identity-initialised linear shortcut (DIM's
    ``MI1x1ConvNet``, AMDIM's ``FakeRKHSConvNet``): ``norm(block(x) + shortcut(x))`` with
    ``block = conv1×1 → [BN] → ReLU → conv1×1``.

    Takes ``N×C×H×W`` maps or ``N×C`` vectors (as 1×1 maps) and returns the same layout with
    ``units`` channels.

    Args:
        in_channels, units: input and output channels.
        hidden_norm: BN after the first conv (DIM: yes; AMDIM: its default ``use_bn=0``, no).
        out_norm: ``"layer"`` (DIM: layer norm over the channels of each location) or
            ``"batch"`` (AMDIM: BN on the output).
        zero_init: the second conv of the block starts at 0, so that the network starts as
            ``norm(shortcut(x))`` (AMDIM: ``FakeRKHSConvNet.init_weights``, "like fixup/zero
            init", called through ``Model.init_weights`` from ``train.py``; DIM's
            ``MI1x1ConvNet`` keeps PyTorch's default init).

    Biases as DIM's ``MI1x1ConvNet`` (rdevon/DIM ``cortex_DIM/nn_modules/mi_networks.py``,
    commit bac4765a8126746675f517c7bfa1b04b88044d51): on the second conv, none on the shortcut.
    AMDIM's ``FakeRKHSConvNet`` has them the other way round; under its output BN a constant
    per channel cancels, so that makes no difference there.
    """

    def __init__(
        self,
        in_channels: int,
        units: int,
        hidden_norm: bool = True,
        out_norm: str = "layer",
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if out_norm not in ("layer", "batch"):
            raise ValueError(f"out_norm must be layer or batch, got {out_norm!r}")
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, units, 1, bias=False),
            nn.BatchNorm2d(units) if hidden_norm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(units, units, 1),
        )
        self.shortcut = nn.Conv2d(in_channels, units, 1, bias=False)
        if units >= in_channels:  # a noisy copy of the input to start with (official init)
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                eye = torch.eye(units, in_channels, dtype=torch.bool)[:, :, None, None]
                self.shortcut.weight.masked_fill_(eye, 1.0)
        if zero_init:
            last = self.block[-1]
            assert isinstance(last, nn.Conv2d)
            nn.init.zeros_(last.weight)
        self.norm = nn.LayerNorm(units) if out_norm == "layer" else nn.BatchNorm2d(units)
        self.out_norm = out_norm

    def forward(self, x: Tensor) -> Tensor:
        vector = x.dim() == 2
        h = x[:, :, None, None] if vector else x
        h = self.block(h) + self.shortcut(h)
        if self.out_norm == "layer":  # over the channels of each location
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.norm(h)
        return h.flatten(1) if vector else h


class PriorDiscriminator(nn.Module):
    """DIM's prior-matching discriminator: ``D: R^d → R``, an MLP ``d → 1000 → 200 → 1`` with
    ReLU (the official ``PriorMatching`` layers plus the discriminator's final linear)."""

    def __init__(self, dim: int, hidden: tuple[int, int] = (1000, 200)) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(1)  # N


def prior_matching_losses(
    discriminator: nn.Module, y: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """DIM's prior matching (§3.3, official ``PriorMatching`` with the GAN measure) against
    the uniform prior on ``[0, 1]^d``: ``v = sigmoid(y)``, ``u ~ U[0, 1]^d`` from ``generator``.

    Returns:
        ``(encoder_loss, discriminator_loss)``: ``E_v[sp(−D(v))]`` (non-saturating, through D
        with its parameters detached: only the encoder learns from it) and
        ``E_u[sp(−D(u))] + E_v[sp(D(v))]`` (on a detached ``v``: only D learns from it).
    """
    v = torch.sigmoid(y.float())
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    frozen = {k: p.detach() for k, p in discriminator.named_parameters()}
    encoder_loss = F.softplus(-torch.func.functional_call(discriminator, frozen, (v,))).mean()
    disc_loss = F.softplus(-discriminator(u)).mean() + F.softplus(discriminator(v.detach())).mean()
    return encoder_loss, disc_loss


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter re-initialised (``reset_parameters``)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clone


class DIM(Method):
    """Deep InfoMax (Hjelm et al. 2019).

    Args:
        backbone: a mocolab ResNet (its pooled feature is the evaluated encoder).
        dim: size of the global vector ``Y`` (64 in the paper).
        local_stage: the stage whose map is ``C(x)``.
        mi_units: width of the critic networks (2048 in the official code).
        estimator: ``jsd`` | ``infonce`` | ``dv``.
        global_weight, local_weight, prior_weight: α, β, γ of Eq. 8.
    """

    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 64,
        local_stage: str = "layer3",
        mi_units: int = 2048,
        estimator: str = "jsd",
        global_weight: float = 0.0,
        local_weight: float = 1.0,
        prior_weight: float = 0.1,
    ) -> None:
        super().__init__()
        check_resnet(backbone, "--method dim")
        if local_stage not in STAGES or estimator not in ESTIMATORS:
            raise ValueError(f"bad local stage {local_stage!r} or estimator {estimator!r}")
        self.query_encoder = encoder(backbone, nn.Linear(backbone.num_features, dim))  # Y = E(x)
        channels = stage_channels(backbone, local_stage)
        self.local_net = MINetwork(channels, mi_units)  # on each location of C(x)
        self.global_net = MINetwork(dim, mi_units)  # on Y, as a 1×1 map
        self.global_c_net: nn.Module | None = None
        self.global_y_net: nn.Module | None = None
        if global_weight > 0:  # the rest of the encoder, fresh, to one vector of mi_units
            rest = STAGES[STAGES.index(local_stage) + 1 :]
            self.global_c_net = nn.Sequential(
                *(fresh_copy(getattr(backbone, s)) for s in rest),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(backbone.num_features, mi_units),
            )
            self.global_y_net = nn.Linear(dim, mi_units)
        self.discriminator = PriorDiscriminator(dim) if prior_weight > 0 else None
        self.local_stage = local_stage
        self.estimator = estimator
        self.weights = (global_weight, local_weight, prior_weight)

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        backbone = self.backbone
        maps = stage_maps(backbone, x, (self.local_stage, STAGES[-1]))
        c = maps[self.local_stage]  # C(x): N×C×M×M
        y = self.query_encoder.head(torch.flatten(backbone.avgpool(maps[STAGES[-1]]), 1))  # N×64
        n = x.shape[0]
        offset = distributed.rank() * n
        alpha, beta, gamma = self.weights
        metrics: dict[str, Tensor] = {}
        loss = y.new_zeros((), dtype=torch.float32)
        if beta > 0:
            local = distributed.all_gather_with_grad(self.local_net(c).flatten(2))  # M×U×L
            scores = location_scores(self.global_net(y), local).float()  # N×M×L
            local_mi = mi_estimate(scores, positive_mask(n, local.shape[0], offset, x.device),
                                   self.estimator)  # fmt: skip
            loss = loss - beta * local_mi
            metrics["local_mi"] = local_mi.detach()
        if alpha > 0 and self.global_c_net is not None and self.global_y_net is not None:
            cg = distributed.all_gather_with_grad(self.global_c_net(c))  # M×U
            scores = location_scores(self.global_y_net(y), cg.unsqueeze(-1)).float()  # N×M×1
            global_mi = mi_estimate(scores, positive_mask(n, cg.shape[0], offset, x.device),
                                    self.estimator)  # fmt: skip
            loss = loss - alpha * global_mi
            metrics["global_mi"] = global_mi.detach()
        if gamma > 0 and self.discriminator is not None:
            g = generator if generator is not None else fallback_generator(x.device)
            prior, disc = prior_matching_losses(self.discriminator, y, g)
            loss = loss + gamma * prior + disc
            metrics["prior_loss"] = prior.detach()
            metrics["disc_loss"] = disc.detach()
        return LossOutput(loss, metrics)


@dataclass
class DIMOptions(r.MethodOptions):
    """DIM's own options: the local-only DIM(L) of the paper (α = 0, β = 1, γ = 0.1, JSD),
    with the official code's 2048-unit critics."""

    mi_estimator: str = opt(
        "jsd", "jsd (DIM's default, Eq. 4) | infonce (Eq. 5) | dv (Eq. 2)", choices=ESTIMATORS
    )
    local_stage: str = opt(
        "layer3", "ResNet stage whose map is the local features C(x)", choices=STAGES
    )
    mi_units: int = opt(2048, "width of the MI critic networks (1x1 convs on C, on Y)")
    global_weight: float = opt(0.0, "α of Eq. 8: weight of the global MI I(X; Y) (DIM(G): 1)")
    local_weight: float = opt(1.0, "β of Eq. 8: weight of the local MI (DIM(L): 1)")
    prior_weight: float = opt(0.1, "γ of Eq. 8: prior matching of Y to U[0,1] (0: off)")

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.mi_estimator in ESTIMATORS,
            f"--mi-estimator must be one of {', '.join(ESTIMATORS)}, got {self.mi_estimator!r}",
        )
        r.check(
            self.local_stage in STAGES,
            f"--local-stage must be one of {', '.join(STAGES)}, got {self.local_stage!r}",
        )
        r.check(self.mi_units > 0, f"--mi-units must be positive, got {self.mi_units}")
        r.check(
            min(self.global_weight, self.local_weight, self.prior_weight) >= 0
            and self.global_weight + self.local_weight > 0,
            "--global-weight, --local-weight and --prior-weight must be >= 0, "
            "with --global-weight or --local-weight > 0",
        )


# DIM(L): Y is 64-d (a linear layer on the pooled feature), one view, light crops (``dim``).
@r.register_method(
    "dim",
    options=DIMOptions,
    summary="Deep InfoMax (Hjelm et al. 2019)",
    defaults={"dim": 64, "head_layers": 1, "augment": "dim", "lr_schedule": "constant"},
)
def _dim(backbone: nn.Module, cfg: PretrainConfig, o: DIMOptions, ctx: r.BuildContext) -> DIM:
    return DIM(
        backbone,
        dim=cfg.dim,
        local_stage=o.local_stage,
        mi_units=o.mi_units,
        estimator=o.mi_estimator,
        global_weight=o.global_weight,
        local_weight=o.local_weight,
        prior_weight=o.prior_weight,
    )
