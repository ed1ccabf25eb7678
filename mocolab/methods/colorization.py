"""Colorful image colorization: predict the colour (ab of Lab) of an image from its lightness L.

Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016 (§2.1: ab quantised into the
in-gamut bins of a grid of side 10, the multinomial cross-entropy of Eq. 2 against soft-encoded
targets; §2.2: class rebalancing, Eq. 3–4; §2.3: the annealed mean, Eq. 5), and the official
code, ``richzhang/colorization``, which mocolab follows where it and the text differ:

- ``resources/caffe_traininglayers.py`` (commit 815b3f7808f8f2d9d683e9ed6c5b0a39bec232fb):
  ``NNEncLayer`` soft-encodes each ab value over its **10** nearest bins (``self.NN = 10``;
  the paper's §2.1 says 5) with weights ``exp(−d²/(2σ²))``, σ = 5, normalised to sum to 1
  (``NNEncode.encode_points_mtx_nd``: :func:`soft_encode`, ``--soft-neighbours``);
  ``NonGrayMaskLayer`` gives an image loss weight 0 unless some ``|a|`` or ``|b|`` of its
  subsampled ab map exceeds 5 (:func:`nongray_mask`); ``PriorBoostLayer`` / ``PriorFactor``
  (``gamma = .5``, ``alpha = 1``) weigh each location by the bin of the argmax of its target,
  ``w ∝ ((1 − λ)·p̃ + λ·u)⁻¹``, λ = 0.5, u uniform over the bins of non-zero prior,
  normalised so that ``E_p̃[w] = 1`` (:func:`rebalance_weights`);
- ``models/colorization_train_val_v2.prototxt`` (commit
  4aa459f03cedd5678524ac3429cd89270dcf5290): the ab target subsampled by 4 — one pixel in
  4×4, not averaged (``data_ab_ss``, a stride-4 1×1 convolution of weight 1) — to the
  network's output resolution, and the mask and the rebalancing weight multiplied
  (``prior_boost_nongray``);
- ``models/colorization_deploy_v2.prototxt`` (same commit): the released network decodes by
  scaling its logits by 2.606 before the softmax (``conv8_313_rh``), i.e. T = 1/2.606 ≈ 0.3837
  in the annealed mean of Eq. 5 (the paper: 0.38; ``--decode-temperature``).

The in-gamut bins (:func:`ab_bins`) are computed, not downloaded: the centres (multiples of 10)
of the grid cells that hold some sRGB colour, i.e. the bins that the nearest-centre rounding
of some 8-bit sRGB colour falls into (the six faces of the RGB cube suffice: the colours of
one (a, b) over L form a segment whose ends lie on the gamut's surface). That gives **261**
bins, not the official ``pts_in_hull.npy``'s 313: that file's rule is not given in the paper
or code (its name suggests points inside a hull of the gamut, but the convex hull of the sRGB
ab projection covers 233 centres, 269 cells), so the 52 extra bins are likely the wider
margin of that rule, bins that no sRGB pixel maps to and that the network would learn never
to predict; only the 261 can hold a real target (each of them is one of the 313).

The class-rebalancing prior p̃: the official code loads a fixed file,
``resources/prior_probs.npy``, the empirical distribution of ImageNet's training colours over
the quantised ab space smoothed by a Gaussian (§2.2; the code that made it is not published —
the author's answer in richzhang/colorization issue #47: "smoothed with the same Gaussian used
to compute soft targets during training", σ = 5). That file cannot be fetched here and would
not fit other data, so mocolab estimates the same quantity online: a running histogram
(``prior_counts``, a buffer saved with every checkpoint, so resume is exact) of the **hard**
bin — the nearest, i.e. the argmax of the soft target — of every target location of every
training batch so far (this batch included, every image, gray or not: the paper's "full
training set"), smoothed **once** by the σ = 5 Gaussian over the bins (:func:`smooth_prior`)
and mixed with the uniform distribution (λ = 0.5) by :func:`rebalance_weights`. What differs
from the official file: the data (the run's training set, seen so far, instead of ImageNet's),
the bins (261, not 313), and that the smoothing runs over the bin centres rather than over
whatever grid the file was made on (unpublished).

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
NEIGHBOURS = 10  #: bins of the soft encoding (the official ``NNEncLayer``; the paper: 5)
GRAY_THRESHOLD = (
    5.0  #: ``|a|``, ``|b|`` at or below it everywhere: a gray image (``NonGrayMaskLayer``)
)
#: T of the annealed mean: the released network scales its logits by 2.606 (the paper: 0.38)
DECODE_TEMPERATURE = 1 / 2.606


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


def soft_encode(ab: Tensor, centres: Tensor, k: int = NEIGHBOURS, sigma: float = 5.0) -> Tensor:
    """The soft encoding Z of §2.1 as the official ``NNEncLayer`` computes it
    (``NNEncode.encode_points_mtx_nd``, ``NN = 10``, ``sigma = 5.``): each of the ``M×2``
    colours ``ab`` spread over its ``k`` nearest bins with weights ``exp(−d²/(2σ²))``
    normalised to sum to 1; ``M×Q``, zero elsewhere. The paper's text has k = 5."""
    d2, index = nearest_bins(ab, centres, k)
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)  # exp(−d²/2σ²) / Σ
    z = torch.zeros(ab.shape[0], centres.shape[0], device=ab.device)
    return z.scatter_(1, index, weights)


