"""What the first layer learnt (its convolution kernels) and what a layer sees in an image
(its feature maps)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..augment import eval_view
from ._mpl import pyplot, save, show


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first ``nn.Conv2d`` of ``model`` in definition order (``conv1`` of a ResNet)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError("the model has no Conv2d layer to draw")


def kernel_images(weight: Tensor) -> Tensor:
    """Kernels ``O×I×h×w`` as displayable float images in [0, 1]: each kernel min-max scaled on
    its own (RGB for 3 input channels, gray for 1, the mean over channels otherwise)."""
    w = weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):
        w = w.mean(dim=1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    return (w - lo) / (hi - lo).clamp_min(1e-12)


def first_layer_kernels(model: nn.Module, path: str | Path, max_kernels: int = 64) -> Path:
    """Draw the first convolution's kernels (up to ``max_kernels``) as a grid of small images."""
    plt = pyplot()
    conv = first_conv(model)
    imgs = kernel_images(conv.weight)[:max_kernels]
    n = imgs.shape[0]
    cols = min(n, 16)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.6 * cols, 0.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        show(axes.flat[i], (imgs[i] * 255).round().to(torch.uint8))
    k = tuple(conv.weight.shape[2:])
    fig.suptitle(
        f"first-layer kernels: {conv.weight.shape[0]} × {conv.weight.shape[1]}×{k[0]}×{k[1]}",
        fontsize=9,
    )
    return save(fig, path)


@torch.no_grad()
def layer_output(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """The output of the sub-module named ``layer`` (as in ``model.named_modules()``, e.g.
    ``"layer2"`` or ``"layer3.1.conv2"``) when ``model`` runs on ``x``.

    Raises:
        ValueError: no such layer (the message lists the top-level names).
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        tops = [n for n, _ in model.named_children()]
        raise ValueError(
            f"the backbone has no layer {layer!r}; choose one of {', '.join(tops)} "
            "(or a dotted sub-module name such as layer3.1.conv2)"
        )
    captured: list[Tensor] = []
    handle = modules[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0]


def feature_maps(
    model: nn.Module,
    image: Tensor,
    layer: str,
    path: str | Path,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_maps: int = 32,
) -> Path:
    """Draw ``image`` (uint8 ``C×H×W``) and the ``max_maps`` most active channels of ``layer``'s
    output on it (each map scaled on its own; channels ordered by mean activation)."""
    plt = pyplot()
    device = next(model.parameters()).device
    x = eval_view(image.unsqueeze(0).to(device), size, mean, std)
    out = layer_output(model, layer, x)[0].float().cpu()  # C'×h×w
    if out.dim() != 3:
        raise ValueError(
            f"layer {layer!r} gives a {tuple(out.shape)} output, not feature maps; "
            "choose a convolutional layer"
        )
    order = out.mean(dim=(1, 2)).argsort(descending=True)[:max_maps]
    n = len(order) + 1
    cols = min(n, 9)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    show(axes.flat[0], image)
    axes.flat[0].set_title("input", fontsize=7)
    for i, c in enumerate(order.tolist()):
        ax = axes.flat[i + 1]
        ax.imshow(out[c].numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"ch {c}", fontsize=6)
    fig.suptitle(
        f"feature maps of {layer}: {out.shape[0]} channels of {out.shape[1]}×{out.shape[2]}",
        fontsize=9,
    )
    return save(fig, path)
