"""Colorful image colorization: predict the colour (ab of Lab) of an image from its lightness L.

Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016 (§2.1: ab quantised into the
in-gamut bins of a grid of side 10, the multinomial cross-entropy of Eq. 2 against soft-encoded
targets; §2.2: class rebalancing, Eq. 3–4; §2.3: the annealed mean, Eq. 5, T = 0.38), and the
official code (``richzhang/colorization``, ``resources/caffe_traininglayers.py``: ``NNEncode``,
the 5 nearest bins weighted by a Gaussian of σ = 5; ``PriorFactor``, w ∝ ((1 − λ)·p̃ + λ·u)⁻¹
with λ = 0.5, u uniform over the bins of non-zero prior, normalised so that E_p̃[w] = 1, and
applied per location by the argmax bin of its soft-encoded target; the ab target subsampled
by 4 — one pixel in 4×4, not averaged — to the network's output resolution).

The in-gamut bins (:func:`ab_bins`) are computed, not downloaded: the centres (multiples of 10)
of the grid cells that hold some sRGB colour, i.e. the bins that the nearest-centre rounding
of some 8-bit sRGB colour falls into (the six faces of the RGB cube suffice: the colours of
one (a, b) over L form a segment whose ends lie on the gamut's surface). That gives **261**
bins, not the official ``pts_in_hull.npy``'s 313: that file's rule is not given in the paper
or code (its name suggests points inside a hull of the gamut, but the convex hull of the sRGB
ab projection covers 233 centres, 269 cells), so the 52 extra bins are likely the wider
margin of that rule, bins that no sRGB pixel maps to and that the network would learn never
to predict; only the 261 can hold a real target.

The class-rebalancing prior p̃ is estimated on the fly: a running histogram (``prior_counts``,
a buffer saved with every checkpoint, so resume is exact) of the soft-encoded targets of every
training batch so far, this batch included, smoothed by a Gaussian of σ = 5 over the bins
(the paper's Gσ). The official code used the prior of ImageNet's training set, computed once.

The input is the L channel (normalised L/50 − 1, as CMC's official code; the evaluated
backbone, :class:`LightnessBackbone`, takes the normalised RGB batch every mocolab backbone
takes and converts it, as :class:`~mocolab.methods.cmc.LabSplitBackbone`). The predictor
reads the feature map of ``--decoder-stage`` (default layer4, so every stage learns and the
pooled feature that kNN evaluates is trained) and decodes it (:class:`~mocolab.heads.
ConvDecoder`) to Q-way logits at a quarter of the image side, the paper's output resolution.
Simplifications: a mocolab ResNet instead of the paper's VGG-style network with dilated
convolutions; :func:`annealed_mean` decodes pictures (:meth:`Colorization.colorize`) but no
part of the training needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import resnet, stage_channels, stage_maps, stage_stride
from ..distributed import concat_all_gather
from ..heads import ConvDecoder
from ..losses import classification_accuracy
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder
from .denoising import check_decoder_stage, decoder_stage
from .lab import LabBackbone, lab_to_rgb, require_colour, rgb_to_lab

if TYPE_CHECKING:
    from ..config import PretrainConfig

GRID = 10  #: side of the ab grid cells (§2.1)
OUTPUT_STRIDE = 4  #: the network predicts at a quarter of the image side (the paper's 56/224)


@functools.lru_cache(maxsize=4)
def _gamut_cells(grid: int) -> tuple[tuple[float, float], ...]:
    v = torch.linspace(0, 1, 256, dtype=torch.float64)
    u, w = (t.flatten() for t in torch.meshgrid(v, v, indexing="ij"))
    faces = []
    for axis in range(3):  # the six faces of the RGB cube, every 8-bit colour on them
        for value in (0.0, 1.0):
            cols = [u, w]
            cols.insert(axis, torch.full_like(u, value))
            faces.append(torch.stack(cols))
    rgb = torch.cat(faces, dim=1).view(1, 3, -1, 1).float()
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T  # M×2
    cells = torch.unique(torch.round(ab / grid), dim=0) * grid  # sorted by a, then b
    return tuple((float(a), float(b)) for a, b in cells.tolist())


def ab_bins(grid: int = GRID) -> Tensor:
    """The in-gamut ab bins, ``Q×2`` (a, b) centres, sorted by a then b: the multiples of
    ``grid`` nearest to some sRGB colour (Q = 261 for ``grid`` 10; see the module docstring for
    the official 313). Deterministic; computed once per process."""
    return torch.tensor(_gamut_cells(grid))


def nearest_bins(ab: Tensor, centres: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` bins nearest each of the ``M×2`` colours ``ab``: squared distances and indices,
    both ``M×k``, nearest first."""
    d2 = torch.cdist(ab.float(), centres.float()).pow(2)  # M×Q
    dist, index = d2.topk(k, dim=1, largest=False)
    return dist, index