def smooth_prior(counts: Tensor, centres: Tensor, sigma: float = 5.0) -> Tensor:
    """p̃: the histogram ``counts`` (``Q``) of the hard (nearest-bin) target colours smoothed
    once by a Gaussian of ``sigma`` in ab (``p̃_q ∝ Σ_j exp(−‖c_q − c_j‖²/(2σ²))·counts_j``),
    normalised to sum to 1 — how the official ``prior_probs.npy`` was smoothed (§2.2; σ = 5,
    the soft encoding's, by the author's answer in richzhang/colorization issue #47)."""
    kernel = torch.exp(-torch.cdist(centres.double(), centres.double()).pow(2) / (2 * sigma**2))
    p = kernel @ counts.double()
    return p / p.sum()


def rebalance_weights(prior: Tensor, lam: float = 0.5) -> Tensor:
    """The class-rebalancing weights of Eq. 4 (the official ``PriorFactor`` with ``gamma`` =
    λ = 0.5, ``alpha`` = 1): ``w ∝ ((1 − λ)·p̃ + λ·u)⁻¹``, u uniform over the bins where
    ``p̃ > 0``, scaled so that ``Σ_q p̃_q w_q = 1``; 0 for a bin of zero prior (no target falls
    there)."""
    seen = prior > 0
    uniform = seen.to(prior.dtype) / seen.sum()
    w = torch.where(seen, 1.0 / ((1 - lam) * prior + lam * uniform).clamp_min(1e-300), 0.0)
    return w / (prior * w).sum()


def annealed_mean(
    logits: Tensor, centres: Tensor, temperature: float = DECODE_TEMPERATURE
) -> Tensor:
    """The annealed-mean decoding of Eq. 5: ``H(Z) = E[f_T(Z)]`` with ``f_T(z) ∝ exp(log z/T)``.

    ``logits``: ``N×Q×H×W`` → ab ``N×2×H×W``. ``exp(log softmax(l)/T)`` renormalised is
    ``softmax(l/T)``: T = 1 gives the mean of the predicted distribution, T → 0 its mode. The
    default T = 1/2.606 is the released network's (``colorization_deploy_v2.prototxt``:
    ``conv8_313_rh`` scales the logits by 2.606 before the softmax); the paper's is 0.38.
    """
    f = torch.softmax(logits.float() / temperature, dim=1)  # N×Q×H×W
    return torch.einsum("nqhw,qc->nchw", f, centres.to(f))


def nongray_mask(ab: Tensor, threshold: float = GRAY_THRESHOLD) -> Tensor:
    """Which images of an ab batch (``N×2×H×W``) are not grayscale: some ``|a|`` or ``|b|``
    exceeds ``threshold`` (5) somewhere — the official ``NonGrayMaskLayer``, applied as there
    to the subsampled ab map. ``N`` booleans."""
    return (ab.abs() > threshold).flatten(1).any(dim=1)


