"""Codec demos are heard: each demo clip is decoded with the data's codec to a .wav in RUN/demos/, logged to the
enabled trackers as audio and playable in the report; a clip that does not decode never stops training."""

from __future__ import annotations

import json
import re
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import quiet

from scratchlab.config import load_config
from scratchlab.families.codec.data import write_synthetic_codes
from scratchlab.runs.metrics import read_metrics
from scratchlab.runs.index import read_run
from scratchlab.runs.plots import html_page
from scratchlab.runs.report import report_markdown
from scratchlab.train import train

# MLflow's SQLAlchemy store uses a loader strategy SQLAlchemy deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

CB, HOP, RATE = 32, 40, 8000


class ToneCodec:
    """A stand-in for the data's codec: HOP samples per frame, a tone whose pitch follows codebook 0."""

    info = type("Info", (), {"sampling_rate": RATE})()

    def __init__(self, fail_on_frames: int | None = None) -> None:
        self.fail_on_frames = fail_on_frames

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if len(codes) == self.fail_on_frames:
            raise RuntimeError("decoder exploded")
        pitch = np.repeat(100.0 + 10.0 * codes[:, 0], HOP)
        return 0.5 * np.sin(2 * np.pi * np.cumsum(pitch) / RATE).astype(np.float32)


def codec_run(codes_dir: Path, out: Path, **extra):
    overrides = {
        "data.path": str(codes_dir), "data.val_fraction": 0.2, "model.n_layers": 1, "model.d_model": 32,
        "model.max_seq_len": 64, "train.seq_len": 16, "train.batch_size": 4, "train.max_steps": 4,
        "train.out_dir": str(out), "eval.every": 4, "eval.batches": 1, "eval.batch_size": 2, "demo.every": 2,
        "demo.seconds": 0.2, "train.uncond_prob": 0.2, "log.progress": "lines", "doctor.preflight": "false",
        **extra,
    }
    return train(load_config("musicgen-tiny", [f"{k}={v}" for k, v in overrides.items()]), console=quiet())


def wav_of(path: Path) -> tuple[int, int]:
    with wave.open(str(path), "rb") as f:
        return f.getframerate(), f.getnframes()


@pytest.fixture
def codes_with_codec(tmp_path):
    codes = write_synthetic_codes(tmp_path / "codes", n_clips=24, T=40, K=4, codebook_size=CB, seed=0)
    (codes / "codec.json").write_text(json.dumps({"codec": "tone", "random_weights": True}))
    return codes


def test_codec_demos_become_wavs_logged_to_tensorboard_and_the_report(codes_with_codec, tmp_path, monkeypatch):
    import scratchlab.families.codec.encode as encode

    loaded = []
    monkeypatch.setattr(encode, "codec_for_codes", lambda root, device="cpu": loaded.append(root) or ToneCodec())
    run = codec_run(codes_with_codec, tmp_path / "runs", **{"log.tensorboard": "true"}).run_dir
    assert loaded == [codes_with_codec]  # the codec is loaded once per run, from the codes dir
    demos = run / "demos"
    for step in (2, 4):
        index = json.loads((demos / f"step_{step:06d}.json").read_text())
        assert len(index) == 2 * 3 * 2  # conditions x temperatures x cfg scales, one generation
        for npy, info in index.items():
            frames = np.load(demos / npy).shape[0]
            assert info["frames"] == frames
            if frames == 0:
                assert "audio" not in info
                continue
            assert info["audio"] == npy.replace(".npy", ".wav")
            assert wav_of(demos / info["audio"]) == (RATE, frames * HOP)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "demo_audio" in r]
    assert [r["step"] for r in rows] == [2, 4] and all("demo_coverage" in r for r in rows)
    wavs = sorted(p.name for p in demos.glob("*.wav"))
    assert sorted(name for r in rows for name in r["demo_audio"]) == wavs and wavs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    logged = [(tag, e.step) for tag in events.Tags()["audio"] for e in events.Audio(tag)]
    expected = [(f"demo_audio/{name[12:-4]}", int(name[5:11])) for name in wavs]  # step_000002_c0_t0_cfg1.wav
    assert sorted(logged) == sorted(expected)
    tag, step = expected[0]
    (event,) = [e for e in events.Audio(tag) if e.step == step]
    assert event.sample_rate == RATE and event.encoded_audio_string[:4] == b"RIFF"

    # The report's page (its curves are tested in test_report.py; plotting them here would only cost time).
    record = read_run(run)
    html = html_page(report_markdown(record, {}, run / "report.html", inline=True), run.name)
    assert len(re.findall(r'<audio controls preload="none" src="data:audio/wav;base64,UklGR', html)) == len(wavs)
    md = report_markdown(record, {}, tmp_path / "log" / "report.md", inline=False)
    assert f"](../runs/{run.name}/demos/{wavs[0]})" in md  # linked relative to the report, not inlined
    # Past the inline budget the page links each clip by a relative URL, even from a run dir named with spaces.
    import scratchlab.runs.report as report

    monkeypatch.setattr(report, "MAX_INLINE_AUDIO", 0)
    odd = shutil.copytree(run, tmp_path / "my run (1) #2")
    html = html_page(report_markdown(read_run(odd), {}, tmp_path / "pages" / "r.html", inline=True), "r")
    players = re.findall(r'<audio controls preload="none" src="([^"]+)"></audio>', html)
    assert players[0] == f"../my%20run%20%281%29%20%232/demos/{wavs[0]}" and len(players) == len(wavs)


