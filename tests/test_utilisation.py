"""Utilisation in every run: the FLOPs of a step against hand counts, the peak and its cache,
the data-wait share of a run whose loader is slowed, the new keys of ``metrics.jsonl``, the kNN
of the encoder at the start, and the report's curves and tables that show them."""

from __future__ import annotations

import doctest
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mocolab import utilisation
from mocolab.config import build_config
from mocolab.train import Run, _KnnMonitor, pretrain
from mocolab.utilisation import (
    PEAK_FILE,
    RUN_FILE,
    Peak,
    UtilisationMeter,
    count_flops,
    datasheet_peak,
    peak_flops,
    step_flops,
)

TINY = dict(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4, queue_size=96,
            crop_size=16, epochs=1, knn_k=20, knn_bank=0, knn_queries=0, progress=False,
            threads=1, diagnostics_every=0)  # fmt: skip


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_the_module_examples_run(one_thread):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(utilisation):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 8


# --- FLOPs against hand counts -----------------------------------------------------------------


@pytest.mark.parametrize("input_grad", [True, False])
def test_linear_forward_and_backward_is_6ndk(input_grad, one_thread):
    """A Linear N×D→K: forward N·D·K multiply-adds (2NDK FLOPs); backward the same for the
    weight's gradient and, when the input needs one, again for the input's: 6NDK (4NDK)."""
    n, d, k = 12, 20, 7
    layer = nn.Linear(d, k)
    x = torch.randn(n, d, requires_grad=input_grad)
    flops = count_flops(lambda: layer(x).sum().backward())
    assert flops == (6 if input_grad else 4) * n * d * k


def test_conv_forward_and_backward_by_hand(one_thread):
    """Conv2d 3→5, 3×3, stride 2, padding 1 on 2×3×9×9: the output is 2×5×5×5 and each output
    value is 3·3·3 multiply-adds; forward 2·(2·5·5·5)·27 FLOPs; backward the weight's and the
    input's gradients, as much each."""
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    forward = 2 * (2 * 5 * 5 * 5) * (3 * 3 * 3)
    assert count_flops(lambda: conv(x)) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


class Step(nn.Module):
    """A step that draws random numbers (dropout, an explicit generator), keeps batch-norm
    statistics and a python counter: what counting must leave as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.calls = 0

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        noise = torch.rand(x.shape, generator=generator)
        return self.net(x + noise).square().mean()


def test_step_flops_leave_weights_statistics_and_random_streams_alone(one_thread):
    torch.manual_seed(0)
    model = Step()
    x = torch.randn(32, 16)
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    global_rng, gen_state = torch.get_rng_state(), generator.get_state()

    flops = step_flops(model, lambda m: m(x, utilisation.fork(generator)))

    # Linear 32×16→8, input without gradient: forward + weight gradient, 2 × 2·32·16·8
    assert flops == 2 * 2 * 32 * 16 * 8
    assert model.calls == 0 and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert torch.equal(generator.get_state(), gen_state)


def test_a_compiled_module_is_counted_eagerly_on_a_copy(one_thread):
    """``nn.Module.compile`` keeps the compiled call on the module; a copy of it would run the
    original module. The count runs the copy eagerly: the original never runs (nothing is
    compiled) and the count equals the eager module's."""
    model = Step()
    x = torch.randn(32, 16)
    eager = step_flops(model, lambda m: m(x, torch.Generator().manual_seed(0)))
    model.compile()
    compiled = step_flops(model, lambda m: m(x, torch.Generator().manual_seed(0)))
    assert compiled == eager and model.calls == 0


# --- the peak and its cache --------------------------------------------------------------------


def test_known_gpus_take_their_datasheet_peak():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == ("H100 SXM / H200", 989.4)
    assert datasheet_peak("NVIDIA H100 PCIe", "tf32") == ("H100 PCIe", 378.0)
    assert datasheet_peak("NVIDIA H200", "bfloat16")[1] == 989.4
    assert datasheet_peak("NVIDIA A100-PCIE-40GB", "bfloat16") == ("A100", 312.0)
    assert datasheet_peak("NVIDIA L4", "bfloat16") == ("L4", 121.0)
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bfloat16") is None  # no bf16 tensor cores
    assert datasheet_peak("NVIDIA A10G", "bfloat16") is None  # not the A10: measured
    assert datasheet_peak("NVIDIA GeForce RTX 3050", "float32") is None


