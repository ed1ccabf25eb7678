"""Defaults that fit the device (channels-last, torch.compile, the stem of folder runs on a
CPU), the channels-last crash refused, and the expected-time line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mocolab import eta
from mocolab.cli import main
from mocolab.config import ConfigError, PretrainConfig
from mocolab.device_defaults import apply_device_defaults

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("data,device,expected", [
    # a folder on a CPU: compiled, no channels-last, the compact stem at the default 64 px
    ("photos", CPU, (False, True, "compact")),
    # the built-in demo on a CPU: eager, no channels-last, the stem by image size (later)
    ("fashion-mnist", CPU, (False, False, None)),
    # CUDA: the papers' settings, channels-last, eager
    ("photos", CUDA, (True, False, None)),
    ("cifar10", CUDA, (True, False, None)),
])
def test_unset_options_are_decided_by_device_and_data(data, device, expected):
    cfg = apply_device_defaults(PretrainConfig(data=data), device)
    assert (cfg.channels_last, cfg.compile, cfg.stem) == expected


def test_given_options_are_kept_and_stems_outside_the_cifar_range_are_not_changed():
    given = PretrainConfig(data="photos", channels_last=False, compile=False, stem="cifar")
    cfg = apply_device_defaults(given, CPU)
    assert (cfg.channels_last, cfg.compile, cfg.stem) == (False, False, "cifar")
    # 96 px and more get the imagenet stem by default, under 32 px the compact one already
    assert apply_device_defaults(PretrainConfig(data="p", image_size=128), CPU).stem is None
    small_crop = PretrainConfig(data="p", image_size=64, crop_size=24)
    assert apply_device_defaults(small_crop, CPU).stem is None
    assert apply_device_defaults(PretrainConfig(data="p", image_size=48), CPU).stem == "compact"


def test_channels_last_on_a_cpu_below_width_16_is_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--channels-last on a CPU with --width 8"):
        apply_device_defaults(PretrainConfig(width=8, channels_last=True), CPU)
    apply_device_defaults(PretrainConfig(width=16, channels_last=True), CPU)  # runs there
    apply_device_defaults(PretrainConfig(width=8, channels_last=True), CUDA)
    code = main(["pretrain", "--data", "synthetic", "--width", "8", "--channels-last",
                 "--out-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "drop --channels-last" in err


def test_the_combination_that_crashed_runs_with_the_defaults(tmp_path):
    """Issue #15 row 1: width 8, batch 32, 64 px on a CPU died in the backward of a strided
    1×1 conv in channels-last (exit 139); the default is no channels-last on a CPU now. In a
    subprocess, so a crash cannot take the test process with it."""
    cmd = [sys.executable, "-m", "mocolab", "pretrain", "--data", "synthetic", "--width", "8",
           "--batch-size", "32", "--image-size", "64", "--max-steps", "1", "--threads", "1",
           "--no-progress", "--no-final-eval", "--diagnostics-every", "0",
           "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_expected_time_line_is_given_once_from_the_timed_steps(monkeypatch):
    clock = iter([10.0, 22.0])  # perf_counter at the first and the last timed step
    monkeypatch.setattr(eta.time, "perf_counter", lambda: next(clock))
    synced = []
    timer = eta.RunTimer(0, 100, ["--epochs 4 (×0.50)"], sync=lambda: synced.append(1))
    first, last = eta.ETA_SKIP, eta.ETA_SKIP + eta.ETA_STEPS
    lines = [timer.after_step(s) for s in range(1, 100)]
    assert [i + 1 for i, line in enumerate(lines) if line] == [last]
    assert (first, last) == (2, 6)
    # 12 s over steps 3-6 = 3 s a step; 94 steps left: 282 s
    line = lines[last - 1]
    assert "about 4 min 42 s of training left for 94 of 100 steps (3.000 s a step" in line
    assert "timed on steps 3-6" in line and "--epochs 4" in line
    assert len(synced) == 2
    assert eta.RunTimer(0, last, []).after_step(last) is None  # too short a run: no line


def test_the_shorter_options_fit_the_run():
    cfg = PretrainConfig(data="photos", epochs=8, compile=True)
    assert eta.shorter_options(cfg, 64, folder=True) == [
        "--epochs 4 (×0.50)", "--image-size 48 (×0.56)", "--max-steps N"]
    cfg = PretrainConfig(epochs=1, compile=False)
    assert eta.shorter_options(cfg, 28, folder=False) == ["--compile (×0.67 on a CPU)",
                                                          "--max-steps N"]


def test_a_resumed_run_keeps_its_stem():
    # a run saved before the folder default has stem None in its options and a cifar stem in
    # its weights: resuming must not switch it to the compact stem
    cfg = apply_device_defaults(PretrainConfig(data="photos"), CPU, choose_stem=False)
    assert cfg.stem is None and cfg.compile is True
