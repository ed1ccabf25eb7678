"""Behaviour pinned across refactors: the demo preset's first 40 losses, bit for bit.

The expected values (``tests/data/demo_losses.json``) were recorded from the code at commit
4e148c7, before the training loop was restructured (issue #16): a change that alters a single
bit of any of these losses changed what the demo computes. The run is the demo preset
(``--preset mocov2-fashion-mnist``) on the real Fashion-MNIST with two changes that leave its
arithmetic alone but make it fast and deterministic on a CPU: eager steps and eager views
(``--no-compile --compile-views off``; inductor's generated kernels could reorder sums), one
thread (a fixed reduction order), no diagnostics (they run after the last step).

Float results are only bit-identical for the same kernels: the file records the torch version
and CPU capability it was measured with, and the test is skipped (with the reason) elsewhere.
To re-record, check out 4e148c7 and run ``python tests/test_pinned_losses.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mocolab.config import build_config
from mocolab.train import pretrain

FMNIST = Path("/usr/share/datasets/fashion-mnist")
EXPECTED = Path(__file__).parent / "data" / "demo_losses.json"
STEPS = 40


def platform() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0],
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def demo_losses(out_dir: Path) -> list[float]:
    """The demo's first ``STEPS`` losses (eager, one thread, on the CPU)."""
    cfg = build_config("mocov2-fashion-mnist", data_root=str(FMNIST), out_dir=str(out_dir),
                       run_name="pin", max_steps=STEPS, compile=False, compile_views="off",
                       device="cpu", threads=1, diagnostics_every=0, progress=False)
    losses: list[float] = []
    pretrain(cfg, on_step=lambda step, row: losses.append(row["loss"]), final_eval=False)
    return losses


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"Fashion-MNIST is not installed at {FMNIST} "
                           "(apt-get install dataset-fashion-mnist)")
def test_demo_first_40_losses_are_unchanged_bit_for_bit(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    if expected["platform"] != platform():
        pytest.skip(f"losses recorded on {expected['platform']}, this is {platform()}: "
                    "float kernels differ, bit-for-bit equality is not expected")
    before = torch.get_num_threads()
    try:
        got = demo_losses(tmp_path)
    finally:
        torch.set_num_threads(before)
    assert [x.hex() for x in got] == expected["losses_hex"]


if __name__ == "__main__":  # re-record (from the reference commit only)
    import subprocess
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        values = demo_losses(Path(tmp))
    EXPECTED.write_text(json.dumps({"commit": commit, "platform": platform(), "steps": STEPS,
                                    "losses": values,
                                    "losses_hex": [x.hex() for x in values]}, indent=1) + "\n")
    print(f"{len(values)} losses from {commit} written to {EXPECTED}", file=sys.stderr)