def test_the_peak_is_measured_once_per_device_dtype_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(utilisation, "measure_peak",
                        lambda device, dtype: measured.append(dtype) or 5e10)  # fmt: skip
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = peak_flops(cpu, "float32")
        again = peak_flops(cpu, "float32")
        assert measured == ["float32"] and first.flops == again.flops == 5e10
        assert first.threads == 1 and "1 thread" in first.how and str(tmp_path) in first.how
        peak_flops(cpu, "bfloat16")  # another dtype: measured
        torch.set_num_threads(2)
        peak_flops(cpu, "float32")  # another thread count: measured
        assert measured == ["float32", "bfloat16", "float32"]
        cache = json.loads((tmp_path / "cache" / PEAK_FILE).read_text())
        assert len(cache) == 3 and all(utilisation.device_name(cpu) in key for key in cache)
        (tmp_path / "cache" / PEAK_FILE).write_text("{not json")  # damaged: measured again
        assert peak_flops(cpu, "float32").flops == 5e10 and len(measured) == 4
        (tmp_path / "cache" / PEAK_FILE).write_text("[1, 2]")  # JSON, but not a table
        assert peak_flops(cpu, "float32").flops == 5e10 and len(measured) == 5
        assert json.loads((tmp_path / "cache" / PEAK_FILE).read_text())  # a table again
    finally:
        torch.set_num_threads(before)


def test_measuring_again_keeps_the_higher_peak(tmp_path, monkeypatch):
    # a peak measured on a busy machine is too low, never too high: measuring again may raise
    # the kept figure, never lower it
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path))
    figures = iter([2e10, 5e10, 3e10])
    monkeypatch.setattr(utilisation, "measure_peak", lambda device, dtype: next(figures))
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "float32").flops == 2e10  # measured on a busy machine
    assert peak_flops(cpu, "float32").flops == 2e10  # kept: not measured again
    assert peak_flops(cpu, "float32", measure=True).flops == 5e10  # quiet: raised
    lower = peak_flops(cpu, "float32", measure=True)  # busy again: 3e10 measured, 5e10 stands
    assert lower.flops == 5e10 and str(tmp_path) in lower.how
    (entry,) = json.loads((tmp_path / PEAK_FILE).read_text()).values()
    assert entry["flops"] == 5e10


def test_a_row_above_the_peak_measures_it_again_once():
    low = Peak(1e9, "CPU", "float32", 2, "measured on a busy machine")
    remeasured = []

    def remeasure():
        remeasured.append(1)
        return Peak(4e9, "CPU", "float32", 2, "measured again")

    meter = UtilisationMeter(1e9, low, 1, remeasure)
    # 1 GFLOP × 20 steps in 10 s = 2 GFLOP/s, twice the kept peak: measured again, and the
    # row's MFU is of the new peak, 2/4
    with pytest.warns(UserWarning, match=r"more than the peak kept for it, 1.00 GFLOP/s.*Measured again: 4.00 GFLOP/s"):
        assert meter.row(steps=20, seconds=10.0)["mfu"] == 0.5
    assert remeasured == [1] and meter.peak.flops == 4e9
    # 1 GFLOP × 50 steps in 10 s = 5 GFLOP/s, above the new peak too: not measured again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert meter.row(steps=50, seconds=10.0)["mfu"] == 1.25
    assert remeasured == [1]
    # a measurement still below what was achieved says how to measure on a quiet machine
    meter = UtilisationMeter(1e9, low, 1, lambda: Peak(1.5e9, "CPU", "float32", 2, "again"))
    with pytest.warns(UserWarning, match="still below.*quiet machine"):
        assert meter.row(steps=20, seconds=10.0)["mfu"] == pytest.approx(2 / 1.5, rel=1e-3)
    # a measurement that fails (out of memory on a full GPU, say) costs a warning, not the run
    def fail():
        raise torch.OutOfMemoryError("CUDA out of memory")

    meter = UtilisationMeter(1e9, low, 1, fail)
    with pytest.warns(UserWarning, match="could not be measured again.*out of memory"):
        assert meter.row(steps=20, seconds=10.0)["mfu"] == 2.0
    assert meter.peak is low
    assert UtilisationMeter.postfix({"mfu": 1.3333}) == {"mfu": "133%"}
    assert UtilisationMeter.postfix({"mfu": 0.45}) == {"mfu": "45%"}


