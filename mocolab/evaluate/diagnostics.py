"""Representation diagnostics: is the embedding aligned, uniform, full-rank, not collapsed, and
is the dictionary of keys consistent?

Pure functions of embeddings (usable from a training loop at any step) plus
:func:`run_diagnostics`, which measures a saved run.

- Alignment and uniformity (Wang & Isola, ICML 2020, §4.1): on L2-normalised ``f``,
  ``ℓ_align = E_{(x,y)~pos} ‖f(x) − f(y)‖₂^α`` (α = 2) and
  ``ℓ_uniform = log E_{x,y~data} exp(−t ‖f(x) − f(y)‖₂²)`` (t = 2). Lower is better for both;
  ``ℓ_uniform`` is ``log E exp(−4) ≈ −4`` ... ``0`` (all points equal).
- Effective rank (Roy & Vetterli, EUSIPCO 2007): ``exp(H(p))`` with ``p_i = σ_i / Σ σ_j`` the
  normalised singular values of the ``N×D`` embedding matrix; between 1 and ``min(N, D)``.
- Per-dimension std of the L2-normalised embedding (SimSiam, Chen & He 2021, §4.1): about
  ``1/√d`` for a well spread embedding, near 0 when it collapses to a point.
- Dictionary consistency (MoCo §3.2): the cosine between keys stored in the queue and the same
  images re-encoded by the current key encoder; it falls with a key's age as the encoder moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import ViewGenerator, eval_view, recipe
from ..checkpoint import (
    CheckpointError,
    check_backbone_info,
    expected_shapes,
    load_checkpoint,
    state_mismatch,
)
from ..config import config_from_dict
from ..data import load_dataset
from ..data.shards import is_shards
from ..dictionaries import Queue
from ..features import cpu_features
from ..methods import build_method
from ..methods.base import Method
from .context import prepare


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """``E ‖f(x) − f(y)‖₂^α`` over positive pairs ``(z1[i], z2[i])`` (normalised here)."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (z1 - z2).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: Tensor, t: float = 2.0, max_points: int | None = 4096) -> float:
    """``log E exp(−t ‖f(x) − f(y)‖₂²)`` over all pairs ``x ≠ y`` (normalised here), on the
    first ``max_points`` rows (the pairwise cost is quadratic)."""
    z = F.normalize(z.float(), dim=1)
    if max_points is not None:
        z = z[:max_points]
    if z.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 embeddings")
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log().item()


def effective_rank(z: Tensor, eps: float = 1e-12) -> float:
    """Roy & Vetterli's effective rank ``exp(−Σ p_i log p_i)``, ``p = σ / Σσ``, of the ``N×D``
    matrix ``z`` as given (not centred, not normalised)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(eps)
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def dimension_std(z: Tensor) -> Tensor:
    """Per-dimension standard deviation (``D``) of the L2-normalised embeddings ``z`` (``N×D``);
    compare with ``1/√D`` (collapse when it is near 0)."""
    return F.normalize(z.float(), dim=1).std(dim=0)


def embedding_diagnostics(z1: Tensor, z2: Tensor | None = None) -> dict[str, float]:
    """All the embedding measures of ``z1`` (``N×D``); alignment too when the positives ``z2``
    (another view of the same images, row by row) are given."""
    std = dimension_std(z1)
    d = z1.shape[1]
    out = {
        "dim": d,
        "uniformity": uniformity(z1),
        "effective_rank": effective_rank(z1),
        "std_mean": std.mean().item(),
        "std_min": std.min().item(),
        "std_ideal": 1.0 / math.sqrt(d),
    }
    if z2 is not None:
        out["alignment"] = alignment(z1, z2)
    return out


def queue_ages(ptr: int, size: int) -> Tensor:
    """The age of each slot of a ring-buffer queue whose next write is at ``ptr``: 0 for the
    newest key (slot ``ptr − 1``), ``size − 1`` for the oldest (slot ``ptr``)."""
    return (ptr - 1 - torch.arange(size)) % size


def dictionary_consistency(
    stored: Tensor, reencoded: Tensor, ages: Tensor | None = None, buckets: int = 4
) -> dict[str, Any]:
    """How consistent the dictionary is: the cosine between the keys ``stored`` in a queue
    (``K×C``) and ``reencoded``, the same inputs passed now through the current key encoder.

    Returns ``mean`` (over all keys) and, when the keys' ``ages`` are given (see
    :func:`queue_ages`), ``by_age``: the mean cosine in ``buckets`` equal age ranges, newest
    first. A slowly moving key encoder (momentum 0.999) keeps all of them near 1; without
    momentum the oldest keys drift away (MoCo §3.2, Table 4).
    """
    cos = F.cosine_similarity(stored.float(), reencoded.float(), dim=1)  # K
    out: dict[str, Any] = {"mean": cos.mean().item()}
    if ages is not None:
        order = ages.argsort()  # newest first
        out["by_age"] = [chunk.mean().item() for chunk in cos[order].chunk(buckets)]
    return out


@torch.no_grad()
def encoder_agreement(query_encoder: nn.Module, key_encoder: nn.Module, x: Tensor) -> float:
    """Mean cosine between ``f_q(x)`` and ``f_k(x)`` on the same inputs: how far the momentum
    key encoder lags behind the query encoder (1 when identical)."""
    return (
        F.cosine_similarity(query_encoder(x).float(), key_encoder(x).float(), dim=1).mean().item()
    )


def _queue(model: Method) -> Queue | None:
    """The method's dictionary when it is a :class:`~mocolab.dictionaries.Queue` (MoCo, SimCLR
    v2's memory); the queue measures do not apply to a memory bank."""
    dictionary = model.dictionary
    return dictionary if isinstance(dictionary, Queue) else None


