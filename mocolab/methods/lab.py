"""CIE Lab inputs, shared by the methods that see an image as lightness and colour (CMC's L ↔ ab
views, colorization's L → ab).

Every mocolab backbone takes the normalised RGB batch ``(x − mean)/std``; a backbone that
works on Lab (:class:`LabBackbone`) undoes that normalisation (``input_mean`` /
``input_std``, buffers saved with its weights), converts to Lab with :func:`rgb_to_lab` and
normalises Lab as CMC's official code does (:data:`LAB_MEAN`, :data:`LAB_STD`).
:func:`lab_to_rgb` is the inverse, for pictures and for the colorization's in-gamut bins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError

# sRGB (linear) → CIE XYZ, D65 (the matrix of skimage.color, after Rec. 709 primaries).
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)  # reference white X_n, Y_n, Z_n (2° observer)
_DELTA = 6 / 29  # f(t) is linear below δ³
#: The official CMC code's Lab normalisation (``train_CMC.py``): L ∈ [0, 100] → [−1, 1], a and
#: b by the half-ranges of their values over sRGB (a ∈ [−86.183, 98.233], b ∈ [−107.857, 94.478]).
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """CIE L*a*b* (D65) of sRGB images, batched on their device: ``N×3×H×W`` in [0, 1] → ``N×3×H×W``
    with L ∈ [0, 100] (skimage's ``rgb2lab``).

    sRGB → linear (``c/12.92`` below 0.04045, else ``((c + 0.055)/1.055)^2.4``) → XYZ → divided
    by the D65 white → ``f(t) = t^(1/3)`` above ``(6/29)³``, else ``t/(3·(6/29)²) + 4/29`` →
    ``L = 116·f(Y) − 16``, ``a = 500·(f(X) − f(Y))``, ``b = 200·(f(Y) − f(Z))``.
    Computed in float32 whatever the input dtype (autocast does not reach it).
    """
    x = rgb.float().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white
    eps = _DELTA**3
    f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    return torch.cat([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor, clamp: bool = True) -> Tensor:
    """The inverse of :func:`rgb_to_lab`: ``N×3×H×W`` Lab → sRGB, clamped to [0, 1] unless
    ``clamp`` is False (then a colour outside the sRGB gamut has a channel outside [0, 1]).

    ``f_Y = (L + 16)/116``, ``f_X = f_Y + a/500``, ``f_Z = f_Y − b/200``; ``t = f³`` above
    ``6/29``, else ``3·(6/29)²·(f − 4/29)``; times the D65 white → XYZ → linear sRGB (the
    inverse matrix) → ``12.92·c`` below 0.0031308, else ``1.055·c^(1/2.4) − 0.055``.
    """
    x = lab.float()
    fy = (x[:, 0:1] + 16) / 116
    f = torch.cat([fy + x[:, 1:2] / 500, fy, fy - x[:, 2:3] / 200], dim=1)
    t = torch.where(f > _DELTA, f.pow(3), 3 * _DELTA**2 * (f - 4 / 29))
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(x)
    linear = torch.einsum("ij,njhw->nihw", inverse, t * white)
    c = linear.clamp_min(0)
    rgb = torch.where(linear > 0.0031308, 1.055 * c.pow(1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1) if clamp else rgb


def require_colour(channels: int, data: str, method: str, why: str) -> None:
    """Raise :class:`ConfigError` unless the images have 3 (RGB) channels: ``method`` works on
    Lab, ``why`` says what for (``"Lab split"``, ``"it predicts ab from L"``)."""
    if channels != 3:
        name = {"fashion-mnist": "Fashion-MNIST"}.get(data, data)
        raise ConfigError(
            f"{method} needs colour images ({why}); {name} is grayscale — use "
            "cifar10/stl10/a folder of colour images"
        )


class LabBackbone(nn.Module):
    """The base of backbones that see the normalised RGB batch of every mocolab backbone as Lab.

    ``input_mean`` and ``input_std`` (buffers, saved with the weights) undo the inputs'
    normalisation; :meth:`lab` gives Lab normalised by :data:`LAB_MEAN` / :data:`LAB_STD`
    (L/50 − 1, a and b by their half-ranges), in the input's dtype. A subclass sets
    ``num_features`` and :attr:`what` and defines ``forward``.
    """

    #: what the network(s) behind the conversion are, for messages ("two ResNets (...)")
    what: str = "a network on Lab channels"

    input_mean: Tensor
    input_std: Tensor
    lab_mean: Tensor
    lab_std: Tensor

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1))
        self.normalize_inputs(mean, std)
        self.register_buffer("lab_mean", torch.tensor(LAB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_std", torch.tensor(LAB_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def normalize_inputs(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the RGB normalisation of the inputs (per channel, or one value for all three)."""
        self.input_mean.copy_(torch.tensor([float(v) for v in mean]).expand(3).view(1, 3, 1, 1))
        self.input_std.copy_(torch.tensor([float(v) for v in std]).expand(3).view(1, 3, 1, 1))

    def rgb(self, x: Tensor) -> Tensor:
        """The RGB images in [0, 1] (float32) of a normalised batch."""
        return x.float() * self.input_std + self.input_mean

    def lab(self, x: Tensor) -> Tensor:
        """Normalised Lab (``N×3×H×W``, the input's dtype) of a normalised RGB batch."""
        return self.normalize_lab(rgb_to_lab(self.rgb(x))).to(x.dtype)

    def normalize_lab(self, lab: Tensor) -> Tensor:
        """Lab in its own units (L ∈ [0, 100]) → the normalised Lab the encoders see."""
        return (lab - self.lab_mean) / self.lab_std
