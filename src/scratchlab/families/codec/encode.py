"""Encode a folder of audio into a codes dataset (``scratchlab data encode``), with DAC or EnCodec.

Needs the ``audio`` extra (``pip install -e '.[audio]'``): the codecs are the Hugging Face
``transformers`` implementations (``DacModel``, ``EncodecModel``), audio is read with
``soundfile`` and resampled with ``soxr``. The ``descript-audio-codec`` and ``encodec``
packages themselves are not used: both require torchaudio, which has no build for our torch.

Pretrained weights (``descript/dac_44khz``, ``facebook/encodec_24khz``) download from the
Hugging Face Hub on first use and are cached; that is the only step that needs the network.
``random_weights=True`` builds the same architecture untrained (random convolutions; EnCodec's
codebooks, which start at zero, are drawn from encoder outputs of probe audio) to test the
pipeline offline: its codes carry no meaning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scratchlab.families.codec.data import MANIFEST, BadFile, CodesSummary, validate_codes_dir
from scratchlab.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")
CODECS = ("dac", "encodec")
DEFAULT_MODELS = {"dac": "descript/dac_44khz", "encodec": "facebook/encodec_24khz"}
EXTRA_HINT = "install the audio extra: pip install -e '.[audio]'"


@dataclass(frozen=True)
class CodecInfo:
    """What a codes dataset records about the codec that made it (codec.json)."""

    codec: str
    model: str
    random_weights: bool
    sampling_rate: int
    hop_length: int
    frame_rate: float
    n_codebooks: int
    codebook_size: int


class Codec:
    """A loaded codec: mono float audio at ``info.sampling_rate`` -> codes ``[T, K]``."""

    def __init__(self, name: str, model: torch.nn.Module, info: CodecInfo, bandwidth: float | None) -> None:
        self.name, self.model, self.info, self.bandwidth = name, model.eval(), info, bandwidth

    @torch.no_grad()
    def encode(self, wave: np.ndarray, chunk_seconds: float = 30.0) -> np.ndarray:
        """Codes ``[ceil(len / hop), K]``; long audio is encoded in frame-aligned chunks (bounded memory)."""
        hop = self.info.hop_length
        n = int(np.ceil(len(wave) / hop)) * hop
        x = np.zeros(max(n, hop), dtype=np.float32)
        x[: len(wave)] = wave
        chunk = max(1, round(chunk_seconds * self.info.sampling_rate / hop)) * hop
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(x), chunk):
            piece = torch.from_numpy(x[start : start + chunk])[None, None].to(device)
            if self.name == "dac":
                codes = self.model.encode(piece).audio_codes  # [1, K, T]
            else:
                codes = self.model.encode(piece, bandwidth=self.bandwidth).audio_codes[0]  # [chunks=1, 1, K, T] -> [1, K, T]
            parts.append(codes[0].T.cpu().numpy())
        out = np.concatenate(parts)
        return out.astype(np.int16 if self.info.codebook_size <= 32768 else np.int32)


    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Mono float32 audio at ``info.sampling_rate`` from codes ``[T, K]`` (what `scratchlab sample --audio` writes)."""
        device = next(self.model.parameters()).device
        x = torch.from_numpy(np.asarray(codes, dtype=np.int64).T.copy())[None].to(device)  # [1, K, T]
        if self.name == "dac":
            wave = self.model.decode(audio_codes=x).audio_values
        else:
            wave = self.model.decode(x[None], [None]).audio_values  # EnCodec: [chunks=1, B, K, T]
        return wave.reshape(-1).float().cpu().numpy()


def codec_for_codes(codes_dir: str | Path, device: str = "cpu") -> Codec:
    """The codec that made a codes dir (its codec.json, written by `scratchlab data encode`)."""
    import json

    path = Path(codes_dir) / "codec.json"
    if not path.is_file():
        raise UserError(f"{path} not found: these codes were not made by `scratchlab data encode`, so scratchlab "
                        "does not know their codec; decode the .npy codes with the codec you used")
    info = json.loads(path.read_text())
    model = None if info.get("random_weights") else info.get("model")
    return load_codec(info["codec"], random_weights=bool(info.get("random_weights")), model=model,
                      bandwidth=float(info.get("bandwidth") or 6.0), device=device)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f"scratchlab data encode needs Hugging Face transformers; {EXTRA_HINT}") from None
    return transformers


