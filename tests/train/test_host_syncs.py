"""A training step that is not logged reads nothing from the device: no host sync.

Every tensor-to-Python conversion (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``index``)
made by the training thread is counted while the trainer runs one non-logged step of each family;
the count must be zero. On a GPU each of them would stall the host until the device caught up.
A logged step reads its row in one go (plus the doctor's update ratio): a small, fixed count.
The data worker thread is not counted: it builds CPU batches (numpy, torch.randint on the CPU
generator), which never touch the device.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from conftest import quiet, tiny_overrides

from scratchlab.config import load_config
from scratchlab.families.registry import build_task
from scratchlab.train.loop import Reporter, Trainer, _NullMetrics

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
LOGGED_STEP_READS = 3  # the row (one tolist), the update ratio of each of the two optimizer groups


@pytest.fixture
def count_reads(monkeypatch):
    """A Counter of tensor-to-Python conversions made on the main thread while it is active."""
    counts: Counter = Counter()
    main = threading.main_thread()
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if threading.current_thread() is main:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def lm_config(data_dir, tmp_path):
    return load_config("tiny-lm", tiny_overrides(data_dir, tmp_path, train__log_every=4, train__save_every=100,
                                                 train__max_steps=100, train__z_loss=1e-4))


def codec_config(data_dir, tmp_path):
    # dia-tiny's architecture (K=9, delays, text cross-attention, codebook weights), smaller; synthetic codes.
    return load_config("dia-tiny", [
        "data.path=synthetic:clips=16,frames=48,K=9,codebook=16", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=2", "model.max_seq_len=48", "model.codec.text_d_model=32", "model.codec.max_text_bytes=16",
        "train.seq_len=16", "train.batch_size=4", "train.log_every=4", "train.save_every=100",
        "train.max_steps=100", f"train.out_dir={tmp_path}", "train.precision=fp32",
    ])


def cascade_config(data_dir, tmp_path):
    return load_config("cascade-tiny", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.seq_len=16", "train.batch_size=4",
        "train.log_every=4", "train.save_every=100", "train.max_steps=100", f"train.out_dir={tmp_path}",
        "model.cascade.rms_scaling=learnable",  # its scalars are logged too
    ])


@pytest.mark.parametrize("make_config", [lm_config, codec_config, cascade_config], ids=["lm", "codec", "cascade"])
def test_a_step_that_is_not_logged_reads_nothing_from_the_device(make_config, data_dir, tmp_path, count_reads):
    cfg, task = build_task(make_config(data_dir, tmp_path))
    trainer = Trainer(cfg, None, task, Reporter(quiet(), "lines"))
    metrics = _NullMetrics()
    try:
        assert trainer.train_step(metrics)  # step 1: optimizer state created, first batch drawn in the foreground
        count_reads.clear()
        trainer.train_step(metrics)  # step 2: not logged (log_every=4), not saved
        assert dict(count_reads) == {}, f"host reads in a non-logged step: {dict(count_reads)}"
        trainer.train_step(metrics)
        count_reads.clear()
        assert trainer.train_step(metrics)  # step 4: logged
        assert 1 <= sum(count_reads.values()) <= LOGGED_STEP_READS, dict(count_reads)
        assert count_reads["tolist"] >= 1
    finally:
        trainer.batches.close()
    assert trainer.step == 4 and 0 < trainer.last_loss < 20


def test_a_nonfinite_step_is_skipped_on_the_device_and_reported_at_the_next_check(data_dir, tmp_path, monkeypatch):
    """No host read decides the skip: weights and optimizer state stay exactly as they were."""
    cfg, task = build_task(lm_config(data_dir, tmp_path))
    trainer = Trainer(cfg, None, task, Reporter(quiet(), "lines"))
    rows: list[dict] = []
    trainer.log_row = lambda metrics, row: rows.append(row)
    try:
        trainer.train_step(None)
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        state = {n: s["exp_avg"].clone() for n, s in zip(weights, trainer.optimizer.state.values())}
        real = task.loss

        def poisoned(model, batch, precision):
            out = real(model, batch, precision)
            out.loss, out.objective = out.loss * float("nan"), out.objective * float("nan")
            return out

        monkeypatch.setattr(task, "loss", poisoned)
        assert trainer.train_step(None) is True  # step 2: not a check step, nothing known on the host yet
        assert rows == [] and trainer.nonfinite_seen == 0
        for name, p in trainer.model.named_parameters():
            assert torch.equal(p, weights[name]), name
        for name, s in zip(weights, trainer.optimizer.state.values()):
            assert torch.equal(s["exp_avg"], state[name]) and float(s["step"]) == 1.0, name
        monkeypatch.setattr(task, "loss", real)
        trainer.train_step(None)
        assert trainer.train_step(None) is True  # step 4: the check; this step was fine, step 2 was not
    finally:
        trainer.batches.close()
    assert [(r["step"], r.get("nonfinite"), r.get("nonfinite_steps")) for r in rows] == [(4, True, 1)]
    assert trainer.nonfinite_seen == 1 and trainer.nonfinite_run == 1
    assert trainer.guilty and not trainer.guilty[0]["finite"]
