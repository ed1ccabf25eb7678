"""Masks over a ViT's patch grid, drawn for a whole batch at once on the training device.

Three samplers, each the batched equivalent of an official one, with its randomness from a
``torch.Generator`` (the run's, saved with every checkpoint) and no loop over the images:

- :func:`random_masking`: a random subset of patches per image, by sorting noise (MAE,
  ``models_mae.py`` ``random_masking``; MSN's patch dropping, ``src/deit.py``, draws one
  subset for the whole batch: ``shared=True``).
- :func:`block_masks`: rectangles of patches added until a per-image count is reached (BEiT's
  ``MaskingGenerator``, as iBOT's ``loader.py`` ``ImageFolderMask`` and DINOv2's
  ``dinov2/data/masking.py`` use it); :func:`ibot_mask_counts` and :func:`dinov2_mask_counts`
  draw those counts as the two codes do.
- :func:`multiblock_masks`: I-JEPA's context and target blocks (``src/masks/multiblock.py``
  ``MaskCollator``): target blocks of one random size per batch, one large context block with
  the targets removed from it, truncated to equal counts across the batch.

A patch is numbered row-major on the ``H×W`` grid (``index = row·W + column``), the order of a
ViT's patch tokens (:class:`mocolab.vit.PatchEmbed`). The official samplers loop over the
images (and over tries) on the host; here every image's tries are drawn at once and the first
valid one is taken, which gives the same distribution. Where shapes depend on the draw (a block
size, the context's count), the sampler reads one small tensor back to the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def _device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


# --- (1) random patch masks: MAE, MSN --------------------------------------------------------


class RandomMask(NamedTuple):
    """A random mask of each image's ``L`` patches (MAE's ``random_masking``).

    Attributes:
        keep: ``N×K`` indices of the kept (visible) patches, in shuffled order (MAE ``ids_keep``).
        masked: ``N×(L−K)`` indices of the removed patches, in shuffled order.
        restore: ``N×L`` inverse permutation (MAE ``ids_restore``): ``cat([keep, masked])``
            gathered by it is ``0..L−1``.
        mask: ``N×L`` float, 1 for a removed patch and 0 for a kept one (MAE ``mask``).
    """

    keep: Tensor
    masked: Tensor
    restore: Tensor
    mask: Tensor


def num_kept(length: int, mask_ratio: float) -> int:
    """Patches kept of ``length`` when a ``mask_ratio`` of them is removed:
    ``int(L·(1 − ratio))`` (MAE's ``len_keep``; MSN's ``floor(L·(1 − patch_drop))``)."""
    return int(length * (1 - mask_ratio))


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shared: bool = False,
) -> RandomMask:
    """Per-sample random masking by per-sample shuffling (He et al. 2022, §3, and
    ``models_mae.py`` ``random_masking``): uniform noise ``N×L``, ``ids_shuffle = argsort(noise)``
    (small is kept), ``ids_restore = argsort(ids_shuffle)``, the first ``int(L·(1 − ratio))``
    kept. ``shared`` draws one shuffle for the whole batch (MSN's ``patch_drop``: one
    ``torch.randperm`` per batch in ``src/deit.py``).

    Args:
        batch: N.
        length: L, patches per image.
        mask_ratio: the fraction removed (MAE 0.75; MSN 0.15).
        generator: the random stream (its device is used unless ``device`` is given).
        shared: the same patches for every image of the batch.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = random_masking(2, 8, 0.75, generator=g)
        >>> m.keep.shape, m.masked.shape, m.mask.sum(1).tolist()
        (torch.Size([2, 2]), torch.Size([2, 6]), [6.0, 6.0])
        >>> torch.gather(torch.cat([m.keep, m.masked], 1), 1, m.restore).tolist()[0]
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    dev = _device(generator, device)
    noise = torch.rand(1 if shared else batch, length, generator=generator, device=dev)
    ids_shuffle = torch.argsort(noise.expand(batch, length), dim=1)  # small: keep, large: remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    k = num_kept(length, mask_ratio)
    mask = torch.ones(batch, length, device=dev)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)  # unshuffled: 1 where removed
    return RandomMask(ids_shuffle[:, :k], ids_shuffle[:, k:], ids_restore, mask)


# --- (2) blockwise masks: BEiT, iBOT, DINOv2 ---------------------------------------------------