def test_a_known_gpu_is_not_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    monkeypatch.setattr(utilisation, "measure_peak", lambda *a: pytest.fail("measured"))
    peak = peak_flops(torch.device("cuda"), "bfloat16")
    assert peak.flops == 756e12 and "data sheet" in peak.how
    assert not (tmp_path / PEAK_FILE).exists()


def test_the_meter_divides_by_the_interval_and_the_peak_of_all_processes():
    meter = UtilisationMeter(3e9, Peak(1e12, "GPU", "bfloat16", 0, "data sheet"), processes=4)
    for _ in meter.timed(range(3)):
        time.sleep(0.01)  # time in the loop body is not waiting
    assert meter.wait < 0.01
    meter.wait = 2.0
    # 4 processes × 3 GFLOP × 50 steps in 10 s = 60 GFLOP/s = 0.06 TFLOP/s; of 4 TFLOP/s
    assert meter.row(steps=50, seconds=10.0) == {"tflops": 0.06, "mfu": 0.015, "data_wait": 0.2}
    assert meter.wait == 0.0
    assert UtilisationMeter(None, None).row(1, 1.0) == {"data_wait": 0.0}


# --- in a run ----------------------------------------------------------------------------------


def test_a_run_logs_utilisation_and_the_knn_at_the_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path / "cache"))
    cfg = build_config(**TINY, max_steps=4, log_every=2, out_dir=str(tmp_path), run_name="r")
    res = pretrain(cfg)
    logged = rows(res["run_dir"])
    facts = json.loads((Path(res["run_dir"]) / RUN_FILE).read_text())
    assert facts["step_flops"] > 0 and facts["peak"]["flops"] > 0 and facts["processes"] == 1
    train = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert 0 <= r["data_wait"] <= 1 and r["mfu"] > 0
        # tflops = FLOPs of a step × steps / seconds, and images/s = batch × steps / seconds
        per_second = r["images_per_s"] / cfg.batch_size * facts["step_flops"] / 1e12
        assert r["tflops"] == pytest.approx(per_second, rel=2e-3)
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / facts["peak"]["flops"], rel=2e-3)

    # step 0: the kNN of the encoder the run starts from, as a fresh build of it gives
    start = logged[0]
    assert start["step"] == 0 and set(start) == {"step", "epoch", "knn_top1", "knn_top5"}
    fresh = Run.build(build_config(**TINY, out_dir=str(tmp_path), run_name="fresh"), None, None)
    monitor = _KnnMonitor(cfg, fresh.crop, fresh.info["mean"], fresh.info["std"], fresh.device)
    acc = monitor(fresh.model.backbone)
    assert (acc.top1, acc.top5) == (start["knn_top1"], start["knn_top5"])


def test_a_run_on_a_peak_kept_from_a_busy_machine_measures_it_again(tmp_path, monkeypatch):
    # a kept peak of 1 kFLOP/s, far below any CPU: the first row measures it again, keeps the
    # new figure in the cache and in utilisation.json, and the MFU of the rows is of it
    cache = tmp_path / "cache"
    cache.mkdir()
    key = f"{utilisation.device_name(torch.device('cpu'))} | float32 | 1 threads"
    (cache / PEAK_FILE).write_text(json.dumps({key: {"flops": 1e3, "how": "measured, busy"}}))
    monkeypatch.setenv("MOCOLAB_CACHE", str(cache))
    cfg = build_config(**TINY, max_steps=4, log_every=2, out_dir=str(tmp_path), run_name="r")
    with pytest.warns(UserWarning, match="more than the peak kept for it, 1.00 kFLOP/s"):
        res = pretrain(cfg)
    facts = json.loads((Path(res["run_dir"]) / RUN_FILE).read_text())
    kept = json.loads((cache / PEAK_FILE).read_text())[key]
    assert facts["peak"]["flops"] == kept["flops"] > 1e8  # any CPU: above 0.1 GFLOP/s
    last = [r for r in rows(res["run_dir"]) if "loss" in r][-1]
    assert last["mfu"] == pytest.approx(last["tflops"] * 1e12 / kept["flops"], rel=2e-3)