def _probe_audio(sr: int, seconds: float = 0.15) -> torch.Tensor:
    t = torch.arange(int(sr * seconds)) / sr
    parts = [torch.zeros_like(t)] + [torch.randn_like(t) * a for a in (0.01, 0.1, 0.5)]
    parts += [0.5 * torch.sin(2 * torch.pi * f * t) for f in (110.0, 440.0, 1760.0)]
    return torch.cat(parts)[None, None]


@torch.no_grad()
def _probe_codebooks(net: torch.nn.Module) -> None:
    """Set an untrained EnCodec's residual codebooks from encoder outputs of probe audio (k-means' starting point)."""
    residual = net.encoder(_probe_audio(net.config.sampling_rate))[0].T  # [frames, dim]
    for layer in net.quantizer.layers:
        embed = layer.codebook.embed
        rows = torch.randint(0, len(residual), (embed.shape[0],))
        embed.copy_(residual[rows] + 0.1 * residual.std(0) * torch.randn_like(embed))
        nearest = torch.cdist(residual, embed).argmin(-1)
        residual = residual - embed[nearest]


def load_codec(
    name: str,
    *,
    random_weights: bool = False,
    model: str | None = None,
    bandwidth: float = 6.0,
    device: str = "cpu",
    seed: int = 0,
) -> Codec:
    """The ``dac`` (44.1 kHz, 9 x 1024) or ``encodec`` (24 kHz, ``bandwidth`` kbps: 8 x 1024 at 6) codec.

    ``model`` is a Hub id or a local folder (default ``DEFAULT_MODELS[name]``). ``random_weights``
    builds the default model's architecture untrained, seeded by ``seed``, without the network.
    """
    if name not in CODECS:
        raise UserError(f"--codec {name!r} is not supported; use one of: {', '.join(CODECS)}")
    tf = _transformers()
    model_id = model or DEFAULT_MODELS[name]
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name == "dac":
                # The architecture of descript/dac_44khz (its config.json), untrained.
                net = tf.DacModel(tf.DacConfig(sampling_rate=44100, downsampling_ratios=[2, 4, 8, 8], n_codebooks=9,
                                               codebook_size=1024, codebook_dim=8, encoder_hidden_size=64,
                                               decoder_hidden_size=1536))
            else:
                net = tf.EncodecModel(tf.EncodecConfig()).eval()  # the defaults are facebook/encodec_24khz's
                # Its codebooks start at zero (trained ones are k-means centroids of encoder outputs): start
                # them, as k-means does, from encoder outputs of varied probe audio (plus a little noise), so
                # that the untrained codec still maps different audio to different codes.
                _probe_codebooks(net)
        model_id = f"{DEFAULT_MODELS[name]} (random weights)"
    else:
        cls = tf.DacModel if name == "dac" else tf.EncodecModel
        try:
            net = cls.from_pretrained(model_id)
        except Exception as exc:  # noqa: BLE001 - network, missing files, wrong repo: one message
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"could not load codec weights {model_id!r} ({first[:160]}); the first use downloads them from the "
                "Hugging Face Hub (needs the network; then cached), or pass --model LOCAL_FOLDER; "
                "--random-weights tests the pipeline with an untrained codec"
            ) from None
    net = net.to(device)
    cfg = net.config
    sr = int(cfg.sampling_rate)
    hop = int(np.prod(cfg.downsampling_ratios)) if name == "dac" else int(cfg.hop_length)
    if name == "dac":
        k = int(cfg.n_codebooks)
    else:
        if bandwidth not in cfg.target_bandwidths:
            raise UserError(f"--bandwidth {bandwidth} is not one of this EnCodec's {list(cfg.target_bandwidths)} kbps")
        k = net.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
    info = CodecInfo(name, model_id, random_weights, sr, hop, round(sr / hop, 4), k, int(cfg.codebook_size))
    return Codec(name, net, info, bandwidth if name == "encodec" else None)