def _rectangles(top: Tensor, left: Tensor, h: Tensor, w: Tensor, grid: tuple[int, int]) -> Tensor:
    """``…×H×W`` booleans, True inside the rectangle of rows ``[top, top+h)`` and columns
    ``[left, left+w)`` (each argument of shape ``…``)."""
    height, width = grid
    rows = torch.arange(height, device=top.device).view(height, 1)
    cols = torch.arange(width, device=top.device).view(1, width)
    t, lft = top[..., None, None], left[..., None, None]
    return (
        (rows >= t)
        & (rows < t + h[..., None, None])
        & (cols >= lft)
        & (cols < lft + w[..., None, None])
    )


def block_masks(
    counts: Tensor,
    grid: int | tuple[int, int],
    *,
    min_patches: float = 4,
    max_patches: float | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Blockwise masks (Bao et al. 2022, BEiT §2.5 Alg. 1; BEiT's ``masking_generator.py``, as
    iBOT's ``loader.py`` and DINOv2's ``dinov2/data/masking.py`` run it), ``N×H×W`` booleans.

    Image ``n`` gets rectangles until ``counts[n]`` patches are masked: while fewer are,
    ``remaining = min(counts[n] − masked, max_patches)`` and up to ``attempts`` tries draw an
    area ``s ~ U(min_patches, remaining)``, an aspect ``r = exp(U(log a, log b))``, a side
    ``h = round(√(s·r))``, ``w = round(√(s/r))`` and, when ``h < H`` and ``w < W``, a corner
    ``top ~ U{0..H−h}``, ``left ~ U{0..W−w}``; the first rectangle that adds between 1 and
    ``remaining`` new patches is masked. When none of the tries does, the image is done (it may
    stay below its count, as in the official code). All images run at once: a round draws every
    image's tries together; one host read per round asks whether any image is still going.

    Args:
        counts: ``N`` patches to mask per image (float or int: iBOT's ``ratio·H·W`` is a float;
            0 leaves the image unmasked).
        grid: ``H`` or ``(H, W)`` patches.
        min_patches: the smallest area drawn (BEiT and DINOv2: 4; iBOT's loader uses
            ``(min(H, W) // 3)²``).
        max_patches: the largest block (DINOv2: half the grid; ``None``: no bound, BEiT/iBOT).
        aspect: ``(a, b)``, the aspect range (0.3, 1/0.3).
        attempts: tries per block (10).
        generator: the random stream (on the device of the masks).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> masks = block_masks(torch.tensor([0.0, 20.0, 49.0]), 7, generator=g)
        >>> masks.shape, masks[0].sum().item(), 4 <= masks[1].sum().item() <= 20
        (torch.Size([3, 7, 7]), 0, True)
    """
    height, width = _grid(grid)
    lo, hi = aspect
    if not 0 < lo <= hi:
        raise ValueError(f"aspect must be (a, b) with 0 < a <= b, got {aspect}")
    dev = counts.device
    n = counts.shape[0]
    target = counts.to(device=dev, dtype=torch.float32)
    mask = torch.zeros(n, height, width, dtype=torch.bool, device=dev)
    masked = torch.zeros(n, device=dev)
    active = masked < target
    rows = torch.arange(n, device=dev)
    log_lo, log_hi = math.log(lo), math.log(hi)
    while bool(active.any()):  # one host read per round of blocks
        remaining = target - masked
        if max_patches is not None:
            remaining = remaining.clamp(max=max_patches)
        u = torch.rand(n, attempts, 4, generator=generator, device=dev)
        area = min_patches + (remaining[:, None] - min_patches) * u[..., 0]  # random.uniform(a, b)
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
        h = torch.round(torch.sqrt(area * ratio))  # round half to even, as Python's round
        w = torch.round(torch.sqrt(area / ratio))
        fits = (h < height) & (w < width)
        top = torch.floor(u[..., 2] * (height - h + 1))  # random.randint(0, H − h)
        left = torch.floor(u[..., 3] * (width - w + 1))
        rect = _rectangles(top, left, h, w, (height, width))  # N×A×H×W
        new = (rect & ~mask[:, None]).sum(dim=(2, 3)).float()  # N×A newly masked patches
        ok = fits & (new > 0) & (new <= remaining[:, None]) & active[:, None]
        first = ok.int().argmax(dim=1)  # the first valid try (argmax returns the first maximum)
        found = ok.any(dim=1)
        mask |= rect[rows, first] & found[:, None, None]
        masked = masked + new[rows, first] * found
        active = active & found & (masked < target)
    return mask


def ibot_mask_counts(
    batch: int,
    num_patches: int,
    ratios: tuple[float, ...] = (0.0, 0.3),
    ratio_vars: tuple[float, ...] = (0.0, 0.2),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """iBOT's per-image mask sizes (``loader.py`` ``get_pred_ratio``, the README's ``--pred_ratio
    0 0.3 --pred_ratio_var 0 0.2``): each image takes one of the ``(ratio, var)`` pairs at
    random and a ratio ``~ U(ratio − var, ratio + var)`` (``ratio`` when ``var`` is 0); the count
    is ``ratio·L`` (a float, iBOT's ``high``). With the defaults half of the images stay unmasked
    and the others mask 10–50 % of their patches. ``N`` floats, for :func:`block_masks`
    (``min_patches=(min(H, W) // 3)²`` as iBOT's loader).
    """
    if len(ratios) != len(ratio_vars) or not ratios:
        raise ValueError(f"ratios {ratios} and ratio_vars {ratio_vars} need the same length >= 1")
    if any(v > r for r, v in zip(ratios, ratio_vars)):
        raise ValueError(f"each ratio_var must be <= its ratio (iBOT asserts it), got {ratio_vars}")
    dev = _device(generator, device)
    r = torch.tensor(ratios, dtype=torch.float32, device=dev)
    v = torch.tensor(ratio_vars, dtype=torch.float32, device=dev)
    u = torch.rand(batch, 2, generator=generator, device=dev)
    pick = torch.floor(u[:, 0] * len(ratios)).long().clamp(max=len(ratios) - 1)  # random.choice
    ratio = r[pick] - v[pick] + 2 * v[pick] * u[:, 1]  # random.uniform(r − v, r + v)
    return ratio * num_patches


def dinov2_mask_counts(
    batch: int,
    num_patches: int,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """DINOv2's per-image mask sizes (``dinov2/data/collate.py`` ``collate_data_and_cast``):
    ``M = int(N·probability)`` images are masked, image ``i < M`` with
    ``int(L·U(p_i, p_{i+1}))`` patches where ``p = linspace(lo, hi, M + 1)`` (the ratios spread
    evenly over the range), the others with 0; then the images are shuffled. ``N`` integers, for
    :func:`block_masks` (``max_patches = L/2`` as DINOv2's ``train.py``)."""
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    dev = _device(generator, device)
    m = int(batch * probability)
    probs = torch.linspace(ratio_range[0], ratio_range[1], m + 1, device=dev)
    u = torch.rand(m, generator=generator, device=dev)
    counts = torch.zeros(batch, dtype=torch.long, device=dev)
    counts[:m] = (num_patches * (probs[:-1] + (probs[1:] - probs[:-1]) * u)).long()
    return counts[torch.randperm(batch, generator=generator, device=dev)]


# --- (3) I-JEPA's multi-block masks -----------------------------------------------------------


class MultiBlockMasks(NamedTuple):
    """I-JEPA's masks of a batch (``MaskCollator.__call__``'s ``masks_enc`` and ``masks_pred``).

    Attributes:
        context: ``N×K_c`` indices of the context patches, ascending, the same count for every
            image (each truncated to the batch's smallest).
        targets: ``N×M×K_t`` indices of the ``M`` target blocks' patches, row-major within a block
            (every block of a batch has the same size).
    """

    context: Tensor
    targets: Tensor


def jepa_block_size(
    u: float, grid: int | tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    """I-JEPA's block size from one uniform ``u`` (``_sample_block_size``): the same ``u`` sets
    the scale ``s = s_min + u·(s_max − s_min)`` and the aspect ``r = r_min + u·(r_max − r_min)``;
    ``h = round(√(⌊H·W·s⌋·r))``, ``w = round(√(⌊H·W·s⌋/r))``, each lowered below the grid's side."""
    height, width = _grid(grid)
    max_keep = int(height * width * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ratio)))
    w = int(round(math.sqrt(max_keep / ratio)))
    return min(h, height - 1), min(w, width - 1)


def multiblock_masks(
    batch: int,
    grid: int | tuple[int, int],
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
    allow_overlap: bool = False,
    attempts: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MultiBlockMasks:
    """I-JEPA's multi-block masking (Assran et al. 2023, §3 and App. C; ``src/masks/multiblock.py``
    ``MaskCollator``), for a batch at once.

    - One target size ``(h, w)`` and one context size per batch (:func:`jepa_block_size`; the
      context's aspect is 1).
    - Each image gets ``num_targets`` target blocks at corners ``top ~ U{0..H−h−1}``,
      ``left ~ U{0..W−w−1}`` (the code's ``torch.randint(0, H − h)``: a block never reaches the
      last row or column).
    - Its context block is drawn likewise and the targets are removed from it; it is kept when
      more than ``min_keep`` patches remain. After ``attempts`` failed tries the code drops the
      last target from the constraint, and so on; here every try is drawn at once (``attempts``
      per level, the unconstrained level last) and the first valid one taken.
      ``allow_overlap`` keeps the targets in the context.
    - The contexts are truncated to the batch's smallest count (their lowest indices kept, as
      the collator's ``cm[:min_keep_enc]``).

    Two small host reads: the block sizes, and the smallest context count.

    Raises:
        ValueError: a block of the drawn size cannot hold more than ``min_keep`` patches (the
            official sampler would loop forever).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = multiblock_masks(3, 14, generator=g)
        >>> m.targets.shape[:2], m.context.shape[0]
        (torch.Size([3, 4]), 3)
        >>> bool((m.context[:, :, None, None] == m.targets[:, None]).any())  # disjoint
        False
    """
    height, width = _grid(grid)
    length = height * width
    dev = _device(generator, device)
    u_target, u_context = torch.rand(2, generator=generator, device=dev).tolist()  # host read
    th, tw = jepa_block_size(u_target, (height, width), target_scale, target_aspect)
    ch, cw = jepa_block_size(u_context, (height, width), context_scale, (1.0, 1.0))
    for what, (h, w) in (("target", (th, tw)), ("context", (ch, cw))):
        if h * w <= min_keep or h < 1 or w < 1:
            raise ValueError(
                f"an I-JEPA {what} block of {h}x{w} patches on a {height}x{width} grid cannot "
                f"hold more than min_keep = {min_keep} patches; lower min_keep or enlarge the "
                "block scale"
            )
    n = batch
    # targets: N×M blocks, their patch indices row-major
    top = torch.randint(0, height - th, (n, num_targets), generator=generator, device=dev)
    left = torch.randint(0, width - tw, (n, num_targets), generator=generator, device=dev)
    i = torch.arange(th, device=dev).view(th, 1)
    j = torch.arange(tw, device=dev).view(1, tw)
    targets = ((top[..., None, None] + i) * width + left[..., None, None] + j).flatten(2)  # N×M×hw
    in_target = torch.zeros(n, num_targets, length, dtype=torch.bool, device=dev)
    in_target.scatter_(2, targets, True)
    # the region a context try at level k may use: outside the first M − k targets
    levels = 1 if allow_overlap else num_targets + 1
    taken = torch.zeros(n, levels, length, dtype=torch.bool, device=dev)
    for k in range(levels - 1):
        taken[:, k] = in_target[:, : num_targets - k].any(dim=1)
    tries = attempts * (levels - 1) + 1  # the last level (no constraint) always succeeds
    level = torch.clamp(torch.arange(tries, device=dev) // attempts, max=levels - 1)
    ctop = torch.randint(0, height - ch, (n, tries), generator=generator, device=dev)
    cleft = torch.randint(0, width - cw, (n, tries), generator=generator, device=dev)
    size_h = torch.full_like(ctop, ch)
    size_w = torch.full_like(ctop, cw)
    block = _rectangles(ctop, cleft, size_h, size_w, (height, width)).flatten(2)  # N×T×L
    candidate = block & ~taken[:, level]
    valid = candidate.sum(dim=2) > min_keep
    first = valid.int().argmax(dim=1)
    context = candidate[torch.arange(n, device=dev), first]  # N×L
    keep = int(context.sum(dim=1).min())  # host read: the batch's smallest context
    order = torch.argsort((~context).to(torch.int8), dim=1, stable=True)  # context first, ascending
    return MultiBlockMasks(order[:, :keep], targets)
