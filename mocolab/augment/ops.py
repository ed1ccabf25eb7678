"""Batched image operations with per-sample parameters: the math of the view pipeline.

Every function here is pure and deterministic: it takes float images in ``[0, 1]`` of shape
``N×C×H×W`` (``C`` = 1 or 3) and per-sample parameter tensors (row ``n`` applies to image
``n``), and returns a new tensor on the same device. Randomness lives in
:mod:`mocolab.augment.views`, which draws the parameters from a ``torch.Generator``.

Each operation reproduces the definition of the matching
``torchvision.transforms.v2.functional`` kernel on float tensors (the tests compare them image
by image), so a view here is the view the papers' torchvision pipelines produce, computed for
the whole batch at once on the training device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRAYSCALE_WEIGHTS",
    "resized_crop",
    "hflip",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "rgb_to_grayscale",
    "gaussian_kernel1d",
    "gaussian_blur",
    "solarize",
    "normalize",
    "to_device",
]

#: Luma weights of ITU-R 601-2 (R, G, B), exactly as torchvision writes them (0.2989, not 0.299).
GRAYSCALE_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` on ``device`` (and in ``dtype``) without making the host wait for the GPU.

    A blocking copy from the host to a GPU synchronises the stream first: the host waits
    until every queued kernel has run, so the GPU then idles while the host queues the next
    ones. The per-sample parameters drawn on the host are small, so they go with a
    non-blocking copy (from pageable memory CUDA stages them at once, without waiting for the
    device; pinning each small tensor costs more than it saves). Tensors already on ``device``
    are only converted.
    """
    if dtype is not None and t.device.type == "cpu":
        t = t.to(dtype)  # convert where the data is (the smaller copy for the GPU)
    return t.to(device=device, dtype=dtype, non_blocking=True)


def _per_sample(values: Tensor) -> Tensor:
    """``N`` → ``N×1×1×1`` so that a per-sample value broadcasts over an image batch."""
    return values.reshape(-1, 1, 1, 1)


