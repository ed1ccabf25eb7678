"""MoCo v1 and v2: Momentum Contrast with a queue of keys; MoCo v3: in-batch keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(v1); Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020 (v2: MLP
head, blur augmentation, cosine learning rate). Follows Algorithm 1 of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dictionaries import Queue, mochi_negatives
from ..distributed import concat_all_gather, gather_keys, on_shuffled_batch, rank
from ..heads import projection_head
from ..losses import contrastive_accuracy, in_batch_logits, info_nce, info_nce_logits
from ..momentum import MomentumEncoder
from ..option import opt
from . import registry as r
from .base import LossOutput, Method

if TYPE_CHECKING:
    from ..config import PretrainConfig


class MoCo(Method):
    """Momentum Contrast.

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with attribute ``num_features``).
        dim: C, the key dimension (128 in the papers).
        head_layers: 1 = MoCo v1's linear fc, 2 = MoCo v2's MLP head.
        hidden_dim: hidden width of the MLP head (default: the backbone's width D).
        queue_size: K, the number of negative keys (65536 ImageNet, 4096 CIFAR).
        momentum: m of ``θk ← m·θk + (1−m)·θq`` (0.999 in the paper).
        momentum_schedule: ``"constant"`` or ``"cosine"`` (m ramped to 1 over training).
        temperature: τ (0.07 in v1, 0.2 in v2).
        shuffle_bn: shuffle the key batch before the key encoder (§3.3). It only changes BN
            statistics when BN is computed per sub-batch (split BN or several ranks).
        mochi_n, mochi_s, mochi_s_prime: hard negative mixing (MoCHi, Kalantidis et al. 2020):
            from the ``N`` hardest queue keys of each query, ``s`` synthetic negatives mixing
            two of them and ``s′`` mixing the query with one, appended to its negatives
            (:func:`~mocolab.dictionaries.mochi_negatives`); ``mochi_n = 0`` turns it off.
        symmetric: the symmetrised loss of the official MoCo CIFAR-10 demo: each view is a
            query once, ``InfoNCE(q1, k2) + InfoNCE(q2, k1)`` against the same queue, and both
            views' keys are enqueued (2N per step). Twice the encoder work per image.
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 128,
        head_layers: int = 2,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        momentum_schedule: str = "constant",
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        mochi_n: int = 0,
        mochi_s: int = 0,
        mochi_s_prime: int = 0,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if mochi_n > queue_size:
            raise ValueError(f"mochi_n {mochi_n} exceeds the queue size {queue_size}")
        head = projection_head(backbone.num_features, dim, hidden_dim, num_layers=head_layers)
        self.query_encoder = nn.Sequential()
        self.query_encoder.add_module("backbone", backbone)
        self.query_encoder.add_module("head", head)
        # f_k = f_q at start
        self.key_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.queue = Queue(queue_size, dim)
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.mochi = (mochi_n, mochi_s, mochi_s_prime)
        self.symmetric = symmetric

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.key_encoder

    @property
    def dictionary(self) -> Queue:
        return self.queue

    @torch.no_grad()
    def encode_keys(self, x_k: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Keys ``k = normalize(f_k(x_k))`` (N×C), computed on a shuffled batch when
        ``shuffle_bn`` so that a key's BN statistics come from other images than its query's."""
        (k,) = on_shuffled_batch(
            lambda x: (F.normalize(self.key_encoder(x), dim=1),), x_k, generator, self.shuffle_bn
        )
        return k

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x_q, x_k = views
        queue = self.queue.keys()
        loss, acc, k = self._contrast(x_q, x_k, queue, generator)
        if self.symmetric:  # the other view as the query: same queue, both keys enqueued
            loss21, acc21, k1 = self._contrast(x_k, x_q, queue, generator)
            loss, acc = loss + loss21, (acc + acc21) / 2
            k = torch.cat([k, k1])
            index = None if index is None else torch.cat([index, index])
        carry = {"keys": k} if index is None else {"keys": k, "index": index}
        return LossOutput(loss, {"acc": acc}, carry=carry)  # keys enqueued after the step

    def _contrast(
        self, x_q: Tensor, x_k: Tensor, queue: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """InfoNCE of the queries of ``x_q`` against the keys of ``x_k`` and the queue: the
        loss, the look-up accuracy and the keys (to enqueue)."""
        q = F.normalize(self.query_encoder(x_q), dim=1)  # queries: N×C
        k = self.encode_keys(x_k, generator)  # keys: N×C, no gradient
        queue = queue.to(q.dtype)
        n_hard, s, s_prime = self.mochi
        if n_hard and s + s_prime:  # MoCHi: logits N×(1+K+s+s′), synthetic negatives last
            logits = info_nce_logits(q, k, queue, self.temperature)
            synthetic = mochi_negatives(q, queue, n_hard, s, s_prime, generator)  # N×(s+s′)×C
            logits = torch.cat(
                [logits, torch.einsum("nc,nmc->nm", q, synthetic) / self.temperature], 1
            )
            loss = F.cross_entropy(logits.float(), torch.zeros_like(logits[:, 0], dtype=torch.long))
        else:
            # logits: N×(1+K) = [positive N×1, negatives N×K] / τ; label 0 is the positive
            loss, logits = info_nce(q, k, queue, self.temperature)
        return loss, contrastive_accuracy(logits.detach()), k

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """Enqueue this step's keys (gathered from all ranks, with the indices of their images),
        dequeue the oldest, and move f_k towards f_q: ``θk ← m·θk + (1−m)·θq``."""
        self.queue.push(*gather_keys(out.carry["keys"], out.carry.get("index")))
        return {"momentum": self.key_encoder.step(self.query_encoder, step, total_steps)}


def _reject_old_predictor(state_dict: dict, prefix: str, *args: object) -> None:
    """Refuse a MoCo v3 state written by mocolab 0.1.0 (issue #16): its predictor ended in a
    Linear with bias and no BN; the functions differ, so it cannot be converted (its backbone
    still evaluates and exports)."""
    old = f"{prefix}predictor.3.bias" in state_dict
    if old and f"{prefix}predictor.4.running_mean" not in state_dict:
        raise RuntimeError(
            "this MoCo v3 checkpoint was written before mocolab's predictor followed the official "
            "builder (last Linear without bias, then BN without affine); it cannot be resumed, but "
            "its backbone still evaluates and exports (mocolab eval / export); start a new run"
        )


class MoCoV3(Method):
    """MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV 2021), Algorithm 1, ResNet version.

    No queue: the keys are those of the batch (gathered from every rank, without gradient),
    and the loss is symmetrised, ``ctr(q1, k2) + ctr(q2, k1)``, each ``ctr`` an InfoNCE over the
    in-batch keys scaled by ``2τ``. The query side is backbone → projector → predictor, the
    key side an EMA of backbone → projector. MLP heads have BN on their hidden layers and the
    projector a BN (no affine) on its output (§4, "MLP heads").

    Args:
        backbone: the encoder body (``N×C×H×W → N×D``, with ``num_features``).
        dim: output of projector and predictor (256).
        head_layers: projector layers (3 for ResNet).
        hidden_dim: hidden width of the projector (4096; default: the backbone's width).
        predictor_hidden_dim: hidden width of the 2-layer predictor (default: ``hidden_dim``).
        momentum: m of the key encoder (0.99 for ResNet-50 at 100–300 epochs).
        momentum_schedule: ``"cosine"`` (the paper: m ramped to 1) or ``"constant"``.
        temperature: τ (1.0 for ResNet, 0.2 for ViT).
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        head_layers: int = 3,
        hidden_dim: int | None = None,
        predictor_hidden_dim: int | None = None,
        momentum: float = 0.99,
        momentum_schedule: str = "cosine",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or backbone.num_features
        projector = projection_head(
            backbone.num_features,
            dim,
            hidden_dim,
            num_layers=head_layers,
            batch_norm=True,
            last_batch_norm=True,
        )
        self.query_encoder = nn.Sequential()
        self.query_encoder.add_module("backbone", backbone)
        self.query_encoder.add_module("head", projector)
        # the official builder's _build_mlp(2, dim, mlp_dim, dim): every Linear without bias,
        # BN after the hidden layer and (without affine) after the last
        self.predictor = projection_head(
            dim,
            dim,
            predictor_hidden_dim or hidden_dim,
            num_layers=2,
            batch_norm=True,
            last_batch_norm=True,
        )
        # f_k = f_q at start
        self.key_encoder = MomentumEncoder(self.query_encoder, momentum, momentum_schedule)
        self.temperature = temperature
        self._register_load_state_dict_pre_hook(_reject_old_predictor)

    @property
    def momentum_encoder(self) -> MomentumEncoder:
        return self.key_encoder

    def ctr(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``ctr(q, k) = 2τ·InfoNCE(q, k)`` over the global batch of keys; returns the loss and
        the accuracy of the look-up."""
        q = F.normalize(q, dim=1)  # N×C
        k = concat_all_gather(F.normalize(k, dim=1))  # M×C, no gradient
        logits, labels = in_batch_logits(q, k, self.temperature, offset=rank() * q.shape[0])  # N×M
        loss = F.cross_entropy(logits.float(), labels) * 2 * self.temperature
        return loss, (logits.detach().argmax(dim=1) == labels).float().mean()

    def forward(
        self,
        views: list[Tensor],
        generator: torch.Generator | None = None,
        index: Tensor | None = None,
    ) -> LossOutput:
        x1, x2 = views
        q1 = self.predictor(self.query_encoder(x1))  # N×C
        q2 = self.predictor(self.query_encoder(x2))
        with torch.no_grad():
            k1, k2 = self.key_encoder(x1), self.key_encoder(x2)  # N×C
        loss12, acc12 = self.ctr(q1, k2)
        loss21, acc21 = self.ctr(q2, k1)
        return LossOutput(loss12 + loss21, {"acc": (acc12 + acc21) / 2})

    @torch.no_grad()
    def on_step_end(self, out: LossOutput, step: int, total_steps: int) -> dict[str, float]:
        """``θk ← m·θk + (1−m)·θq`` (projector included, predictor not)."""
        return {"momentum": self.key_encoder.step(self.query_encoder, step, total_steps)}


# -- registration: options (defaults: the papers'; the queue and m sized as the official CIFAR
# demo, which the CPU runs follow), checks and builders ------------------------------------------
@dataclass
class MoCoV1Options(r.MethodOptions):
    """MoCo v1's own options (τ = 0.07, linear head, step LR: He et al. 2020)."""

    queue_size: int = r.queue_size(4096)
    key_momentum: float = r.key_momentum(0.99)
    momentum_schedule: str = r.momentum_schedule("constant")
    temperature: float = r.temperature(0.07)
    shuffle_bn: bool = r.shuffle_bn(True)
    symmetric: bool = opt(
        False,
        "symmetrised loss InfoNCE(q1,k2) + InfoNCE(q2,k1), both keys enqueued "
        "(the official CIFAR-10 demo's option; twice the work per image)",
    )
    mochi_n: int = opt(0, "MoCHi: N hardest queue keys per query to mix (0: off; paper 1024)")
    mochi_s: int = opt(0, "MoCHi: s synthetic negatives mixing two hard keys (paper 1024)")
    mochi_s_prime: int = opt(
        0, "MoCHi: s' synthetic negatives mixing the query with a hard key (paper 256)"
    )

    def validate(self, cfg: PretrainConfig) -> None:
        r.check(
            self.queue_size > 0,
            f"--queue-size must be a positive number of keys, got {self.queue_size}",
        )
        r.check_momentum(self.key_momentum, self.momentum_schedule)
        r.check_temperature(self.temperature)
        r.check(
            self.mochi_n >= 0 and self.mochi_s >= 0 and self.mochi_s_prime >= 0,
            "--mochi-n, --mochi-s and --mochi-s-prime must be >= 0 (0 turns MoCHi off)",
        )
        r.check(
            self.mochi_n <= self.queue_size,
            f"--mochi-n {self.mochi_n} exceeds --queue-size {self.queue_size}; lower it",
        )
        r.check(
            self.mochi_n > 0 or self.mochi_s + self.mochi_s_prime == 0,
            "--mochi-s / --mochi-s-prime need --mochi-n > 0 hard keys to mix",
        )


@dataclass
class MoCoV2Options(MoCoV1Options):
    """MoCo v2's own options: v1's with τ = 0.2 (Chen et al. 2020)."""

    temperature: float = r.temperature(0.2)


def _moco(backbone: nn.Module, cfg: PretrainConfig, o: MoCoV1Options, ctx: r.BuildContext) -> MoCo:
    return MoCo(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        queue_size=o.queue_size,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
        temperature=o.temperature,
        shuffle_bn=o.shuffle_bn,
        mochi_n=o.mochi_n,
        mochi_s=o.mochi_s,
        mochi_s_prime=o.mochi_s_prime,
        symmetric=o.symmetric,
    )


# MoCo v1: linear 128-d head, τ = 0.07, v1 augmentation, step LR schedule.
r.register_method(
    "mocov1",
    options=MoCoV1Options,
    summary="MoCo v1 (He et al. 2020)",
    defaults={"head_layers": 1, "dim": 128, "augment": "mocov1", "lr_schedule": "step"},
)(_moco)
# MoCo v2: 2-layer MLP head, τ = 0.2, blur augmentation, cosine LR schedule.
r.register_method(
    "mocov2",
    options=MoCoV2Options,
    summary="MoCo v2 (Chen et al. 2020)",
    defaults={"head_layers": 2, "dim": 128, "augment": "mocov2", "lr_schedule": "cosine"},
)(_moco)


@dataclass
class MoCoV3Options(r.MethodOptions):
    """MoCo v3's own options (ResNet: τ = 1.0, m = 0.99 ramped to 1; Chen, Xie & He 2021)."""

    key_momentum: float = r.key_momentum(0.99)
    momentum_schedule: str = r.momentum_schedule("cosine")
    temperature: float = r.temperature(1.0)
    predictor_hidden_dim: int | None = r.predictor_hidden_dim(None)

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_momentum(self.key_momentum, self.momentum_schedule)
        r.check_temperature(self.temperature)
        r.check_positive("predictor_hidden_dim", self.predictor_hidden_dim)


# MoCo v3 (ResNet): 3-layer projector with BN, 256-d, predictor, BYOL's asymmetric views, cosine LR.
@r.register_method(
    "mocov3",
    options=MoCoV3Options,
    summary="MoCo v3 (Chen, Xie & He 2021)",
    defaults={
        "head_layers": 3,
        "dim": 256,
        "augment": "byol-view1,byol-view2",
        "lr_schedule": "cosine",
    },
)
def _mocov3(
    backbone: nn.Module, cfg: PretrainConfig, o: MoCoV3Options, ctx: r.BuildContext
) -> MoCoV3:
    return MoCoV3(
        backbone,
        dim=cfg.dim,
        head_layers=cfg.head_layers,
        hidden_dim=cfg.hidden_dim,
        predictor_hidden_dim=o.predictor_hidden_dim,
        momentum=o.key_momentum,
        momentum_schedule=o.momentum_schedule,
        temperature=o.temperature,
    )
