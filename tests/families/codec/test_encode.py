"""Audio -> codes with the real codec architectures, untrained (the pretrained weights need the network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("soundfile", reason="the audio extra is not installed: pip install -e '.[audio]'")
pytest.importorskip("soxr", reason="the audio extra is not installed: pip install -e '.[audio]'")
pytest.importorskip("transformers", reason="the audio extra is not installed: pip install -e '.[audio]'")

import soundfile as sf  # noqa: E402

from scratchlab.cli import main  # noqa: E402
from scratchlab.families.codec.data import open_codes_data  # noqa: E402
from scratchlab.families.codec.encode import encode_audio_dir, load_codec, read_audio  # noqa: E402
from scratchlab.errors import UserError  # noqa: E402


def sine(freq: float, seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.fixture
def audio_dir(tmp_path):
    root = tmp_path / "audio"
    (root / "jazz").mkdir(parents=True)
    sf.write(root / "tone.wav", sine(440, 0.5, 22050), 22050)  # resampled to the codec's rate
    (root / "tone.txt").write_text("a pure tone\n")
    (root / "tone.tags").write_text("sine, test\n")
    sf.write(root / "jazz" / "stereo.flac", sine(220, 0.3, 24000, channels=2), 24000)
    (root / "broken.wav").write_bytes(b"RIFF not really audio")
    return root


def test_read_audio_resamples_and_mixes_down(tmp_path):
    sf.write(tmp_path / "a.wav", sine(1000, 1.0, 16000, channels=2), 16000)
    wave, duration = read_audio(tmp_path / "a.wav", 24000)
    assert wave.ndim == 1 and wave.dtype == np.float32 and duration == pytest.approx(1.0)
    assert abs(len(wave) - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) * 24000 / len(wave) == pytest.approx(1000, abs=2)  # the tone keeps its pitch


def test_encode_with_untrained_encodec_via_cli(audio_dir, tmp_path, capsys):
    out = tmp_path / "codes"
    rc = main(["data", "encode", str(audio_dir), "--codec", "encodec", "--out", str(out), "--random-weights"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped broken.wav: unreadable audio" in captured.err and "UNTRAINED" in captured.err
    rows = {r["source"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == {"tone.wav", "jazz/stereo.flac"}
    assert rows["tone.wav"]["text"] == "a pure tone" and rows["tone.wav"]["tags"] == ["sine", "test"]
    assert rows["jazz/stereo.flac"]["tags"] == ["jazz"] and rows["jazz/stereo.flac"]["text"] == ""
    assert rows["tone.wav"]["duration_s"] == pytest.approx(0.5)
    codes = np.load(out / rows["tone.wav"]["codes"], allow_pickle=False)
    # EnCodec 24 kHz at 6 kbps: 8 codebooks of 1024, 75 frames/s; 0.5 s -> ceil(12000 / 320) = 38 frames.
    assert codes.shape == (38, 8) and codes.dtype == np.int16
    assert 0 <= codes.min() and codes.max() < 1024 and len(np.unique(codes)) > 8
    info = json.loads((out / "codec.json").read_text())
    assert info["random_weights"] and info["frame_rate"] == 75.0 and info["n_codebooks"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 2 and summary["codebook_size"] == 1024 and not summary["bad"]
    data = open_codes_data(out, codebook_size=1024, val_fraction=0.0)  # the result is a valid codes dataset
    assert data.n_codebooks == 8 and data.frame_rate == pytest.approx(75.0, rel=0.05)


@pytest.fixture(scope="module")
def encodec():
    return load_codec("encodec", random_weights=True)


def test_untrained_codec_codes_depend_on_the_audio(encodec):
    codec = encodec
    tone = codec.encode(sine(440, 0.5, 24000))
    noise = codec.encode(np.random.default_rng(0).normal(0, 0.3, 12000).astype(np.float32))
    assert tone.shape == noise.shape == (38, 8)
    assert np.mean(tone != noise) > 0.5 and len(np.unique(noise[:, 0])) > 5


def test_long_audio_is_encoded_in_chunks_with_the_same_frame_count(encodec):
    codec = encodec
    wave = sine(330, 1.0, 24000)
    whole, chunked = codec.encode(wave, chunk_seconds=30), codec.encode(wave, chunk_seconds=0.2)
    assert whole.shape == chunked.shape == (75, 8)
    assert np.mean(whole == chunked) > 0.5  # chunk edges differ a little; the rest is the same encoding


def test_missing_weights_are_one_clear_error(tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    with pytest.raises(UserError, match="--random-weights"):
        load_codec("dac", model=str(empty))
    with pytest.raises(UserError, match="not supported"):
        load_codec("mp3")
    assert main(["data", "encode", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--random-weights"]) == 2


@pytest.mark.slow
def test_encode_with_untrained_dac(audio_dir, tmp_path):
    """DAC 44.1 kHz (9 x 1024, hop 512): building its 76M-parameter model takes ~10 s on one core."""
    result = encode_audio_dir(audio_dir, tmp_path / "dac", "dac", random_weights=True)
    assert result.codec.n_codebooks == 9 and result.codec.sampling_rate == 44100
    assert [b.file for b in result.skipped] == ["broken.wav"]
    tone = np.load(tmp_path / "dac" / "tone.npy")
    assert tone.shape == (int(np.ceil(0.5 * 44100 / 512)), 9) and tone.max() < 1024
    assert result.summary.clips == 2 and not result.summary.bad


def test_audio_to_codes_to_model_to_wav(audio_dir, tmp_path):
    """The user's path end to end: audio -> codes (untrained EnCodec) -> codec_lm run -> sampled codes -> .wav."""
    from conftest import quiet

    from scratchlab.config import load_config
    from scratchlab.train import train

    codes = tmp_path / "codes"
    assert main(["data", "encode", str(audio_dir), "--codec", "encodec", "--out", str(codes), "--random-weights"]) == 0
    cfg = load_config("musicgen-tiny", [f"data.path={codes}", "data.val_fraction=0.5", "model.n_layers=1",
                                        "model.d_model=32", "model.max_seq_len=32", "train.seq_len=16",
                                        "train.batch_size=2", "train.max_steps=2", "eval.batches=1", "eval.batch_size=2",
                                        "demo.every=100", "demo.seconds=0.05", f"train.out_dir={tmp_path / 'runs'}",
                                        "doctor.preflight=false"])
    run = train(cfg, console=quiet()).run_dir
    out = tmp_path / "samples"
    assert main(["sample", str(run), "--text", "a pure tone", "--seconds", "0.1", "--seed", "0", "--audio",
                 "--out", str(out)]) == 0
    (wav,) = out.glob("*.wav")
    (npy,) = out.glob("*.npy")
    audio, sr = sf.read(wav)
    frames = np.load(npy).shape[0]
    assert sr == 24000 and np.load(npy).shape[1] == 8
    assert len(audio) == frames * 320  # EnCodec: 320 samples per frame
    assert np.isfinite(audio).all()