def _select(mask: Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    """Per-sample ``where(mask, if_true, if_false)`` for ``N`` bool ``mask``.

    Written as ``lerp(if_false, if_true, mask)``, which is exact for weights 0 and 1 and, on
    CPU, several times faster than ``torch.where`` with a broadcast boolean mask.
    """
    weight = _per_sample(to_device(mask, if_false.device, if_false.dtype))
    return torch.lerp(if_false, if_true.expand_as(if_false), weight)


def _luma(images: Tensor) -> Tensor:
    """Grayscale ``N×1×H×W`` of RGB (ITU-R 601-2 weights) or the image itself for one channel."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    wr, wg, wb = GRAYSCALE_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _resize_weights(
    start: Tensor, length: Tensor, in_size: int, out_size: int, flip: Tensor | None = None
) -> Tensor:
    """Per-sample ``N×out_size×in_size`` interpolation matrices of an antialiased linear resize.

    Output pixel ``i`` of the crop ``[start, start + length)`` has its centre at
    ``c = start + s·(i + ½)`` with ``s = length / out_size`` input pixels per output pixel.
    Input pixel ``j`` (centre ``j + ½``) gets the triangle ("tent") weight
    ``max(0, 1 − |j + ½ − c| / max(s, 1))``, rows normalised to sum to 1, and only the pixels
    of the crop take part (torchvision crops first, then resizes; for a fractional box, the
    pixels it overlaps). This is the kernel of ``torch.nn.functional.interpolate(
    mode="bilinear", antialias=True, align_corners=False)``: plain bilinear interpolation when
    upscaling (``s ≤ 1``) and a tent filter widened to ``s`` pixels when downscaling. With
    ``flip`` (``N`` bool) the output order is reversed for those samples (a mirrored crop).
    """
    dtype, device = start.dtype, start.device
    scale = (length / out_size).unsqueeze(1)  # N×1
    inv_support = 1.0 / scale.clamp(min=1.0)  # N×1
    centres = scale * (torch.arange(out_size, device=device, dtype=dtype) + 0.5)  # N×out
    if flip is not None:
        centres = torch.where(flip.unsqueeze(1), centres.flip(1), centres)
    pixel = torch.arange(in_size, device=device, dtype=dtype) + 0.5 - start.unsqueeze(1)  # N×in
    inside = ((pixel > -0.5) & (pixel < length.unsqueeze(1) + 0.5)).to(dtype)  # N×in
    dist = (
        (pixel.unsqueeze(1) - centres.unsqueeze(2)).abs_().mul_(inv_support.unsqueeze(2))
    )  # N×out×in
    w = dist.neg_().add_(1.0).clamp_(min=0.0).mul_(inside.unsqueeze(1))
    return w.div_(w.sum(dim=2, keepdim=True).clamp_(min=torch.finfo(dtype).tiny))


def resized_crop(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box and resize it to ``size×size`` (the RandomResizedCrop kernel).

    ``out[n] = W_y[n] · images[n] · W_x[n]ᵀ`` with the separable per-sample interpolation
    matrices of :func:`_resize_weights`: bilinear with antialiasing, exactly
    ``torchvision.transforms.v2.functional.resized_crop(img, top, left, height, width,
    [size, size], antialias=True)`` on float images for integer boxes (to float rounding), for
    upscaling *and* downscaling.

    Why matrices and not ``roi_align`` or ``grid_sample``: both alternatives sample the image at
    a few points per output pixel and read pixels outside the box near its border, where
    torchvision clamps to the crop. Measured against torchvision on random MoCo v2 boxes
    (256 images, float32 in [0, 1]): ``grid_sample`` (bilinear) and ``roi_align(aligned=True,
    sampling_ratio=0)`` differ by up to 0.3–0.4 at crop borders (mean 4e-3) at equal size, and
    when downscaling 96 → 32 px ``grid_sample`` aliases (mean error 0.11) and ``roi_align``'s
    box average is not the tent filter (mean 0.027); the matrices agree to 3e-7 in every case.
    Time per 256-image batch on one CPU thread: 28 → 28 px grayscale 1.4 ms (roi_align 2.9, grid_sample 3.3),
    32 → 32 RGB about the same as both (≈ 5.6 ms), 96 → 32 RGB 27 ms (roi_align 28,
    grid_sample 8), 96 → 96 RGB 94 ms (both ≈ 49 ms): the dense matmuls cost
    ``O(C·size·H·(W + size))`` per image, a fair price for exactness on the small images this
    library trains on by CPU, and negligible on a GPU. (On CUDA the matmuls follow
    ``torch.backends.cuda.matmul.allow_tf32``.) The flip comes for free: the columns' centres
    are taken in reverse order.

    Args:
        images: ``N×C×H×W`` float images.
        boxes: ``N×4`` (top, left, height, width) in pixels; floats allowed (the crop is the
            continuous box, interpolating among the pixels it overlaps).
        size: output side in pixels.
        flip: optional ``N`` bool; where True the output is mirrored left–right (the same as
            :func:`hflip` afterwards, for free).

    Returns:
        ``N×C×size×size`` images, dtype of ``images``.
    """
    n, _, height, width = images.shape
    b = to_device(boxes, images.device, images.dtype)
    top, left, box_h, box_w = b.unbind(dim=1)
    if flip is not None:
        flip = to_device(flip, images.device)
    if height == width:  # one call builds both matrices
        flips = None if flip is None else torch.cat([torch.zeros_like(flip), flip])
        w_y, w_x = _resize_weights(
            torch.cat([top, left]), torch.cat([box_h, box_w]), height, size, flips
        ).split(n)
    else:
        w_y = _resize_weights(top, box_h, height, size)  # N×size×H
        w_x = _resize_weights(left, box_w, width, size, flip)  # N×size×W
    return _separable(images, w_y, w_x)


def _separable(images: Tensor, w_y: Tensor, w_x: Tensor) -> Tensor:
    """``out[n, c] = w_y[n] · images[n, c] · w_x[n]ᵀ``: a per-sample separable linear map
    (``w_y``: ``N×H'×H``, ``w_x``: ``N×W'×W``) as two batched matrix products."""
    n, c, height, width = images.shape
    out_h, out_w = w_y.shape[1], w_x.shape[1]
    out = torch.bmm(images.reshape(n, c * height, width), w_x.transpose(1, 2))  # N×(C·H)×W'
    out = out.reshape(n, c, height, out_w).transpose(1, 2).reshape(n, height, c * out_w)
    out = torch.bmm(w_y, out)  # N×H'×(C·W')
    return out.reshape(n, out_h, c, out_w).transpose(1, 2).contiguous()  # N×C×H'×W'


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror left–right the images where ``mask`` (``N`` bool) is True (RandomHorizontalFlip)."""
    return _select(mask, images.flip(-1), images)


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------


def _blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    """``clamp(f·x + (1 − f)·y, 0, 1)`` per sample: torchvision's ``_blend`` (computed as
    ``lerp(y, x, f)``, one pass, exact for ``f = 1``)."""
    f = _per_sample(to_device(factors, images.device, images.dtype))
    return torch.lerp(other.expand_as(images), images, f).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Brightness: ``clamp(f·x, 0, 1)`` per sample (blend with black), as torchvision."""
    return (images * _per_sample(to_device(factors, images.device, images.dtype))).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Contrast: blend with the mean of the image's grayscale, ``clamp(f·x + (1 − f)·μ)``,
    μ one scalar per image, as torchvision."""
    mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)  # N×1×1×1
    return _blend(images, mean, factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Saturation: blend with the grayscale image; identity on one channel (as torchvision,
    which follows PIL)."""
    if images.shape[1] == 1:
        return images.clone()
    return _blend(images, _luma(images), factors)