def soft_encode(ab: Tensor, centres: Tensor, k: int = 5, sigma: float = 5.0) -> Tensor:
    """The soft encoding Z of §2.1 (the official ``NNEncode``): each of the ``M×2`` colours
    ``ab`` spread over its ``k`` nearest bins with weights ``exp(−d²/(2σ²))`` normalised to sum
    to 1; ``M×Q``, zero elsewhere."""
    d2, index = nearest_bins(ab, centres, k)
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)  # exp(−d²/2σ²) / Σ
    z = torch.zeros(ab.shape[0], centres.shape[0], device=ab.device)
    return z.scatter_(1, index, weights)


def smooth_prior(counts: Tensor, centres: Tensor, sigma: float = 5.0) -> Tensor:
    """p̃: the histogram ``counts`` (``Q``) over the bins smoothed by a Gaussian of ``sigma``
    in ab (``p̃_q ∝ Σ_j exp(−‖c_q − c_j‖²/(2σ²))·counts_j``), normalised to sum to 1."""
    kernel = torch.exp(-torch.cdist(centres.double(), centres.double()).pow(2) / (2 * sigma**2))
    p = kernel @ counts.double()
    return p / p.sum()


def rebalance_weights(prior: Tensor, lam: float = 0.5) -> Tensor:
    """The class-rebalancing weights of Eq. 4 (the official ``PriorFactor``): ``w ∝ ((1 − λ)·p̃
    + λ·u)⁻¹``, u uniform over the bins where ``p̃ > 0``, scaled so that ``Σ_q p̃_q w_q = 1``;
    0 for a bin of zero prior (no target falls there)."""
    seen = prior > 0
    uniform = seen.to(prior.dtype) / seen.sum()
    w = torch.where(seen, 1.0 / ((1 - lam) * prior + lam * uniform).clamp_min(1e-300), 0.0)
    return w / (prior * w).sum()


def annealed_mean(logits: Tensor, centres: Tensor, temperature: float = 0.38) -> Tensor:
    """The annealed-mean decoding of Eq. 5: ``H(Z) = E[f_T(Z)]`` with ``f_T(z) ∝ exp(log z/T)``.

    ``logits``: ``N×Q×H×W`` → ab ``N×2×H×W``. ``exp(log softmax(l)/T)`` renormalised is
    ``softmax(l/T)``: T = 1 gives the mean of the predicted distribution, T → 0 its mode.
    """
    f = torch.softmax(logits.float() / temperature, dim=1)  # N×Q×H×W
    return torch.einsum("nqhw,qc->nchw", f, centres.to(f))


