"""Experiment-tracker sinks: copies of a run's metrics, config and findings in TensorBoard, W&B, MLflow.

metrics.jsonl stays the source of truth; a sink only mirrors what `MetricsLogger` writes there,
under the same key names. A demo row's ``demo_audio`` list (the codec demos' .wav files in RUN/demos/)
is logged as audio: TensorBoard ``add_audio``, a W&B ``Audio``, an MLflow artifact under ``demos/``. Each tracker is an optional extra (``pip install -e '.[tensorboard]'``,
``'.[wandb]'``, ``'.[mlflow]'``). A missing extra fails at start (`check_sinks`); any later sink
error is caught by the logger, which warns once and drops that sink: a tracker never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch
import yaml

from scratchlab.errors import UserError

if TYPE_CHECKING:  # runs/ must not import the doctor at run time (the doctor reads runs/)
    from scratchlab.config import Config, LogConfig
    from scratchlab.doctor.findings import Finding

# Config flag -> (python modules the sink needs, extra that installs them).
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "crashed": "FAILED"}
MLFLOW_FLUSH_S = 5.0  # metrics reach the MLflow store at most this late (and at every finding and at the end)
DEMO_AUDIO = "demo_audio"  # a demo row's list of .wav file names in RUN/demos/, logged as audio by every sink
DEMOS_DIR = "demos"


class Sink(Protocol):
    """Where a copy of the run record goes. Calls may raise: `MetricsLogger` then drops the sink."""

    name: str

    def log_row(self, row: dict[str, Any]) -> None: ...

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_finding(self, finding: "Finding") -> None: ...

    def close(self, status: str) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metric row, as trackers take them: bools -> 0/1, lists -> ``key/i``, the rest dropped.

    Non-finite floats stay floats (every tracker here stores NaN/Inf); ``step`` is the x axis, not a series.
    """
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)):  # e.g. moe_load: per layer, per expert
            for i, item in enumerate(value):
                add(f"{key}/{i}", item)
        # None (clipping off), strings: nothing to plot

    for key, value in row.items():
        if key != "step":
            add(key, value)
    return out


def demo_audio(run_dir: Path, row: dict[str, Any]) -> list[tuple[str, Path]]:
    """(tag, path) of each demo .wav a row names: the tag drops the step (``step_000100_c0_t1_cfg3.wav`` ->
    ``demo_audio/c0_t1_cfg3``) so the same demo setting is one series over training."""
    out = []
    for name in row.get(DEMO_AUDIO) or []:
        path = run_dir / DEMOS_DIR / str(name)
        stem = path.stem.split("_", 2)[2] if path.stem.startswith("step_") and path.stem.count("_") >= 2 else path.stem
        out.append((f"{DEMO_AUDIO}/{stem}", path))
    return out


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sampling rate) of a 16-bit PCM .wav (what the demos write)."""
    import wave

    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit")
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
        return (pcm.mean(axis=1) / 32768.0).astype(np.float32), f.getframerate()


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 32}} -> {'model.d_model': 32}: the dotted keys people override with."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_sinks(log: "LogConfig") -> None:
    """Fail before anything runs when a sink is on but its library is not installed."""
    for flag, (modules, extra) in EXTRAS.items():
        if getattr(log, flag) and any(importlib.util.find_spec(m) is None for m in modules):
            raise UserError(f"log.{flag}=true needs the {extra} extra: pip install -e '.[{extra}]'")


# ---------------------------------------------------------------- TensorBoard


class TensorBoardSink:
    """Scalars (tag = metrics.jsonl key), the config and the findings as text, in RUN/tensorboard/.

    Written with torch's own SummaryWriter (the `tensorboard` package is its dependency and the viewer).
    Scalars are stored as float32, as TensorBoard does. A resume purges the events after its checkpoint.
    """

    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run re-logs the steps after its checkpoint; readers drop the stale ones.
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        self.run_dir = run_dir

    def log_row(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        for tag, path in demo_audio(self.run_dir, row):
            samples, rate = read_wav(path)
            self.writer.add_audio(tag, torch.from_numpy(samples)[None], row["step"], sample_rate=rate)

    def log_config(self, config: dict[str, Any]) -> None:
        # Indented: TensorBoard renders text as Markdown, and a code block keeps the YAML as it is.
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join("    " + line + "\n" for line in text.splitlines()))

    def log_finding(self, finding: "Finding") -> None:
        self.writer.add_text("findings", str(finding), global_step=finding.step or 0)
        self.writer.flush()  # findings are rare and worth seeing at once

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


# ---------------------------------------------------------------- Weights & Biases


class WandbSink:
    """A W&B run in RUN/wandb/ (offline by default: `wandb sync RUN/wandb/offline-run-*` uploads it later).

    History keys are the metrics.jsonl keys at ``step``; the config is the run config; findings
    are counted in the summary as they come and logged as a `findings` table at the end.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, log: "LogConfig", start_step: int = 0) -> None:
        import wandb

        root = run_dir / WANDB_DIR
        root.mkdir(exist_ok=True)
        id_file = root / "run_id"
        resuming = start_step > 0 and id_file.exists()
        self.run = wandb.init(
            project=log.wandb_project,
            name=run_dir.name,
            id=id_file.read_text().strip() if resuming else None,  # a resume continues the same W&B run
            resume="allow" if resuming else None,
            dir=str(run_dir),
            mode=log.wandb_mode,
            # console capture off: train.log already has the console (W&B's system stats stay on).
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(self.run.id)
        self._wandb = wandb
        self.run_dir = run_dir
        self.findings: list[dict[str, Any]] = []

    def log_row(self, row: dict[str, Any]) -> None:
        audio = {tag: self._wandb.Audio(str(path), caption=path.name) for tag, path in demo_audio(self.run_dir, row)}
        self.run.log({**scalars(row), **audio}, step=row["step"])

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_finding(self, finding: "Finding") -> None:
        self.findings.append(finding.to_json())
        self.run.summary[f"findings/{finding.severity}"] = sum(f["severity"] == finding.severity for f in self.findings)

    def close(self, status: str) -> None:
        if self.findings:
            columns = ["step", "severity", "code", "message", "evidence"]
            data = [[f.get("step"), f["severity"], f["code"], f["message"], json.dumps(f["evidence"], default=float)]
                    for f in self.findings]
            self.run.log({"findings": self._wandb.Table(columns=columns, data=data)}, commit=True)
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("finished", "stopped") else 1)