def _shift_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """RGB → HSV, ``h ← (h + shift) mod 1``, HSV → RGB for an RGB batch; shifts ``N`` turns.

    RGB→HSV follows Pillow as torchvision does: ``v = max``, ``s = (max − min)/max`` and the hue
    in sextants from the largest channel (red first, then green): ``(g − b)/Δ``,
    ``2 + (b − r)/Δ`` or ``4 + (r − g)/Δ``. HSV→RGB is the six-sector table (p, q, t) in its
    closed form ``c = v − v·s·clamp(2 − |k − 2|, 0, 1)``, ``k = (n + 6h) mod 6`` with
    ``n = 5, 3, 1`` for R, G, B; since ``v·s = Δ`` no division by ``v`` is needed. Masks are
    float 0/1 and most steps in place: boolean masks and ``where`` are slow on CPU.
    """
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # N×H×W
    delta = maxc - torch.minimum(torch.minimum(r, g), b)  # v·s
    is_r = (maxc - r).eq_(0.0)  # 1.0 where red is the maximum
    is_g = (maxc - g).eq_(0.0).mul_(1.0 - is_r)  # green, unless red ties
    is_b = (1.0 - is_r).sub_(is_g)
    h6 = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    h6.div_(delta.clamp(min=torch.finfo(images.dtype).tiny))  # Δ = 0 ⇒ numerator = 0
    h6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)  # sextants in [−1, 5]
    h6.add_(6.0 * to_device(shifts, images.device, images.dtype).reshape(-1, 1, 1))
    n = torch.arange(5.0, 0.0, -2.0, dtype=images.dtype, device=images.device).reshape(
        1, 3, 1, 1
    )  # 5, 3, 1
    k = h6.unsqueeze(1) + n  # N×3×H×W
    k.sub_(k.div(6.0).floor_().mul_(6.0))  # mod 6
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return ramp.mul_(delta.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1)).clamp_(0.0, 1.0)


def adjust_hue(images: Tensor, factors: Tensor) -> Tensor:
    """Hue: rotate the hue channel of HSV by ``f ∈ [−½, ½]`` turns per sample, as torchvision
    (RGB→HSV, shift, HSV→RGB); identity on one channel."""
    if images.shape[1] == 1:
        return images.clone()
    return _shift_hue(images, factors)


