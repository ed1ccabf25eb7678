"""Checks shared by the tests of the methods: a tiny run's loss curve, and exact resume after
Ctrl-C (the same losses, weights and buffers bit for bit)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from mocolab.checkpoint import load_checkpoint
from mocolab.config import build_config
from mocolab.train import pretrain


def tiny_config(method: str, **overrides) -> dict:
    """The options of a tiny synthetic run of ``method`` (width 8, 16 px crops, batch 16, one
    thread, every step logged), with ``overrides``."""
    return dict(data="synthetic", method=method, width=8, stem="compact", batch_size=16,
                bn_splits=2, crop_size=16, epochs=1, progress=False, threads=1, log_every=1,
                diagnostics_every=0, **overrides)  # fmt: skip


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def resume_after_ctrl_c_continues_exactly(tiny: dict, tmp_path: Path, steps: int = 4) -> str:
    """Run ``tiny`` for ``steps`` steps whole, and again interrupted by SIGINT half way and
    resumed: the same losses and the same weights and buffers, bit for bit. The full run's
    directory (for more checks)."""
    full = pretrain(
        build_config(**tiny, max_steps=steps, out_dir=str(tmp_path), run_name="full"),
        final_eval=False,
    )

    def interrupt(step, row):
        if step == steps // 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = pretrain(
        build_config(**tiny, max_steps=steps, out_dir=str(tmp_path), run_name="part"),
        on_step=interrupt,
        final_eval=False,
    )
    assert part.get("interrupted") and part["step"] == steps // 2
    pretrain(resume=part["run_dir"], final_eval=False)
    assert losses(part["run_dir"]) == losses(full["run_dir"])
    assert len(losses(full["run_dir"])) == steps
    a, b = load_checkpoint(full["run_dir"]), load_checkpoint(part["run_dir"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    return full["run_dir"]
