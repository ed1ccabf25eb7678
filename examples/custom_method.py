"""A method of your own, in your own file: PlainCLR, SimCLR without the BN of its head.

A method is a ``Method`` (its loss in ``forward``), a dataclass of its own options with their
defaults, and a builder registered under its ``--method`` name. Importing this file registers
``plainclr``; from then on ``mocolab.build_config(method="plainclr", ...)`` knows its options
(here ``temperature``), checks them and trains it with the one training loop, with everything a
built-in method gets: checkpoints, exact resume, evaluation, export.

    python examples/custom_method.py            # one epoch of Fashion-MNIST (about 2 min on 2 CPU cores)
    python examples/custom_method.py --tiny     # two steps on generated images
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch.nn.functional as F

import mocolab
from mocolab.config import PretrainConfig
from mocolab.heads import projection_head
from mocolab.losses import nt_xent_logits
from mocolab.methods import registry as r
from mocolab.methods.base import LossOutput, Method, encoder


class PlainCLR(Method):
    def __init__(self, backbone, *, dim: int, temperature: float) -> None:
        super().__init__()
        self.query_encoder = encoder(backbone, projection_head(backbone.num_features, dim))
        self.temperature = temperature

    def forward(self, views, generator=None, index=None) -> LossOutput:
        z1, z2 = (F.normalize(self.query_encoder(x), dim=1) for x in views)  # N×C each
        logits, labels = nt_xent_logits(z1, z2, self.temperature)
        return LossOutput(F.cross_entropy(logits, labels))


@dataclass
class PlainCLROptions(r.MethodOptions):
    temperature: float = r.temperature(0.1)  # a flag several methods share: one help text

    def validate(self, cfg: PretrainConfig) -> None:
        r.check_temperature(self.temperature)


@r.register_method("plainclr", options=PlainCLROptions,
                   defaults={"dim": 128, "head_layers": 2, "augment": "simclr"})  # fmt: skip
def build(backbone, cfg: PretrainConfig, o: PlainCLROptions, ctx: r.BuildContext) -> PlainCLR:
    return PlainCLR(backbone, dim=cfg.dim, temperature=o.temperature)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="two steps on generated images")
    p.add_argument("--out-dir", default="runs", help="where the run directory goes")
    args = p.parse_args()

    size = {"data": "fashion-mnist", "epochs": 1}
    if args.tiny or os.environ.get("MOCOLAB_EXAMPLES_TINY") == "1":
        from _tiny import TINY_RUN  # beside this file: seconds instead of minutes

        size = TINY_RUN
    cfg = mocolab.build_config(method="plainclr", temperature=0.2, out_dir=args.out_dir, **size)
    result = mocolab.pretrain(cfg)
    print(f"plainclr: {result['step']} steps, kNN top-1 {result['knn']['top1']:.2f} %, "
          f"run directory {result['run_dir']}")  # fmt: skip


if __name__ == "__main__":
    main()