def colorization_loss(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Eq. 2 with the weights of Eq. 3: ``−mean_{locations} v(Z)·Σ_q Z_q log Ẑ_q``, where
    ``v(Z) = w_{argmax_q Z_q}``; ``logits`` and ``target`` are ``M×Q``, ``weights`` ``Q``."""
    v = weights.to(logits.dtype)[target.argmax(dim=1)]  # M
    return -(v * (target * F.log_softmax(logits, dim=1)).sum(dim=1)).mean()


class LightnessBackbone(LabBackbone):
    """The colorization encoder as a backbone: a normalised RGB batch → its normalised L
    channel (``L/50 − 1``) → ``encoder`` (a one-channel mocolab ResNet) → ``N×D``."""

    what = "a ResNet on the L channel of Lab"

    def __init__(
        self,
        encoder: nn.Module,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__(mean, std)
        self.encoder = encoder
        self.num_features = int(encoder.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.lab(x)[:, :1])


class Colorization(Method):
    """Colorization as classification over the in-gamut ab bins, class-rebalanced.

    Args:
        backbone: a :class:`LightnessBackbone` (its ``encoder`` a mocolab ResNet).
        stage: the ResNet stage whose map is decoded (``layer4``).
        grid: side of the ab bins (10).
        neighbours: bins of the soft encoding (5); sigma: its Gaussian σ, also the prior's (5).
        rebalance: λ of the rebalancing (0.5; 1: every weight equal, no rebalancing; see
            :func:`rebalance_weights`).
        decode_temperature: T of the annealed mean (0.38), for :meth:`colorize`.
    """

    num_views = 1
    centres: Tensor
    prior_counts: Tensor

    def __init__(
        self,
        backbone: LightnessBackbone,
        *,
        stage: str = "layer4",
        grid: int = GRID,
        neighbours: int = 5,
        sigma: float = 5.0,
        rebalance: float = 0.5,
        decode_temperature: float = 0.38,
    ) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, nn.Identity())
        self.register_buffer("centres", ab_bins(grid), persistent=False)  # Q×2
        q = self.centres.shape[0]
        self.register_buffer("prior_counts", torch.zeros(q, dtype=torch.float64))
        net = backbone.encoder
        stride = stage_stride(net, stage)
        upsamples = max(0, (stride // OUTPUT_STRIDE).bit_length() - 1)  # to a quarter of the side
        self.decoder = ConvDecoder(stage_channels(net, stage), q, upsamples)
        self.stage = stage
        self.neighbours = neighbours
        self.sigma = sigma
        self.rebalance = rebalance
        self.decode_temperature = decode_temperature

    def weights(self, counts: Tensor) -> Tensor:
        """The rebalancing weights ``Q`` for the histogram ``counts`` of the targets so far."""
        return rebalance_weights(smooth_prior(counts, self.centres, self.sigma), self.rebalance)

    def lab(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Lab (``N×3×H×W``, L ∈ [0, 100]) of a normalised RGB batch and the normalised L
        channel the encoder sees (``N×1×H×W``, the input's dtype)."""
        backbone = self.backbone
        lab = rgb_to_lab(backbone.rgb(x))
        return lab, backbone.normalize_lab(lab)[:, :1].to(x.dtype)

    def predict(self, lightness: Tensor, size: Sequence[int]) -> Tensor:
        """Q-way logits ``N×Q×size`` from the normalised L channel ``N×1×H×W``."""
        net = self.backbone.encoder
        return self.decoder(stage_maps(net, lightness, [self.stage])[self.stage], tuple(size))

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        (x,) = views
        lab, lightness = self.lab(x)  # N×3×H×W, N×1×H×W
        ab = lab[:, 1:, ::OUTPUT_STRIDE, ::OUTPUT_STRIDE]  # one pixel in 4×4, as the official
        logits = self.predict(lightness, ab.shape[-2:])  # N×Q×h×w
        q = logits.shape[1]
        target = soft_encode(
            ab.permute(0, 2, 3, 1).reshape(-1, 2), self.centres, self.neighbours, self.sigma
        )
        batch_counts = target.sum(dim=0).double()  # Q: this batch's share of the histogram
        counts = self.prior_counts + concat_all_gather(batch_counts.view(1, q)).sum(dim=0)
        flat = logits.permute(0, 2, 3, 1).reshape(-1, q).float()  # M×Q
        loss = colorization_loss(flat, target, self.weights(counts))
        acc = classification_accuracy(flat, target.argmax(dim=1))
        return LossOutput(loss, {"acc": acc}, carry={"counts": batch_counts})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Add this step's targets (of every rank) to the running histogram of the prior."""
        self.prior_counts += concat_all_gather(out.carry["counts"].view(1, -1)).sum(dim=0)
        return {}

    @torch.no_grad()
    def colorize(self, x: Tensor, temperature: float | None = None) -> Tensor:
        """Pictures: the normalised RGB batch ``x`` recoloured from its own L and the annealed
        mean of the predicted ab (upsampled bilinearly to the full side), RGB in [0, 1]."""
        lab, lightness = self.lab(x)
        h, w = x.shape[-2:]
        size = (-(-h // OUTPUT_STRIDE), -(-w // OUTPUT_STRIDE))
        t = self.decode_temperature if temperature is None else temperature
        ab = annealed_mean(self.predict(lightness, size), self.centres, t)
        ab = F.interpolate(ab, size=(h, w), mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))


@dataclass
class ColorizationOptions(r.MethodOptions):
    """Colorization's own options (Zhang et al. 2016: 5 nearest bins, σ = 5, λ = 0.5,
    T = 0.38)."""

    decoder_stage: str = decoder_stage("layer4")
    soft_neighbours: int = opt(5, "nearest ab bins each target colour is spread over (5)")
    soft_sigma: float = opt(5.0, "σ of the soft encoding's and the prior smoothing's Gaussian")
    rebalance_lambda: float = opt(
        0.5, "λ of class rebalancing, w ∝ ((1−λ)p̃ + λ/Q)⁻¹ (0.5; 1: no rebalancing)"
    )
    decode_temperature: float = opt(0.38, "T of the annealed-mean decoding of pictures")

    def validate(self, cfg: PretrainConfig) -> None:
        check_decoder_stage(self.decoder_stage)
        r.check(self.soft_neighbours >= 1, "--soft-neighbours must be at least 1")
        r.check(self.soft_sigma > 0, f"--soft-sigma must be > 0, got {self.soft_sigma}")
        r.check(
            0 <= self.rebalance_lambda <= 1,
            f"--rebalance-lambda must be in [0, 1] (0.5), got {self.rebalance_lambda}",
        )
        r.check(
            self.decode_temperature > 0,
            f"--decode-temperature must be > 0 (0.38), got {self.decode_temperature}",
        )
        r.check(
            cfg.init is None,
            "--init loads an RGB ResNet, but colorization's sees the L channel only; "
            "pretrain colorization without --init",
        )


def _colorization_backbone(
    config: Mapping[str, Any], in_channels: int, stem: str, width: int, bn_splits: int
) -> LightnessBackbone:
    require_colour(in_channels, config.get("data", ""), "colorization", "it predicts ab from L")
    net = resnet(config["arch"], in_channels=1, stem=stem, bn_splits=bn_splits, width=width)
    return LightnessBackbone(net)


# Colorization: L in, Q-way ab logits at a quarter of the side out, crop + flip views.
@r.register_method(
    "colorization",
    options=ColorizationOptions,
    summary="colorization, L → quantised ab (Zhang et al. 2016)",
    defaults={"head_layers": 1, "dim": 128, "augment": "crop-flip", "lr_schedule": "cosine"},
    backbone=_colorization_backbone,
)
def _colorization(
    backbone: nn.Module, cfg: PretrainConfig, o: ColorizationOptions, ctx: r.BuildContext
) -> Colorization:
    assert isinstance(backbone, LightnessBackbone)
    backbone.normalize_inputs(ctx.mean, ctx.std)
    return Colorization(
        backbone,
        stage=o.decoder_stage,
        neighbours=o.soft_neighbours,
        sigma=o.soft_sigma,
        rebalance=o.rebalance_lambda,
        decode_temperature=o.decode_temperature,
    )
