"""Tracker sinks round-trip through the real libraries.

One short real run with TensorBoard, W&B (offline) and MLflow all on; each is read back with the
library's own reader and must hold exactly metrics.jsonl's numbers, the config and findings.jsonl.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import quiet, run_tiny, tiny_overrides
from scratchlab.cli import main
from scratchlab.config import load_config
from scratchlab.doctor.findings import Finding, read_findings
from scratchlab.runs import read_metrics
from scratchlab.runs.metrics import MetricsLogger
from scratchlab.train import loop
from scratchlab.train import train as train_run

# MLflow's SQLAlchemy store uses a loader strategy SQLAlchemy deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

# A run that produces findings both before step 0 (init_loss_high: logits x50) and while training
# (update_ratio, entropy_collapse: lr 0.3 without clipping), so findings reach every sink by both paths.
NOISY = dict(model__logits_scale=50, optim__lr=0.3, train__clip__max_norm=0, train__max_steps=12)


def offline_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """W&B and MLflow must never touch the network or the user's home in tests."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # if anything tried to talk, it would fail locally
    mp.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(root / var.lower()))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("DO_NOT_TRACK", "true")
    mp.setenv("SCRATCHLAB_CACHE", str(root / "cache"))


@pytest.fixture(scope="module")
def tracked_run(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sinks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, root)
        result = run_tiny(data_dir, root / "runs", log__tensorboard="true", log__wandb="true", log__mlflow="true",
                          **NOISY)
    torch.set_num_threads(threads)
    assert result.status == "finished"
    return result.run_dir


def expected_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) per key: every number a tracker should have, bools as 0/1."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run / "metrics.jsonl"):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def findings_of(run: Path) -> list[Finding]:
    findings = read_findings(run / "findings.jsonl")
    assert {f.code for f in findings} >= {"init_loss_high", "update_ratio"}  # before step 0 and while training
    return findings


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_has_the_metrics_config_and_findings(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = expected_series(tracked_run)
    assert {"loss", "lr", "grad_norm", "clipped", "val_loss", "val_bpb", "update_ratio"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)  # clip_threshold is null (clipping off): no series
    for key, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(step, float(np.float32(v))) for step, v in series], key  # TensorBoard stores float32

    def texts(tag: str) -> list[tuple[int, str]]:
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]

    assert texts("findings") == [(f.step or 0, str(f)) for f in findings_of(tracked_run)]
    (_, config), = texts("config")
    assert yaml.safe_load(config)["model"]["logits_scale"] == 50
    assert texts("status") == [(0, "finished")]


# ---------------------------------------------------------------- Weights & Biases


def wandb_records(path: Path):
    """The records of a .wandb file: leveldb-log framing (32 KiB blocks, CRC32 per chunk) around wandb's
    own protobuf `Record`. wandb >= 0.2x reads these files only in its Go core, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # a block's tail too short for a header is zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind])))
        chunks.append(chunk)
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def items(update) -> dict:
    """A wandb record's items as {key: value}; some keys come as ``nested_key`` parts instead of ``key``."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_wandb_offline_run_has_the_metrics_config_and_findings(tracked_run):
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert run_record.display_name == tracked_run.name and run_record.project == "scratchlab"
    assert run_record.run_id == (tracked_run / "wandb" / "run_id").read_text()

    history = [items(r.history.item) for r in records if r.HasField("history")]
    for key, series in expected_series(tracked_run).items():
        got = [(h["_step"], h[key]) for h in history if key in h]
        # W&B has one history row per step: the train and eval rows of a step merge (tokens is in both).
        assert got == list(dict(series).items()), key  # JSON doubles: exact

    config: dict = {}
    for r in records:
        if r.HasField("config"):
            config.update(items(r.config.update))
    run_config = yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == run_config  # _wandb: its own keys
    assert config["model"]["logits_scale"] == 50

    findings = findings_of(tracked_run)
    (table_row,) = [h for h in history if "findings/path" in h]
    table = json.loads((run_file.parent / "files" / table_row["findings/path"]).read_text())
    assert table["columns"] == ["step", "severity", "code", "message", "evidence"]
    assert [(row[0], row[2], row[3]) for row in table["data"]] == [(f.step, f.code, f.message) for f in findings]
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(items(r.summary.update))
    assert summary["findings/warning"] == sum(f.severity == "warning" for f in findings)
    assert summary["status"] == "finished"
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


# ---------------------------------------------------------------- MLflow


