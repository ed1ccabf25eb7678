"""InstDisc: instance discrimination against a memory bank of every image's feature.

Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018. Each image is its own class; the class weight of image ``i`` is
its stored feature ``v_i`` (the memory bank, §3.1). A batch's features ``f`` are scored
against their own entries (positives) and ``m`` entries drawn uniformly (noise, §3.2) with
``vᵀf/τ``, trained by NCE with the partition constant ``Z`` estimated from the first batch
(Eq. 8) — or by the softmax InfoNCE over the same entries — and the bank rows of the batch
then move towards ``f`` (``v ← normalize(λ·v + (1 − λ)·f)``).

One view per image. The ``m`` noise entries are drawn once per batch and shared by its
queries (the official code draws them per query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dictionaries import MemoryBank
from ..distributed import all_reduce_mean, concat_all_gather
from ..errors import ConfigError
from ..features import extract_features
from ..heads import projection_head
from ..losses import contrastive_accuracy, info_nce, info_nce_logits, nce_loss, nce_normalizer
from ..option import opt
from . import registry as r
from .base import LossOutput, Method, encoder

if TYPE_CHECKING:
    from ..config import PretrainConfig


def memory_bank_loss(
    features: Tensor,
    bank: MemoryBank,
    index: Tensor,
    noise_index: Tensor,
    temperature: float,
    loss: str,
    normalizer: float,
) -> tuple[Tensor, Tensor, float]:
    """Queries ``f`` (``N×C``, normalised) against a memory bank: the positive of query ``i``
    is the entry ``index[i]``, the negatives the entries ``noise_index`` (``m``, shared).

    ``loss="nce"``: NCE on ``vᵀf/τ`` with the partition constant ``Z = normalizer``, estimated
    from this batch when negative (Eq. 8, the same on every rank: the only device read, once);
    ``"softmax"``: InfoNCE over the same ``1 + m`` entries. The bank carries no gradient.

    Returns:
        ``(loss, scores, Z)``: the scalar loss, the ``N×(1+m)`` scores (positive first) and the
        Z used (the caller keeps it, e.g. as a :meth:`Method.set_scalar` buffer).
    """
    positives = bank.keys(index).to(features.dtype)  # v_i of the batch: N×C
    noise = bank.keys(noise_index).to(features.dtype)  # m×C
    if loss == "softmax":
        return (*info_nce(features, positives, noise, temperature), normalizer)
    scores = info_nce_logits(features, positives, noise, temperature)  # vᵀf/τ: N×(1+m)
    if normalizer < 0:
        normalizer = float(all_reduce_mean(nce_normalizer(scores, bank.size)))
    return nce_loss(scores, bank.size, normalizer), scores, normalizer


class InstDisc(Method):
    """Non-parametric instance discrimination.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        num_images: n, the training set size (one bank row per image).
        dim: feature dimension (128).
        head_layers: 1 = the paper's linear 128-d layer.
        hidden_dim: hidden width if ``head_layers > 1``.
        nce_k: m, noise entries per batch (4096).
        bank_momentum: λ of the bank update (0.5).
        temperature: τ (0.07).
        loss: ``"nce"`` (the paper's) or ``"softmax"`` (InfoNCE over the same entries).
    """

    num_views = 1
    normalizer: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_images: int,
        dim: int = 128,
        head_layers: int = 1,
        hidden_dim: int | None = None,
        nce_k: int = 4096,
        bank_momentum: float = 0.5,
        temperature: float = 0.07,
        loss: str = "nce",
        bank_init: str = "random",
    ) -> None:
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise ValueError(f"InstDisc loss must be nce or softmax, got {loss!r}")
        head = projection_head(backbone.num_features, dim, hidden_dim, num_layers=head_layers)
        self.query_encoder = encoder(backbone, head)
        self.memory_bank = MemoryBank(num_images, dim, momentum=bank_momentum)
        self.register_buffer("normalizer", torch.tensor(-1.0))  # Z, set from the first batch
        self.nce_k = nce_k
        self.temperature = temperature
        self.loss = loss
        self.bank_init = bank_init

    @property
    def dictionary(self) -> MemoryBank:
        return self.memory_bank

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        if index is None:
            raise ValueError(
                "InstDisc needs the batch's image indices: call model(views, generator, index=...)"
            )
        (x,) = views
        index = index.to(self.memory_bank.bank.device)
        f = F.normalize(self.query_encoder(x), dim=1)  # N×C
        noise = self.memory_bank.sample(self.nce_k, generator)  # m indices
        loss, scores, z = memory_bank_loss(
            f,
            self.memory_bank,
            index,
            noise,
            self.temperature,
            self.loss,
            self.scalar("normalizer"),
        )
        self.set_scalar("normalizer", z)  # NCE's Z: set from the first batch, then fixed
        return LossOutput(
            loss,
            {"acc": contrastive_accuracy(scores.detach())},
            carry={"features": f.detach(), "index": index},
        )  # pushed after the step

    def prepare(
        self,
        images: Tensor | None,
        *,
        size: int,
        mean: list[float],
        std: list[float],
        device: torch.device | str,
    ) -> None:
        if self.bank_init == "encoder":
            if images is None:
                raise ConfigError(
                    "--bank-init encoder encodes every image before the first "
                    "step; streamed shards are not all at hand: use --bank-init "
                    "random, or train from the folder"
                )
            self.fill_memory_bank(images, size=size, mean=mean, std=std, device=device)

    @torch.no_grad()
    def fill_memory_bank(
        self,
        images: Tensor,
        *,
        size: int,
        mean: list[float],
        std: list[float],
        device: torch.device | str = "cpu",
    ) -> None:
        """Set every bank row to the encoder's normalised feature of its plain image (uint8
        ``n×C×H×W``, in bank order), in eval mode. Not in the paper, whose bank starts random:
        there, in the first epoch every positive is a random row (each image is scored before
        its row is first written), so a one-epoch run gets no pull towards anything real."""
        f = extract_features(
            self.query_encoder, images, size=size, mean=mean, std=std, device=device
        )
        if f.shape != self.memory_bank.bank.shape:
            raise ValueError(
                f"{len(images)} images for a memory bank of {self.memory_bank.size} rows"
            )
        self.memory_bank.bank.copy_(F.normalize(f, dim=1).to(self.memory_bank.bank))

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Move the bank rows of this step's images (from every rank) towards their features."""
        self.memory_bank.push(
            concat_all_gather(out.carry["features"]), concat_all_gather(out.carry["index"])
        )
        return {}