def read_audio(path: str | Path, sampling_rate: int) -> tuple[np.ndarray, float]:
    """Mono float32 audio at ``sampling_rate`` (channels averaged, resampled with soxr) and its duration in s."""
    try:
        import soundfile as sf
        import soxr
    except ImportError:
        raise UserError(f"reading audio needs soundfile and soxr; {EXTRA_HINT}") from None
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = data.mean(axis=1)
    duration = len(wave) / sr
    if sr != sampling_rate and len(wave):
        wave = soxr.resample(wave, sr, sampling_rate, quality="HQ").astype(np.float32)
    return wave, duration


def _sidecars(audio: Path, root: Path) -> tuple[str, list[str]]:
    """Text from ``NAME.txt``; tags from ``NAME.tags`` (comma or newline separated), else the sub-folder name."""
    text_file, tags_file = audio.with_suffix(".txt"), audio.with_suffix(".tags")
    text = text_file.read_text(encoding="utf-8", errors="replace").strip() if text_file.is_file() else ""
    if tags_file.is_file():
        raw = tags_file.read_text(encoding="utf-8", errors="replace").replace("\n", ",")
        tags = [t.strip() for t in raw.split(",") if t.strip()]
    else:
        folder = audio.parent.relative_to(root)
        tags = [folder.name] if folder.parts else []
    return text, tags


@dataclass
class EncodeResult:
    """What ``encode_audio_dir`` wrote: the codec, the dataset summary and the audio files it could not use."""

    out: Path
    codec: CodecInfo
    summary: CodesSummary
    skipped: list[BadFile]


def encode_audio_dir(
    audio_dir: str | Path,
    out_dir: str | Path,
    codec: str = "dac",
    *,
    random_weights: bool = False,
    model: str | None = None,
    bandwidth: float = 6.0,
    device: str = "cpu",
    chunk_seconds: float = 30.0,
    progress=None,
) -> EncodeResult:
    """Encode every audio file under ``audio_dir`` into ``out_dir`` (``.npy`` codes + manifest.jsonl + codec.json).

    ``progress`` (callable(str)) receives one line per file. Files soundfile cannot read are listed
    in the result (and not written), never silently dropped.
    """
    root, out = Path(audio_dir), Path(out_dir)
    if not root.is_dir():
        raise UserError(f"audio folder {root} not found; give a folder of audio files ({', '.join(AUDIO_SUFFIXES)})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {root}")
    if out.exists() and (out / MANIFEST).exists():
        raise UserError(f"{out} already holds a codes dataset (manifest.jsonl); choose a new --out folder")
    model_ = load_codec(codec, random_weights=random_weights, model=model, bandwidth=bandwidth, device=device)
    out.mkdir(parents=True, exist_ok=True)
    lines, skipped = [], []
    for path in files:
        rel = path.relative_to(root)
        try:
            wave, duration = read_audio(path, model_.info.sampling_rate)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported, not fatal
            skipped.append(BadFile(str(rel), f"unreadable audio ({type(exc).__name__}: {exc})"))
            continue
        if len(wave) == 0:
            skipped.append(BadFile(str(rel), "empty audio"))
            continue
        codes = model_.encode(wave, chunk_seconds=chunk_seconds)
        name = "__".join(rel.with_suffix("").parts) + ".npy"
        np.save(out / name, codes)
        text, tags = _sidecars(path, root)
        lines.append(json.dumps({"codes": name, "text": text, "tags": tags, "duration_s": round(duration, 4),
                                 "source": str(rel)}, ensure_ascii=False))
        if progress:
            progress(f"{rel}: {duration:.2f} s -> {codes.shape[0]} frames x {codes.shape[1]} codebooks")
    (out / MANIFEST).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    (out / "codec.json").write_text(json.dumps({**asdict(model_.info), "bandwidth": model_.bandwidth}, indent=2) + "\n")
    summary = validate_codes_dir(out, codebook_size=model_.info.codebook_size, n_codebooks=model_.info.n_codebooks,
                                 write_summary=True)
    return EncodeResult(out, model_.info, summary, skipped)
