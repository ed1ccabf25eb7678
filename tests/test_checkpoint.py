"""Checkpoints are written atomically and loaded safely."""

import os

import pytest
import torch

from mocolab.checkpoint import CheckpointError, load_checkpoint, save_atomic


def good(path):
    save_atomic({"format": "mocolab", "model": {"w": torch.ones(2)}, "step": 3}, path)


def test_round_trip(tmp_path):
    good(tmp_path / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good(path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomic({"format": "mocolab", "model": Boom()}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "mocolab", "model": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_gives_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint.pt"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a mocolab checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