def test_a_demo_that_fails_to_decode_is_a_warning(codes_with_codec, tmp_path, monkeypatch):
    import scratchlab.families.codec.encode as encode

    frames = round(0.2 * 50)  # demo.seconds x the synthetic codes' frame rate: clips that run to the end
    monkeypatch.setattr(encode, "codec_for_codes", lambda root, device="cpu": ToneCodec(fail_on_frames=frames))
    result = codec_run(codes_with_codec, tmp_path / "runs", **{"train.max_steps": 2})
    assert result.status == "finished" and result.step == 2
    text = (result.run_dir / "demos" / "step_000002.txt").read_text()
    index = json.loads((result.run_dir / "demos" / "step_000002.json").read_text())
    failed = [name for name, info in index.items() if info["frames"] == frames]
    assert failed and not any("audio" in index[name] for name in failed)
    assert f"demo(s) not decoded to audio: {failed[0]} (RuntimeError: decoder exploded)" in text
    assert "not decoded to audio" in (result.run_dir / "train.log").read_text()
    assert len(list((result.run_dir / "demos").glob("*.npy"))) == 12  # the codes are all there


def test_a_codec_that_does_not_load_leaves_codes_only(codes_with_codec, tmp_path, monkeypatch):
    import scratchlab.families.codec.sampler as sampler

    real, rows = sampler.generate_codes, []

    def counted(model, pattern, max_frames, **kwargs):
        rows.append((len(kwargs["cond_ids"]), list(kwargs["temperature"]), list(kwargs["cfg_scale"])))
        return real(model, pattern, max_frames, **kwargs)

    monkeypatch.setattr(sampler, "generate_codes", counted)
    # codec.json names a codec scratchlab does not have: one warning, codes only, training goes on.
    result = codec_run(codes_with_codec, tmp_path / "runs", **{"train.max_steps": 2})
    assert result.status == "finished"
    # The demos of one eval are one generation: conditions x temperatures x CFG scales, per-row settings.
    assert rows == [(12, [0.0, 0.0, 0.5, 0.5, 1.0, 1.0] * 2, [1.0, 3.0] * 6)]
    assert not list((result.run_dir / "demos").glob("*.wav"))
    log = (result.run_dir / "train.log").read_text()
    assert log.count("demos are not decoded to audio: the data's codec did not load") == 1


@pytest.mark.slow
def test_untrained_encodec_demos_reach_every_sink(tmp_path, monkeypatch):
    """The real path: audio -> codes (EnCodec architecture, untrained) -> codec_lm run whose demos are decoded
    with that codec and logged to TensorBoard, W&B (offline) and MLflow."""
    pytest.importorskip("transformers", reason="the audio extra is not installed: pip install -e '.[audio]'")
    sf = pytest.importorskip("soundfile", reason="the audio extra is not installed: pip install -e '.[audio]'")
    from test_sinks import items, offline_env, wandb_records

    from scratchlab.cli import main

    offline_env(monkeypatch, tmp_path)
    audio = tmp_path / "audio"
    audio.mkdir()
    t = np.arange(12000) / 24000
    for i, freq in enumerate((220, 330, 440, 550)):
        sf.write(audio / f"tone{i}.wav", (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 24000)
        (audio / f"tone{i}.txt").write_text(f"a tone of {freq} Hz\n")
    codes = tmp_path / "codes"
    assert main(["data", "encode", str(audio), "--codec", "encodec", "--out", str(codes), "--random-weights"]) == 0
    result = codec_run(codes, tmp_path / "runs", **{
        "data.val_fraction": 0.5, "model.max_seq_len": 32, "train.max_steps": 2, "demo.seconds": 0.08,
        "demo.temperatures": "[1.0]", "log.tensorboard": "true", "log.wandb": "true", "log.mlflow": "true"})
    run = result.run_dir
    (row,) = [r for r in read_metrics(run / "metrics.jsonl") if "demo_audio" in r]
    wavs = row["demo_audio"]
    assert wavs and sorted(wavs) == sorted(p.name for p in (run / "demos").glob("*.wav"))
    for name in wavs:
        frames = np.load(run / "demos" / name.replace(".wav", ".npy")).shape[0]
        assert wav_of(run / "demos" / name) == (24000, frames * 320)  # EnCodec: 320 samples per frame

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    assert sorted(events.Tags()["audio"]) == sorted(f"demo_audio/{name[12:-4]}" for name in wavs)

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = [items(r.history.item) for r in wandb_records(run_file) if r.HasField("history")]
    logged = {k: v for h in history for k, v in h.items() if k.startswith("demo_audio/")}  # media as nested keys
    tags = sorted(f"demo_audio/{name[12:-4]}" for name in wavs)
    assert sorted({key.rsplit("/", 1)[0] for key in logged}) == tags
    assert all(logged[f"{tag}/_type"] == "audio-file" for tag in tags)
    assert all((run_file.parent / "files" / logged[f"{tag}/path"]).is_file() for tag in tags)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((run / "mlflow" / "run.json").read_text())["run_id"]
    assert sorted(Path(a.path).name for a in client.list_artifacts(run_id, "demos")) == sorted(wavs)