def colorization_loss(
    logits: Tensor, target: Tensor, weights: Tensor, keep: Tensor | None = None
) -> Tensor:
    """Eq. 2 with the weights of Eq. 3: ``−mean_{locations} v(Z)·Σ_q Z_q log Ẑ_q``, where
    ``v(Z) = w_{argmax_q Z_q}``, times ``keep`` (``M``, the official ``prior_boost_nongray``:
    0 at the locations of a gray image) where given; ``logits`` and ``target`` are ``M×Q``,
    ``weights`` ``Q``. The mean runs over all ``M`` locations, the masked ones included."""
    v = weights.to(logits.dtype)[target.argmax(dim=1)]  # M
    if keep is not None:
        v = v * keep.to(v.dtype)
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
        neighbours: bins of the soft encoding (10, the official code's; the paper: 5); sigma:
            its Gaussian σ, also the prior's (5).
        rebalance: λ of the rebalancing (0.5; 1: every weight equal, no rebalancing; see
            :func:`rebalance_weights`).
        gray_mask: give grayscale images (:func:`nongray_mask`) loss weight 0, as the official
            ``NonGrayMaskLayer`` (True).
        decode_temperature: T of the annealed mean (1/2.606, the released network's; the
            paper: 0.38), for :meth:`colorize`.
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
        neighbours: int = NEIGHBOURS,
        sigma: float = 5.0,
        rebalance: float = 0.5,
        gray_mask: bool = True,
        decode_temperature: float = DECODE_TEMPERATURE,
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
        self.gray_mask = gray_mask
        self.decode_temperature = decode_temperature

    def weights(self, counts: Tensor) -> Tensor:
        """The rebalancing weights ``Q`` for the histogram ``counts`` of the hard target bins so
        far: smoothed once (:func:`smooth_prior`), then :func:`rebalance_weights`."""
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
        )  # M×Q
        hard = target.argmax(dim=1)  # M: the nearest bin of each target colour
        batch_counts = torch.bincount(hard, minlength=q).double()  # this batch's histogram
        counts = self.prior_counts + concat_all_gather(batch_counts.view(1, q)).sum(dim=0)
        keep = None
        if self.gray_mask:  # N → M: every location of a gray image weighs 0
            keep = nongray_mask(ab).repeat_interleave(ab.shape[-2] * ab.shape[-1])
        flat = logits.permute(0, 2, 3, 1).reshape(-1, q).float()  # M×Q
        loss = colorization_loss(flat, target, self.weights(counts), keep)
        acc = classification_accuracy(flat, hard)
        return LossOutput(loss, {"acc": acc}, carry={"counts": batch_counts})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Add this step's hard target bins (of every rank) to the running histogram of the
        prior."""
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
    """Colorization's own options, the official code's values (richzhang/colorization: 10
    nearest bins, σ = 5, λ = 0.5, gray images masked out, T = 1/2.606; the paper's text: 5
    bins, T = 0.38)."""

    decoder_stage: str = decoder_stage("layer4")
    soft_neighbours: int = opt(
        NEIGHBOURS,
        "nearest ab bins each target colour is spread over (10: the official code; 5: the paper)",
    )
    soft_sigma: float = opt(5.0, "σ of the soft encoding's and the prior smoothing's Gaussian")
    rebalance_lambda: float = opt(
        0.5, "λ of class rebalancing, w ∝ ((1−λ)p̃ + λ/Q)⁻¹ (0.5; 1: no rebalancing)"
    )
    gray_mask: bool = opt(
        True, "give grayscale images (|a|, |b| <= 5 everywhere) loss weight 0, as the official code"
    )
    decode_temperature: float = opt(
        DECODE_TEMPERATURE,
        "T of the annealed-mean decoding of pictures (1/2.606: the official; 0.38: the paper)",
    )

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
            f"--decode-temperature must be > 0 (0.3837), got {self.decode_temperature}",
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
        gray_mask=o.gray_mask,
        decode_temperature=o.decode_temperature,
    )