def test_mlflow_run_has_the_metrics_config_and_findings(tracked_run, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tracked_run / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (run,) = mlflow.search_runs(experiment_names=["scratchlab"], output_format="list")
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert run.data.params["model.logits_scale"] == "50.0" and run.data.params["optim.lr"] == "0.3"
    assert run.data.params["demo.prompts"] == '["def "]'

    client = MlflowClient(tracking_uri=uri)
    expected = expected_series(tracked_run)
    assert set(run.data.metrics) == set(expected)
    for key, series in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == sorted(series), key  # stored as doubles: exact

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert artifacts.is_dir() and str(tracked_run) in run.info.artifact_uri  # the run dir holds the artifacts
    recorded = [json.loads(line) for line in (artifacts / "findings.jsonl").read_text().splitlines()]
    assert recorded == [f.to_json() for f in findings_of(tracked_run)]
    assert yaml.safe_load((artifacts / "config.yaml").read_text()) == yaml.safe_load((tracked_run / "config.yaml").read_text())


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("flag,module", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_extra_fails_at_start_in_one_line(flag, module, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec finds nothing
    code = main(["train", *tiny_overrides(data_dir, tmp_path / "runs", **{f"log__{flag}": "true"})])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: log.{flag}=true needs the {flag} extra: pip install -e '.[{flag}]'\n"
    assert not (tmp_path / "runs").exists()  # failed before any run dir was made


class FlakySink:
    """Records what it is given; raises on its ``fail_on``-th row, like a disk or a network going away."""

    name = "flaky"

    def __init__(self, fail_on: int = 3) -> None:
        self.rows, self.configs, self.findings, self.closed = [], [], [], []
        self.fail_on = fail_on

    def log_row(self, row):
        if len(self.rows) + 1 == self.fail_on:
            raise OSError("No space left on device")
        self.rows.append(row)

    def log_config(self, config):
        self.configs.append(config)

    def log_finding(self, finding):
        self.findings.append(finding)

    def close(self, status):
        self.closed.append(status)


def test_logger_drops_a_failing_sink_and_warns_once(tmp_path):
    flaky, healthy, warnings = FlakySink(fail_on=2), FlakySink(fail_on=0), []
    logger = MetricsLogger(tmp_path / "metrics.jsonl", [flaky, healthy], warn=warnings.append)
    rows = [{"step": i, "loss": 1.0 / i, "val_bpb": float("nan")} for i in range(1, 6)]
    for row in rows:
        logger.log(row)
    logger.close("finished")
    assert len(warnings) == 1 and "flaky sink failed in log_row (OSError: No space left on device)" in warnings[0]
    assert flaky.rows == rows[:1] and flaky.closed == ["crashed"]  # dropped after its failure, and closed
    assert healthy.rows == rows and healthy.closed == ["finished"]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [r["loss"] for r in rows]  # complete


def test_training_goes_on_when_a_sink_fails(data_dir, tmp_path, monkeypatch):
    flaky = FlakySink(fail_on=3)
    monkeypatch.setattr(loop, "open_sinks", lambda *args, **kwargs: [flaky])
    result = run_tiny(data_dir, tmp_path, model__logits_scale=50)
    assert result.status == "finished" and result.step == 8
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert len([r for r in rows if "loss" in r]) == 8  # every row is in metrics.jsonl all the same
    assert flaky.rows == rows[:2] and flaky.closed == ["crashed"]
    assert flaky.configs[0]["model"]["logits_scale"] == 50  # the resolved config went out first
    assert [f.code for f in flaky.findings] == ["init_loss_high"]  # the preflight finding too
    log = (result.run_dir / "train.log").read_text()
    assert log.count("flaky sink failed") == 1


def test_a_sink_that_cannot_start_is_skipped(data_dir, tmp_path, monkeypatch):
    # A real MLflow failure: the store's folder is a file.
    (tmp_path / "blocker").write_text("not a folder")
    offline_env(monkeypatch, tmp_path)
    cfg = load_config("tiny-lm", tiny_overrides(data_dir, tmp_path / "runs", log__mlflow="true",
                                                 log__mlflow_uri=f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}"))
    result = train_run(cfg, console=quiet())
    assert result.status == "finished"
    log = (result.run_dir / "train.log").read_text()
    assert "warning: log.mlflow sink could not start" in log and "training goes on without it" in log


# ---------------------------------------------------------------- resume


def test_resume_continues_the_tracker_runs(data_dir, tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    first = run_tiny(data_dir, tmp_path / "runs", log__tensorboard="true", log__mlflow="true").run_dir
    # Lose the last checkpoint: the resume restarts from step 4 and re-logs steps 5..8.
    import shutil

    shutil.rmtree(first / "checkpoints" / "step_000008")
    result = train_run(resume=first, overrides=["train.max_steps=10"], console=quiet())
    assert result.step == 10
    expected = expected_series(first)
    assert [s for s, _ in expected["loss"]] == list(range(1, 11))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(first / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert len(list((first / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, float(np.float32(v))) for s, v in expected["loss"]]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{first / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("scratchlab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "8"  # params keep first values
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 10]  # MLflow keeps the re-logged steps too (documented)
