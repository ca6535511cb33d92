"""The run index (`scratchlab runs`) and notes, on real tiny runs."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from conftest import PINNED_GIT
from scratchlab.cli import main
from scratchlab.errors import UserError
from scratchlab.runs import read_metrics
from scratchlab.runs.store import RunLock
from scratchlab.runs.index import INDEX_FILE, add_note, read_notes, scan_runs


@pytest.fixture
def root(tmp_path, record_runs):
    """A runs root with copies of a finished run and a crashed run (tests change them)."""
    for key in ("a", "crashed"):
        shutil.copytree(record_runs[key], tmp_path / record_runs[key].name)
    return tmp_path


def _by_status(summaries):
    return {s.status: s for s in summaries}


def test_summaries_match_the_run_dirs(root, record_runs):
    summaries = scan_runs(root)
    assert [s.name for s in summaries] == sorted(p.name for p in root.iterdir() if p.is_dir())
    done, crashed = _by_status(summaries)["finished"], _by_status(summaries)["crashed"]

    rows = read_metrics(record_runs["a"] / "metrics.jsonl")
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    best = min(vals, key=lambda v: v[1])
    assert (done.step, done.max_steps, done.tokens) == (8, 8, 8 * 4 * 32)
    assert (done.best_val_step, done.best_val_loss) == best
    assert done.last_val_loss == vals[-1][1]
    assert done.last_loss == [r["loss"] for r in rows if "loss" in r][-1]
    assert done.commit == PINNED_GIT["commit"] and done.dirty is False
    assert done.tokens_per_s > 0 and done.wall_s > 0

    assert crashed.step == 4 and "simulated crash in eval" in crashed.error
    assert crashed.best_val_loss is None  # it died in its first eval
    assert "run_crashed" in crashed.codes and crashed.errors >= 1  # what `scratchlab doctor` says


def test_index_is_used_and_rebuilt_when_a_run_changes(root):
    scan_runs(root)
    db = root / INDEX_FILE
    assert db.is_file()
    # Tamper with the cached summary: an unchanged run dir is served from the index...
    con = sqlite3.connect(db)
    (path, text), = [r for r in con.execute("SELECT path, summary FROM runs") if json.loads(r[1])["status"] == "finished"]
    con.execute("UPDATE runs SET summary = ? WHERE path = ?", (json.dumps({**json.loads(text), "last_val_loss": 123.0}), path))
    con.commit()
    con.close()
    assert _by_status(scan_runs(root))["finished"].last_val_loss == 123.0
    # ...and a run dir whose files changed is read again.
    with open(root / path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "tokens": 9 * 128, "val_loss": 1.5, "val_bpb": 1.0}) + "\n")
    fresh = _by_status(scan_runs(root))["finished"]
    assert (fresh.last_val_loss, fresh.best_val_loss, fresh.best_val_step, fresh.step) == (1.5, 1.5, 9, 9)
    # A deleted run leaves the index too.
    shutil.rmtree(root / path)
    assert [s.status for s in scan_runs(root)] == ["crashed"]
    assert [r[0] for r in sqlite3.connect(db).execute("SELECT path FROM runs")] == [
        p.name for p in root.iterdir() if p.is_dir()]


def test_corrupt_index_is_rebuilt(root):
    (root / INDEX_FILE).write_bytes(b"this is not a sqlite database" * 10)
    assert {s.status for s in scan_runs(root)} == {"finished", "crashed"}
    assert sqlite3.connect(root / INDEX_FILE).execute("SELECT count(*) FROM runs").fetchone() == (2,)


def test_a_run_being_written_is_readable(root, record_runs):
    run = root / record_runs["a"].name
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 8}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "tokens": 1152, "loss": 5.1, "l')  # torn: the writer is mid-line
    with RunLock(run):  # the live writer holds the run's lock (without it the run reads as killed)
        live = _by_status(scan_runs(root))["running"]
    assert live.step == 8 and live.last_val_loss is not None
    assert live.wall_s is not None and live.wall_s != status["wall_s"]  # from the rows: the run has no summary yet


def test_runs_in_sweep_subfolders_are_found(tmp_path, record_runs):
    shutil.copytree(record_runs["a"], tmp_path / "sweep-lr" / "run-1")
    assert [s.name for s in scan_runs(tmp_path)] == ["run-1"]


def test_notes_are_appended_with_a_timestamp(root, record_runs):
    run = root / record_runs["a"].name
    add_note(run, "hypothesis: a higher lr converges faster")
    add_note(run, "  result: it did\n\n| lr | val |\n|---|---|\n| 3e-3 | 5.8 |  ")
    text = read_notes(run)
    assert text.count("\n## ") + text.startswith("## ") == 2
    assert text.index("hypothesis") < text.index("result: it did") and "| 3e-3 | 5.8 |" in text
    assert _by_status(scan_runs(root))["finished"].notes == 2
    with pytest.raises(UserError, match="empty"):
        add_note(run, "   ")
    with pytest.raises(UserError, match="not a run directory"):
        add_note(root, "text")


def test_cli_runs_json_and_note(root, record_runs, capsys):
    run = root / record_runs["a"].name
    assert main(["runs", "note", str(run), "lr 3e-3 baseline"]) == 0
    assert "lr 3e-3 baseline" in read_notes(run)
    capsys.readouterr()
    assert main(["runs", "--root", str(root), "--json"]) == 0
    listed = {r["status"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["finished"]["notes"] == 1 and listed["crashed"]["step"] == 4
    assert main(["runs", "--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert run.name in table and "crashed" in table
    assert main(["runs", "--root", str(root / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