@torch.no_grad()
def training_diagnostics(
    model: Method,
    images: Tensor,
    views: Sequence[Callable[[Tensor, torch.Generator], Tensor]],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    max_images: int = 512,
    batch_size: int = 256,
) -> dict[str, float]:
    """The diagnostics a training loop logs (flat ``diag_*`` scalars), measured in eval mode on
    ``max_images`` fixed images (chosen by ``seed``) of ``images`` (uint8, the training set):
    alignment / uniformity / effective rank / per-dimension std of the backbone features of two
    views; the key encoder's agreement with the query encoder; and, for a queue that records its
    keys' images, the dictionary consistency (mean, and the oldest quarter of the keys).

    Its random numbers come from its own generator, so logging it does not change the run.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images.shape[0], generator=g)[:max_images].sort().values
    x = images[pick.to(images.device)].to(device)
    vg = torch.Generator(device=device).manual_seed(seed)
    x1, x2 = views[0](x, vg), views[-1](x, vg)
    backbone = model.backbone
    h1 = torch.cat([backbone(x1[s : s + batch_size]) for s in range(0, len(x1), batch_size)])
    h2 = torch.cat([backbone(x2[s : s + batch_size]) for s in range(0, len(x2), batch_size)])
    d = embedding_diagnostics(h1.float().cpu(), h2.float().cpu())
    out = {
        "diag_alignment": d["alignment"],
        "diag_uniformity": d["uniformity"],
        "diag_effective_rank": d["effective_rank"],
        "diag_std_ratio": d["std_mean"] / d["std_ideal"],
    }
    query_encoder = getattr(model, "query_encoder", None)
    key_encoder = model.momentum_encoder  # MoCo's key, BYOL's target, DINO's teacher encoder
    if query_encoder is not None and key_encoder is not None:
        out["diag_key_agreement"] = encoder_agreement(query_encoder, key_encoder, x1[:batch_size])
    queue = _queue(model)
    index = getattr(queue, "index", None)
    if (
        queue is not None
        and key_encoder is not None
        and index is not None
        and bool((index >= 0).any())
    ):
        known = (index >= 0).nonzero().squeeze(1)
        src = images[index[known].to(images.device)]
        re = torch.cat(
            [
                F.normalize(
                    key_encoder(eval_view(src[s : s + batch_size].to(device), size, mean, std)),
                    dim=1,
                )
                for s in range(0, src.shape[0], batch_size)
            ]
        )
        ages = queue_ages(int(queue.ptr), index.shape[0]).to(device)[known]
        c = dictionary_consistency(queue.keys()[known], re, ages.cpu() if ages.is_cuda else ages)
        out["diag_queue_consistency"] = c["mean"]
        out["diag_queue_consistency_oldest"] = c["by_age"][-1]
    model.train(was_training)
    return out


def load_method(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[Method, dict[str, Any]]:
    """The whole trained method of a run (encoders, heads, dictionary) in eval mode, and the
    checkpoint's info (with ``config`` and ``step``)."""
    ckpt = load_checkpoint(run_dir)
    info = ckpt["info"]
    check_backbone_info(ckpt["config"], info, run_dir)
    try:
        cfg = config_from_dict(ckpt["config"])

        def build() -> Method:
            return build_method(
                cfg,
                info["in_channels"],
                info["stem"],
                num_images=info.get("num_images"),
                image_size=info["crop_size"],
            )

        expected = expected_shapes(build)  # on the meta device: nothing allocated
        what = [] if expected is None else state_mismatch(expected, ckpt["model"])
        if what:
            raise ValueError(f"its weights do not fit its config: {'; '.join(what)}")
        model = build()
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"{run_dir}: the checkpoint's method {ckpt['config'].get('method')!r} "
            f"cannot be rebuilt by this mocolab ({str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), {**info, "config": ckpt["config"], "step": ckpt["step"]}