# ---------------------------------------------------------------- MLflow


def default_mlflow_uri(run_dir: Path) -> str:
    # SQLite, MLflow's own local store: its file store is in maintenance mode and refuses to start
    # unless MLFLOW_ALLOW_FILE_STORE is set.
    return f"sqlite:///{(run_dir / MLFLOW_DIR / 'mlflow.db').resolve()}"


class MLflowSink:
    """An MLflow run: metrics (key = metrics.jsonl key, at ``step``), the config as params and as
    config.yaml, findings as findings.jsonl, both artifacts. Store: ``log.mlflow_uri``, else
    sqlite under RUN/mlflow/ with artifacts beside it. A resume continues the same MLflow run.
    """

    name = "mlflow"

    def __init__(self, run_dir: Path, log: "LogConfig", start_step: int = 0) -> None:
        # A local store should not phone home: MLflow's usage telemetry is off unless the user set it.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for name in ("mlflow.store.db.utils", "alembic"):  # schema-creation chatter on every new store
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        root = run_dir / MLFLOW_DIR
        root.mkdir(exist_ok=True)
        uri = log.mlflow_uri or default_mlflow_uri(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(log.mlflow_experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a run-local store keeps its artifacts in the run dir, not in ./mlruns of the cwd
            location = None if log.mlflow_uri else (root / "artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(log.mlflow_experiment, artifact_location=location)
        record = root / "run.json"
        previous = json.loads(record.read_text()) if start_step > 0 and record.exists() else {}
        if previous.get("uri") == uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"scratchlab.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
        record.write_text(json.dumps({"uri": uri, "experiment_id": experiment_id, "run_id": self.run_id}))
        self.findings: list[dict[str, Any]] = []
        self._pending: list = []  # metrics not yet written (mlflow.entities.Metric)
        self._flushed = time.monotonic()
        self.run_dir = run_dir

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        for _, path in demo_audio(self.run_dir, row):  # artifacts: MLflow has no audio panel, its UI plays .wav files
            self.client.log_artifact(self.run_id, str(path), artifact_path=DEMOS_DIR)
        stamp = _now_ms()
        self._pending += [Metric(key, value, stamp, int(row["step"])) for key, value in scalars(row).items()]
        # One SQLite transaction per row costs tens of ms: write at most every MLFLOW_FLUSH_S seconds.
        if time.monotonic() - self._flushed >= MLFLOW_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 1000):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])
        self._flushed = time.monotonic()

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        # Params are immutable in MLflow: a resume (whose overrides may change some) logs only new keys;
        # config.yaml above is always the current config.
        known = self.client.get_run(self.run_id).data.params
        params = [Param(k, _param_value(v)) for k, v in flatten(config).items() if k not in known]
        for i in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_finding(self, finding: "Finding") -> None:
        self.flush()  # the metrics that led to the finding are visible with it
        self.findings.append(finding.to_json())
        text = "".join(json.dumps(f, default=float) + "\n" for f in self.findings)
        self.client.log_text(self.run_id, text, "findings.jsonl")

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's param value limit


# ---------------------------------------------------------------- opening


def open_sinks(cfg: "Config", run_dir: Path, *, start_step: int = 0,
               warn: Callable[[str], None] | None = None) -> list[Sink]:
    """The sinks ``cfg.log`` turns on, opened on ``run_dir``. One that fails to open is warned about and skipped."""
    check_sinks(cfg.log)
    makers: list[tuple[str, Callable[[], Sink]]] = []
    if cfg.log.tensorboard:
        makers.append(("tensorboard", lambda: TensorBoardSink(run_dir, start_step)))
    if cfg.log.wandb:
        makers.append(("wandb", lambda: WandbSink(run_dir, cfg.log, start_step)))
    if cfg.log.mlflow:
        makers.append(("mlflow", lambda: MLflowSink(run_dir, cfg.log, start_step)))
    sinks: list[Sink] = []
    for name, make in makers:
        try:
            sinks.append(make())
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            if warn is not None:
                warn(f"warning: log.{name} sink could not start ({type(exc).__name__}: {exc}); training goes on without it")
    return sinks