@dataclass
class InstDiscOptions(r.MethodOptions):
    """InstDisc's own options (τ = 0.07, m = 4096 noise entries, λ = 0.5, NCE; Wu et al. 2018)."""

    temperature: float = r.temperature(0.07)
    nce_k: int = r.nce_k(4096)
    bank_momentum: float = r.bank_momentum(0.5)
    loss: str = r.bank_loss("nce")
    bank_init: str = opt(
        "random",
        "memory bank start: random (the paper's unit vectors) | encoder (the "
        "initial encoder's features of the plain images, so that a first epoch "
        "has real positives)",
        choices=("random", "encoder"),
    )

    def validate(self, cfg: PretrainConfig) -> None:
        check_memory_bank_options(self)
        r.check(
            self.bank_init in ("random", "encoder"),
            f"--bank-init must be random or encoder, got {self.bank_init!r}",
        )


class _BankOptions(Protocol):
    temperature: float
    nce_k: int
    bank_momentum: float
    loss: str


def check_memory_bank_options(o: _BankOptions) -> None:
    """The checks of the memory-bank options InstDisc and CMC share."""
    r.check_temperature(o.temperature)
    r.check(o.nce_k > 0, f"--nce-k must be a positive number of entries, got {o.nce_k}")
    r.check(
        0.0 <= o.bank_momentum < 1.0,
        f"--bank-momentum must be in [0, 1) (0.5 in InstDisc), got {o.bank_momentum}",
    )
    r.check(o.loss in ("nce", "softmax"), f"--loss must be nce or softmax, got {o.loss!r}")


# InstDisc: linear 128-d head, the augmentation MoCo v1 took from it, LR x0.1 at epochs 120, 160.
@r.register_method(
    "instdisc",
    options=InstDiscOptions,
    summary="Instance discrimination (Wu et al. 2018)",
    defaults={"head_layers": 1, "dim": 128, "augment": "mocov1", "lr_schedule": "step"},
)
def _instdisc(
    backbone: nn.Module, cfg: PretrainConfig, o: InstDiscOptions, ctx: r.BuildContext
) -> InstDisc:
    if ctx.num_images is None:
        raise ValueError("instdisc needs num_images (the training set size) for its memory bank")
    return InstDisc(
        backbone,
        num_images=ctx.num_images,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        nce_k=o.nce_k,
        bank_momentum=o.bank_momentum,
        temperature=o.temperature,
        loss=o.loss,
        bank_init=o.bank_init,
    )
