"""Projection heads placed after the backbone's pooled features."""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, out_dim: int, hidden_dim: int | None = None,
                    num_layers: int = 2, batch_norm: bool = False,
                    last_batch_norm: bool = False) -> nn.Module:
    """An MLP ``in_dim → hidden_dim → ... → out_dim`` with ReLU between layers.

    - ``num_layers=1``: a single linear layer (MoCo v1's 128-d fc).
    - ``num_layers=2``: ``fc → ReLU → fc`` (MoCo v2 / SimCLR's 2-layer MLP head, hidden 2048
      on ImageNet, i.e. the backbone's width).
    - ``batch_norm``: BN after each hidden layer (SimCLR v2, BYOL, MoCo v3);
      ``last_batch_norm``: BN without affine on the output (MoCo v3).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    hidden_dim = hidden_dim or in_dim
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