def color_jitter(
    images: Tensor, factors: Tensor, order: Tensor, mask: Tensor | None = None, static: bool = False
) -> Tensor:
    """ColorJitter with per-sample factors and a per-sample order of the four adjustments.

    torchvision's ``ColorJitter`` applies brightness (0), contrast (1), saturation (2) and
    hue (3) in a random permutation drawn for every image. Here ``order[n, slot]`` is the
    adjustment that sample ``n`` applies in ``slot``; the loop runs over the 4 slots, never over
    samples. In each slot the three blends are one expression,
    ``clamp(f·x + (1 − f)·y, 0, 1)`` with ``y`` = 0 (brightness), the grayscale mean
    (contrast) or the grayscale image (saturation), and ``f = 1`` (the identity, exactly) for
    samples whose slot holds the hue; the hue rotation runs on just the samples that need it
    (a hue factor of exactly 0, e.g. a hue strength of 0, is the identity and is skipped, as
    torchvision skips an adjustment of strength 0).

    Args:
        images: ``N×C×H×W`` float images in [0, 1].
        factors: ``N×4`` (brightness, contrast, saturation, hue) factors.
        order: ``N×4`` integer permutations of ``0..3``.
        mask: optional ``N`` bool; samples where False are returned unchanged (RandomApply).
        static: rotate the hue of every sample in every slot and keep it where needed, instead
            of selecting those samples on the host: no shapes that depend on the parameters,
            which :func:`torch.compile` (and a CUDA graph) needs; 4× the hue arithmetic, which
            inductor fuses into the slot's one pass over the images.

    Returns:
        The jittered ``N×C×H×W`` images.
    """
    x = images
    rgb = images.shape[1] == 3
    # The samples whose hue turns in each slot, found where the parameters live: on the host
    # (as the training loop draws them) this needs no wait for the GPU.
    hue_slots = order.long() == 3
    hue_slots &= (factors[:, 3] != 0).unsqueeze(1)  # a zero shift is the identity: skip it
    if mask is not None:
        hue_slots &= mask.unsqueeze(1)
    hue_index = (
        [hue_slots[:, slot].nonzero().squeeze(1) for slot in range(4)] if rgb and not static else []
    )
    factors = to_device(factors, images.device, images.dtype)
    order = to_device(order.long(), images.device)
    if mask is not None:
        mask = to_device(mask, images.device)
    for slot in range(4):
        op = order[:, slot]  # N
        active = op != 3 if rgb else op <= 1  # saturation and hue are identities on gray
        if mask is not None:
            active = active & mask
        f = torch.where(active, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0)  # N
        gray = _luma(x)  # N×1×H×W
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # N×1×1×1
        # y = 0 (brightness), μ (contrast) or the grayscale image (saturation), per sample:
        target = mean * _per_sample(op == 1).to(x.dtype)
        if rgb:
            target = torch.addcmul(target, gray, _per_sample(op == 2).to(x.dtype))
        x = _blend(x, target, f)
        if rgb and static:
            turn = _per_sample(to_device(hue_slots[:, slot], images.device))
            x = torch.where(turn, _shift_hue(x, factors[:, 3]), x)
        elif rgb and hue_index[slot].numel():
            idx = to_device(hue_index[slot], images.device)
            x.index_copy_(0, idx, _shift_hue(x.index_select(0, idx), factors[idx, 3]))
    return x


def rgb_to_grayscale(images: Tensor, mask: Tensor) -> Tensor:
    """RandomGrayscale: replace the samples where ``mask`` is True by their luma
    ``0.2989·R + 0.587·G + 0.114·B`` (ITU-R 601-2 as torchvision), keeping the channel count;
    identity for one channel."""
    if images.shape[1] == 1:
        return images.clone()
    return _select(mask, _luma(images), images)