def test_the_count_and_the_knn_at_the_start_leave_the_run_as_it_was(tmp_path, monkeypatch):
    """With the kNN at the start (``final_eval``) and without FLOP counting, the same losses bit
    for bit: neither takes from the run's random streams nor changes its model."""
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path / "cache"))
    kw = dict(**TINY, max_steps=3, log_every=1, out_dir=str(tmp_path))
    pretrain(build_config(**kw, run_name="with"), final_eval=True)
    monkeypatch.setattr("mocolab.train.step_flops", lambda *a: 0)  # nothing counted
    pretrain(build_config(**kw, run_name="without"), final_eval=False)
    losses = [[r["loss"] for r in rows(tmp_path / n) if "loss" in r] for n in ("with", "without")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_slowed_loader_shows_as_waiting_for_data(tmp_path, monkeypatch):
    """A batch iterator that sleeps 0.4 s before each batch: the loop waits for data most of
    the time; the same run unslowed waits for its views only (on a CPU they are made in the
    iterator) — a small share. Bounds are loose: the machine may be shared."""
    monkeypatch.setenv("MOCOLAB_CACHE", str(tmp_path / "cache"))
    kw = dict(**TINY, max_steps=4, log_every=2, out_dir=str(tmp_path))
    pretrain(build_config(**kw, run_name="plain"), final_eval=False)
    batches = Run.batches

    def slow(self, epoch, start):
        for item in batches(self, epoch, start):
            time.sleep(0.4)
            yield item

    monkeypatch.setattr(Run, "batches", slow)
    pretrain(build_config(**kw, run_name="slow"), final_eval=False)
    plain, slowed = ([r["data_wait"] for r in rows(tmp_path / n) if "loss" in r]
                     for n in ("plain", "slow"))  # fmt: skip
    assert len(slowed) == 2 and min(slowed) > 0.6, slowed
    assert max(plain) < 0.5 and min(slowed) > max(plain) + 0.2, (plain, slowed)


# --- what the report shows ---------------------------------------------------------------------


def test_step_ticks_are_integers_for_one_point_and_for_a_long_run():
    from mocolab.visualize._mpl import pyplot
    from mocolab.visualize.curves import _step_ticks

    plt = pyplot()
    for lo, hi in ((6, 6), (0, 6), (0, 9360), (1, 3)):
        fig, ax = plt.subplots()
        ax.plot([hi], [55.0], marker="o")
        _step_ticks(ax, lo, hi)
        fig.canvas.draw()
        left, right = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if left <= t <= right]
        assert shown and all(float(t).is_integer() for t in shown), (lo, hi, shown)
        assert left < lo and right > hi
        plt.close(fig)


def test_the_report_tables_one_protocol_once_and_reads_the_run():
    from mocolab.visualize.report import headline, protocol_table, training_text

    knn = [("start of training", {"top1": 40.0, "k": 20}),
           ("end of training", {"top1": 64.5, "top5": 97.0, "k": 20})]  # fmt: skip
    table = protocol_table(knn)
    assert table.count("<table>") == 1 and table.count("top-1 %") == 1
    assert "<td>40</td><td>64.5</td>" in table and "<td></td><td>97</td>" in table
    head = headline({"kNN": knn}, {"mfu": 0.0493, "tflops": 0.0012, "data_wait": 0.14})
    assert "64.50 %" in head and "40.00 % (+24.5)" in head and "4.9 %" in head
    cfg, info = {"batch_size": 32, "epochs": 2}, {"step": 32, "num_images": 512}
    assert training_text(cfg, info, [], {}) == "32 steps of 32 images (2 epochs)"
    assert training_text(cfg, {**info, "step": 8}, [{"step": 4, "epoch": 0.25}], {}) == (
        "step 8 of 32 (0.5 of 2 epochs), batches of 32 images"
    )