def _pretraining_images(ctx: Any, info: dict[str, Any], data: str | None) -> Tensor | None:
    """The images a run was pretrained on, whose rows a queue's ``index`` buffer names; ``None``
    when they cannot be had: another dataset was asked for (``--data``), or the data changed
    since (another number of images).

    The evaluation's train split is not it for a labelled folder without a test split (90% of
    the folder, in another order: :func:`mocolab.train.evaluation_splits`), so the pretraining
    split is loaded again then (folders from their decoded cache).
    """

    cfg = info["config"]
    if (data and data != cfg["data"]) or is_shards(cfg["data"]):  # shards: streamed, not held
        return None
    n = info.get("num_images")
    if ctx.test is None or len(ctx.train) == n:  # unlabelled (the whole set) or a real test split
        images = ctx.train.images
    else:
        images = load_dataset(
            cfg["data"],
            "train",
            root=ctx.config.get("data_root"),
            image_size=cfg["image_size"],
            num_workers=cfg["num_workers"],
        ).images
    return images if n is None or images.shape[0] == n else None


@torch.no_grad()
def run_diagnostics(
    run_dir: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    device: str = "auto",
    max_images: int = 2048,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Diagnostics of a saved run on up to ``max_images`` images of its evaluation split (the
    whole dataset when unlabelled), each seen in two views of the run's own augmentation.

    Returns a dict with ``backbone`` (pooled features) and ``embedding`` (the method's
    projection output, the space of the loss) measures of :func:`embedding_diagnostics`;
    ``key_encoder`` (:func:`encoder_agreement`) for momentum methods; ``queue`` (fill,
    effective rank and uniformity of the stored keys; :func:`dictionary_consistency` when the
    queue records which image each key came from, in an ``index`` buffer).
    """
    ctx = prepare(run_dir, data=data, data_root=data_root, device=device, labels=False)
    model, info = load_method(run_dir, ctx.device)
    images = (ctx.test if ctx.test is not None else ctx.train).images
    g = torch.Generator().manual_seed(seed)
    if images.shape[0] > max_images:
        images = images[torch.randperm(images.shape[0], generator=g)[:max_images].sort().values]
    cfg = info["config"]
    size, mean, std = info["crop_size"], info["mean"], info["std"]
    names = (
        model.view_recipes(cfg.get("augment"))
        if hasattr(model, "view_recipes")
        else [cfg.get("augment") or cfg["method"]]
    )
    views = ViewGenerator(recipe(names[0], size, mean=mean, std=std))  # the first view's recipe
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    backbone = model.backbone
    query_encoder = getattr(model, "query_encoder", None)
    key_encoder = model.momentum_encoder  # MoCo's key, BYOL's target, DINO's teacher encoder
    h1, h2, z1, z2, agree = [], [], [], [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(ctx.device)
        x1, x2 = views(x, gen), views(x, gen)
        h1.append(cpu_features(backbone(x1)))
        h2.append(cpu_features(backbone(x2)))
        if query_encoder is not None:
            z1.append(cpu_features(query_encoder(x1)))
            z2.append(cpu_features(query_encoder(x2)))
            if key_encoder is not None:
                agree.append(encoder_agreement(query_encoder, key_encoder, x1) * x.shape[0])
    out: dict[str, Any] = {
        "images": int(images.shape[0]),
        "step": info["step"],
        "backbone": embedding_diagnostics(torch.cat(h1), torch.cat(h2)),
    }
    if z1:
        out["embedding"] = embedding_diagnostics(torch.cat(z1), torch.cat(z2))
    if agree:
        out["key_encoder"] = {"agreement": sum(agree) / images.shape[0]}
    queue = _queue(model)
    if queue is not None:
        keys = queue.keys().cpu()
        q: dict[str, Any] = {
            "size": keys.shape[0],
            "filled": int(getattr(queue, "filled", keys.shape[0])),
            "effective_rank": effective_rank(keys),
            "uniformity": uniformity(keys),
        }
        index = getattr(queue, "index", None)
        source = _pretraining_images(ctx, info, data) if index is not None else None
        if (
            index is not None
            and key_encoder is not None
            and source is not None
            and (index >= 0).any()
        ):
            known = (index >= 0).cpu()
            src = source[index.cpu()[known]]  # the queue's indices are rows of the pretraining set
            re = torch.cat(
                [
                    F.normalize(
                        key_encoder(
                            eval_view(src[s : s + batch_size].to(ctx.device), size, mean, std)
                        ),
                        dim=1,
                    ).cpu()
                    for s in range(0, src.shape[0], batch_size)
                ]
            )
            ages = queue_ages(int(queue.ptr), keys.shape[0])[known]
            q["consistency"] = dictionary_consistency(keys[known], re, ages)
        else:
            q["consistency"] = None  # the queue does not record which image each key came from
        out["queue"] = q
    return out