def gaussian_kernel1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """``N×k`` Gaussian kernels, torchvision's ``_get_gaussian_kernel1d`` per sample:
    ``w_i ∝ exp(−(i − (k−1)/2)² / (2σ²))`` normalised to sum 1 (a softmax)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-(x.unsqueeze(0) / sigma.unsqueeze(1)).pow(2), dim=1)


@functools.lru_cache(maxsize=16)
def _reflect_taps(size: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``size×k×size`` one-hot: tap ``t`` of output pixel ``i`` reads input pixel
    ``reflect(i + t − k//2)`` (reflection without repeating the edge, ``F.pad``'s "reflect").
    The same for every batch of a view size, so built once per (size, k, dtype, device)."""
    j = torch.arange(size).unsqueeze(1) + torch.arange(k) - k // 2
    j = torch.where(j < 0, -j, j)
    j = torch.where(j >= size, 2 * (size - 1) - j, j)  # size×k source pixels
    return F.one_hot(j, size).to(device=device, dtype=dtype)


def _blur_matrices(kernels: Tensor, size: int) -> Tensor:
    """``N×size×size`` matrices of the 1-D convolution with ``kernels`` (``N×k``, odd ``k``)
    and reflect padding of ``k // 2``: row ``i`` holds ``kernels[n, t]`` at column
    ``reflect(i + t − k//2)``; taps that reflect onto the same pixel add up."""
    # eager: built once and cached; compiled: traced (a constant of the program), not cached
    build = _reflect_taps.__wrapped__ if torch.compiler.is_compiling() else _reflect_taps
    taps = build(size, kernels.shape[1], kernels.dtype, kernels.device)
    return torch.einsum("nt,itj->nij", kernels, taps)


def gaussian_blur(
    images: Tensor, sigma: Tensor, kernel_size: int, mask: Tensor | None = None
) -> Tensor:
    """GaussianBlur with a per-sample σ (SimCLR App. A, MoCo v2: σ ~ U[0.1, 2]).

    The separable convolution with the kernel of :func:`gaussian_kernel1d` and reflect
    padding of ``k // 2`` pixels: exactly torchvision's ``gaussian_blur`` (its 2-D kernel is
    the outer product of the two 1-D kernels, and 2-D reflect padding is the product of 1-D
    ones). Each pass is a per-sample banded ``size×size`` matrix with the padding folded in
    (:func:`_blur_matrices`), applied by batched matrix products as in :func:`resized_crop`:
    two dense, regular kernels whatever σ and ``k``, that :func:`torch.compile` fuses with
    their neighbours, where a depthwise convolution with one kernel per (sample, channel)
    pair is slow on GPUs and needs a padded copy. (On CUDA the products follow
    ``torch.backends.cuda.matmul.allow_tf32``, off by default.)

    Args:
        images: ``N×C×H×W`` float images.
        sigma: ``N`` standard deviations in pixels (> 0).
        kernel_size: odd ``k`` with ``k // 2 < min(H, W)``.
        mask: optional ``N`` bool; samples where False are returned unchanged.
    """
    n, c, h, w = images.shape
    kernel = gaussian_kernel1d(to_device(sigma, images.device, images.dtype), kernel_size)  # N×k
    w_y = _blur_matrices(kernel, h)
    out = _separable(images, w_y, w_y if w == h else _blur_matrices(kernel, w))
    if mask is None:
        return out
    return _select(mask, out, images)


def solarize(images: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Solarization (BYOL): ``x ← 1 − x`` where ``x ≥ threshold``, for the samples in ``mask``."""
    return torch.where(
        _per_sample(to_device(mask, images.device)) & (images >= threshold), 1.0 - images, images
    )


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """``(x − mean) / std`` per channel; a single value applies to every channel."""
    m = to_device(torch.as_tensor(mean), images.device, images.dtype).reshape(1, -1, 1, 1)
    s = to_device(torch.as_tensor(std), images.device, images.dtype).reshape(1, -1, 1, 1)
    return images.sub(m).div_(s)
