"""A run written before issue #16's restructuring still resumes and evaluates.

``tests/data/old_run`` is a tiny MoCo v2 run (synthetic data, a width-4 ResNet-18) written by
the code at commit 4e148c7 and stopped by Ctrl-C after step 3 of 6; ``expected.json`` holds
what that same code computed next: the losses of steps 4-6 of the uninterrupted run, and the
kNN accuracy of the step-3 checkpoint. Today's code must reproduce both from the old files:
the checkpoint's format (its keys, the model's state-dict names, the generator's state) is a
promise to every run on disk. To re-record, check out 4e148c7 and run
``python tests/test_old_checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import build_config
from mocolab.train import pretrain

OLD_RUN = Path(__file__).parent / "data" / "old_run"
EXPECTED = OLD_RUN / "expected.json"
OPTIONS = dict(method="mocov2", data="synthetic", image_size=16, width=4, stem="compact",
               dim=16, queue_size=64, batch_size=32, bn_splits=2, max_steps=6, lr=0.06,
               sgd_momentum=0.0,  # no momentum buffers: a smaller file (470 KB)
               compile=False, compile_views="off", device="cpu", threads=1,
               diagnostics_every=0, progress=False, log_every=1)
STOP_AT = 3


def platform() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0],
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def losses(run_dir: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"].hex() for r in rows if "loss" in r}


def test_old_run_resumes_exactly_and_evaluates(tmp_path, one_thread):
    expected = json.loads(EXPECTED.read_text())
    run = tmp_path / "old_run"
    shutil.copytree(OLD_RUN, run)
    assert load_checkpoint(run)["step"] == STOP_AT

    res = pretrain(resume=run, final_eval=False)
    assert res["step"] == 6 and not res.get("interrupted")
    got, want = losses(run), {int(s): h for s, h in expected["full_losses_hex"].items()}
    assert sorted(got) == list(range(1, 7))
    assert all(got[s] == want[s] for s in (1, 2, 3))  # the old rows are kept
    same_kernels = expected["platform"] == platform()
    if same_kernels:  # float kernels differ across CPUs / torch versions
        assert got == want
    else:
        for s in (4, 5, 6):
            assert float.fromhex(got[s]) == pytest.approx(float.fromhex(want[s]), rel=1e-4)

    old = tmp_path / "old_run_eval"
    shutil.copytree(OLD_RUN, old)
    assert main(["eval", "knn", str(old), "--k", "20", "--device", "cpu"]) == 0
    acc = json.loads((old / "eval_knn.json").read_text())
    tolerance = 0 if same_kernels else 100 * 2 / 256  # two of the 256 test images
    assert acc["top1"] == pytest.approx(expected["knn_top1"], abs=tolerance)
    assert acc["top5"] == pytest.approx(expected["knn_top5"], abs=tolerance)


if __name__ == "__main__":  # re-record (from the reference commit only)
    import subprocess
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        full = pretrain(build_config(**OPTIONS, out_dir=tmp, run_name="full"), final_eval=False)

        def interrupt(step: int, row: dict) -> None:
            if step == STOP_AT:
                os.kill(os.getpid(), signal.SIGINT)

        part = pretrain(build_config(**OPTIONS, out_dir=tmp, run_name="old_run"),
                        on_step=interrupt, final_eval=False)
        assert part["step"] == STOP_AT
        shutil.rmtree(OLD_RUN, ignore_errors=True)
        shutil.copytree(part["run_dir"], OLD_RUN, ignore=shutil.ignore_patterns("tb"))
        ev = Path(tmp) / "eval"
        shutil.copytree(OLD_RUN, ev)
        assert main(["eval", "knn", str(ev), "--k", "20", "--device", "cpu"]) == 0
        acc = json.loads((ev / "eval_knn.json").read_text())
        EXPECTED.write_text(json.dumps({
            "commit": commit, "platform": platform(),
            "full_losses_hex": losses(Path(full["run_dir"])),
            "knn_top1": acc["top1"], "knn_top5": acc["top5"]}, indent=1) + "\n")
    print(f"old run from {commit} written to {OLD_RUN}", file=sys.stderr)
