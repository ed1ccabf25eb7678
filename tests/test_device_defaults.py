"""Defaults that fit the device (channels-last, torch.compile, the stem of folder runs on a
CPU, the view path by device and view size), the channels-last crash refused, and the
expected-time line."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from run_helpers import losses, tiny_config

from mocolab import device_defaults, eta
from mocolab.checkpoint import load_checkpoint
from mocolab.cli import main
from mocolab.config import ConfigError, PretrainConfig, build_config
from mocolab.device_defaults import (
    CPU_VIEW_RATES,
    apply_device_defaults,
    choose_view_path,
    per_image_speedup,
)
from mocolab.train import pretrain

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


# --- the view path: the faster one for the device and the view size ---------------------------


def test_the_speed_up_is_read_off_the_table_and_interpolated_in_log_size(monkeypatch):
    # (per-image, batched eager, batched compiled) images/s at 100 and 400 px
    monkeypatch.setattr(device_defaults, "CPU_VIEW_RATES", {100: (200, 100, 50), 400: (100, 400, 100)})
    assert per_image_speedup(100, compiled=False) == pytest.approx(2.0)
    assert per_image_speedup(100, compiled=True) == pytest.approx(4.0)
    assert per_image_speedup(400, compiled=False) == pytest.approx(0.25)
    # 200 px is half-way from 100 to 400 in log size: the geometric mean of the two ratios
    assert per_image_speedup(200, compiled=False) == pytest.approx(math.sqrt(2.0 * 0.25))
    assert per_image_speedup(200, compiled=True) == pytest.approx(math.sqrt(4.0 * 1.0))
    # beyond the measured sizes: the nearest one's
    assert per_image_speedup(32, compiled=False) == pytest.approx(2.0)
    assert per_image_speedup(800, compiled=False) == pytest.approx(0.25)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("size", sorted(CPU_VIEW_RATES))
def test_on_a_cpu_auto_takes_the_path_measured_faster_at_the_view_size(size, compiled):
    per_image, eager, fused = CPU_VIEW_RATES[size]
    faster = per_image > (fused if compiled else eager)
    cfg, line = choose_view_path(PretrainConfig(data="photos"), CPU, size, shards=False,
                                 compiled_views=compiled)
    assert cfg.augment_backend == ("torchvision" if faster else "batched")
    assert line is not None and f"at {size} px on a CPU; --augment-backend to choose" in line
    assert line.startswith("views: per-image (PIL, 2 workers)" if faster else "views: batched")


def test_gpus_and_shards_keep_the_batched_views_and_a_chosen_path_is_kept():
    for device, shards in ((CUDA, False), (CPU, True)):
        cfg, line = choose_view_path(PretrainConfig(), device, 224, shards=shards, compiled_views=True)
        assert cfg.augment_backend == "batched" and line is not None
        assert line.startswith("views: batched (compiled), for " + ("shards" if shards else "cuda"))
    for given in ("batched", "torchvision"):
        cfg, line = choose_view_path(PretrainConfig(augment_backend=given), CPU, 224,
                                     shards=False, compiled_views=False)
        assert (cfg.augment_backend, line) == (given, None)
    # the measured ends: batched views for Fashion-MNIST's 28 px, PIL in the workers at 224
    small = choose_view_path(PretrainConfig(), CPU, 28, shards=False, compiled_views=False)
    large = choose_view_path(PretrainConfig(), CPU, 224, shards=False, compiled_views=True)
    assert (small[0].augment_backend, large[0].augment_backend) == ("batched", "torchvision")


def test_auto_says_its_choice_and_a_resumed_run_keeps_the_path_it_started_on(
    tmp_path, monkeypatch, capsys
):
    """A table on which the per-image path wins at 16 px: the run starts on it and says so;
    stopped by Ctrl-C and resumed after the table changed its mind, the run stays on it (its
    checkpoint holds the choice) and repeats the uninterrupted run exactly."""
    monkeypatch.setattr(device_defaults, "CPU_VIEW_RATES", {16: (200, 100, 100)})
    tiny = tiny_config("mocov2", workers=0, max_steps=4, out_dir=str(tmp_path))
    full = pretrain(build_config(**tiny, run_name="full"), final_eval=False)
    out = capsys.readouterr().out
    assert "views: per-image (PIL, in the main process), 2.0× faster than batched (eager) at " \
           "16 px on a CPU; --augment-backend to choose" in out

    def interrupt(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = pretrain(build_config(**tiny, run_name="part"), on_step=interrupt, final_eval=False)
    assert part.get("interrupted") and part["step"] == 2
    monkeypatch.setattr(device_defaults, "CPU_VIEW_RATES", {16: (100, 200, 200)})
    pretrain(resume=part["run_dir"], final_eval=False)
    assert "views:" not in capsys.readouterr().out.split("resuming at step 2")[1]
    saved = yaml.safe_load((tmp_path / "part" / "config.yaml").read_text())
    assert saved["augment_backend"] == "torchvision"
    assert losses(part["run_dir"]) == losses(full["run_dir"]) and len(losses(full["run_dir"])) == 4
    a, b = load_checkpoint(full["run_dir"]), load_checkpoint(part["run_dir"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
