"""Experiment trackers (``--logger``): TensorBoard, W&B (offline) and MLflow (a SQLite store)
get the rows of ``metrics.jsonl``, the config and the results, read back through their own
formats; a resumed run continues their runs without logging a step twice; a missing package
is one line naming the extra."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mocolab.cli import main
from mocolab.config import build_config
from mocolab.loggers import STATE_NAME, attach_artifact
from mocolab.train import pretrain

TINY = dict(data="synthetic", width=8, stem="compact", batch_size=16, bn_splits=2, queue_size=32,
            crop_size=16, epochs=1, progress=False, log_every=1, threads=1, diagnostics_every=0,
            checkpoint_every=2, max_steps=6)  # fmt: skip


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-ID.wandb``): LevelDB-log blocks of 32 KiB
    after a 7-byte header (``:W&B``, magic, version), each record ``crc32 (4), length (2),
    type (1: full, 2: first, 3: middle, 4: last)``, each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail, padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def wandb_items(items) -> dict:
    """``{key: value}`` of a record's items (a key is ``key`` or, in newer files, ``nested_key``)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow on a SQLite file, both inside ``tmp_path``."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder: ./mlruns
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "wandb-files").mkdir()
    return tmp_path


def test_trackers_get_the_rows_config_and_results_and_resume_logs_no_step_twice(offline):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config(**TINY, out_dir=str(offline / "runs"), run_name="r",
                       logger="tensorboard,wandb,mlflow")  # fmt: skip

    def crash(step, row):  # after step 5's row went out; the last checkpoint is step 4's
        if step == 5:
            raise RuntimeError("a crash")

    with pytest.raises(RuntimeError, match="a crash"):
        pretrain(cfg, on_step=crash, final_eval=False)
    run_dir = offline / "runs" / "r"
    state = json.loads((run_dir / STATE_NAME).read_text())
    assert state["sent"] == [5, 1]
    res = pretrain(resume=run_dir, final_eval=False)
    assert res["step"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    same = ("loss", "acc", "lr", "epoch")  # images_per_s differs between the two lives

    # MLflow: one run, resumed; every metric once per step; the config; results.json
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["method"] == "mocov2" and run.data.params["batch_size"] == "16"
    assert run.data.params["logger"] == "tensorboard,wandb,mlflow"
    for key in (*same, "images_per_s"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6], key
        if key in same:
            assert [v for _, v in history] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]

    # W&B: two offline files (one per life) of one run id; each step once; config; artifact
    files = sorted(offline.glob(f"wandb-files/wandb/offline-run-*-{state['wandb']['id']}/*.wandb"))
    assert len(files) == 2
    history, config, artifacts = [], {}, []
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(wandb_items(record.history.item))
            elif kind == "run":
                config.update(wandb_items(record.run.config.update))
            elif kind == "artifact":
                artifacts.append((record.artifact.type, [m.path for m in record.artifact.manifest.contents]))
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5, 6]
    for key in same:
        assert [h[key] for h in history] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert config["method"] == "mocov2" and config["queue_size"] == 32 and config["lr_steps"] == [0.6, 0.8]
    assert artifacts == [("results", ["results.json"])]

    # TensorBoard: what it had after step 4 is purged and logged again: each step once
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in rows], rel=1e-6)

    # a report made afterwards goes to the same W&B and MLflow runs
    report = run_dir / "report"
    report.mkdir()
    (report / "index.html").write_text("<html></html>")
    # W&B names an offline run's folder by the second it starts: an attach within the second of
    # the run's end would share (and overwrite) the run's file in this offline test
    time.sleep(1.1)
    assert attach_artifact(run_dir, report) == ["wandb", "mlflow"]
    assert "report/index.html" in [
        a.path for a in client.list_artifacts(run.info.run_id, "report")
    ]
    files = sorted(offline.glob(f"wandb-files/wandb/offline-run-*-{state['wandb']['id']}/*.wandb"))
    logged = [(r.artifact.type, [m.path for m in r.artifact.manifest.contents])
              for f in files for r in wandb_records(f) if r.WhichOneof("record_type") == "artifact"]  # fmt: skip
    # the run's own results, then the report attached to the same W&B run
    assert ("results", ["results.json"]) in logged and ("report", ["index.html"]) in logged


def test_logger_none_writes_only_metrics(tmp_path):
    res = pretrain(build_config(**{**TINY, "max_steps": 2}, out_dir=str(tmp_path), run_name="n",
                                logger="none"), final_eval=False)  # fmt: skip
    names = {p.name for p in Path(res["run_dir"]).iterdir()}
    assert "metrics.jsonl" in names and "tb" not in names and STATE_NAME not in names


@pytest.mark.parametrize(
    "logger,message",
    [
        ("wandb", "--logger wandb needs the wandb package: pip install 'mocolab[wandb]' (or pip install wandb)"),
        ("tensorboard,mlflow", "--logger mlflow needs the mlflow package: pip install 'mocolab[mlflow]'"),
        ("tensorbord", "--logger 'tensorbord': choose any of tensorboard, wandb, mlflow (comma-separated), or none"),
        ("none,wandb", "--logger 'none,wandb': choose any of"),
    ],
)  # fmt: skip
def test_a_missing_tracker_package_or_name_is_one_line(logger, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["pretrain", "--logger", logger, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mocolab: error: {message}") and err.count("\n") == 1
