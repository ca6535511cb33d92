"""Data preparation at scale: streaming text preparation and packed codec datasets.

Usage::

    python benchmarks/data_prep.py                     # text 0.2 GB and 2 GB, codes 100k clips
    python benchmarks/data_prep.py --quick             # text 20 MB, codes 2k clips (a minute)
    python benchmarks/data_prep.py --text-gb 0.2 --clips 10000 --formats jsonl.zst,parquet
    python benchmarks/data_prep.py --skip-codes / --skip-text

Text: a generated corpus (documents of web-page sizes, lognormal around 3 KB, sentences drawn
from a Zipf-distributed vocabulary) written in several source formats; `prepare_text` runs on
each in a fresh process with a tokenizer trained once beforehand (`--tokenizer`), so that the
figure is the streaming pass. Reported: MB of text per second, peak RSS of the process, and the
ratio to the tokenizer's own throughput (its batch encoder on the same text, already in memory, same
batch size) measured right before and after each run: the ceiling on this machine. Tokenizer training on the
default 100 MB sample is timed separately.

Codes: synthetic clips (K = 9, codebook 1024, lengths around 9 s at 86 frames/s: 100k clips are
about 250 hours) written as a codes folder; reported: pack time and peak RSS (`pack_codes_dir`),
open time and RSS of `open_codes_data` on the pack in a fresh process, and random training windows
per second: raw crops read through the memory map, and full training batches (delay pattern and
conditioning applied). Nothing asserts on time; the figures go into docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMATS = ("jsonl", "jsonl.zst", "parquet")
FRAME_RATE = 86.0


def rss_mb() -> float:
    """This process's peak RSS in MB. VmHWM (Linux) is the peak of this program's own memory; ru_maxrss
    also keeps the peak of the process that forked it (Linux carries it across exec), so a worker
    would report the driver's peak (the corpus conversion) when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, args: list[str]) -> dict:
    """Run one measurement in a fresh process (its own peak RSS) and return what it printed."""
    out = subprocess.run([sys.executable, __file__, "--worker", kind, *args], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- text


def make_corpus(out: Path, total_mb: float, seed: int = 0) -> Path:
    """Documents as a jsonl (the other formats are converted from it); returns the jsonl."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)))) for _ in range(30_000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    sentences = []
    for _ in range(20_000):
        words = [vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(5, 30)), p=zipf)]
        sentences.append(" ".join(words).capitalize() + ". ")
    path = out / "corpus.jsonl"
    target, written = int(total_mb * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            n_bytes = int(np.clip(rng.lognormal(np.log(3000), 1.0), 200, 200_000))
            doc, size = [], 0
            while size < n_bytes:
                s = sentences[int(rng.integers(len(sentences)))]
                doc.append(s)
                size += len(s)
                if rng.random() < 0.08:
                    doc.append("\n\n")
            text = "".join(doc)
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
    return path


def convert(jsonl: Path, fmt: str, out: Path) -> Path:
    if fmt == "jsonl":
        return jsonl
    if fmt == "jsonl.zst":
        import zstandard

        path = out / "corpus.jsonl.zst"
        with open(jsonl, "rb") as src, open(path, "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = out / "parquet"
        folder.mkdir(exist_ok=True)
        batch, part = [], 0
        with open(jsonl) as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 20_000:
                    pq.write_table(pa.table({"text": batch}), folder / f"part-{part:05d}.parquet")
                    batch, part = [], part + 1
        if batch:
            pq.write_table(pa.table({"text": batch}), folder / f"part-{part:05d}.parquet")
        return folder
    raise ValueError(fmt)


def text_prep_worker(src: str, out: str, tokenizer: str) -> dict:
    from scratchlab.data.text import prepare_text

    marks: dict[str, float] = {}

    def hook(phase, done, total, tokens):
        marks.setdefault(phase, time.perf_counter())

    started = time.perf_counter()
    prepare_text(src, out, tokenizer_path=tokenizer or None, progress=hook)
    seconds = time.perf_counter() - started
    meta = json.loads((Path(out) / "meta.json").read_text())
    text_bytes = sum(s["bytes"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    tokenize = seconds - (marks.get("tokenize", started) - started)
    return {"seconds": seconds, "tokenize_seconds": tokenize, "mb": text_bytes / 1e6, "tokens": tokens,
            "rss_mb": rss_mb()}


def tokenizer_only_worker(jsonl: str, tokenizer: str, max_mb: float) -> dict:
    """encode_batch on text already in memory, in the preparation's batch size: the ceiling."""
    from scratchlab.data.prepare import BATCH_BYTES, encoder
    from scratchlab.data.tokenizer import load_tokenizer

    encode = encoder(load_tokenizer(tokenizer))
    batches, batch, size, total = [], [], 0, 0
    with open(jsonl) as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text)
            total += len(text)
            if size >= BATCH_BYTES:
                batches.append(batch)
                batch, size = [], 0
            if total >= max_mb * 1e6:
                break
    batches.append(batch)
    started = time.perf_counter()
    for b in batches:
        encode(b, add_special_tokens=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "mb": total / 1e6}


def train_tokenizer_worker(src: str, out: str) -> dict:
    from scratchlab.data.prepare import DEFAULT_SAMPLE_MB, _sample_documents
    from scratchlab.data.sources import DocumentSource
    from scratchlab.data.tokenizer import train_tokenizer

    started = time.perf_counter()
    info: dict = {}
    tok = train_tokenizer(_sample_documents(DocumentSource(src), 0.05, int(DEFAULT_SAMPLE_MB * 1e6), info, None),
                          4096)
    tok.save(out)
    return {"seconds": time.perf_counter() - started, "sample_mb": info["bytes"] / 1e6, "rss_mb": rss_mb()}


def bench_text(sizes_gb: list[float], formats: list[str], work: Path) -> list[dict]:
    rows = []
    for gb in sizes_gb:
        folder = work / f"text-{gb}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        jsonl = make_corpus(folder, gb * 1000)
        print(f"corpus {gb} GB generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        tokenizer = str(folder / "tokenizer.json")
        trained = worker("train-tokenizer", [str(jsonl), tokenizer])
        ceiling_args = [str(jsonl), tokenizer, str(min(gb * 1000, 20))]
        for fmt in formats:
            src = convert(jsonl, fmt, folder)
            # The ceiling is measured right before and after each run: a shared machine's load hits both alike.
            before = worker("tokenizer-only", ceiling_args)
            r = worker("text-prep", [str(src), str(folder / f"out-{fmt}"), tokenizer])
            after = worker("tokenizer-only", ceiling_args)
            ceiling_mbs = (before["mb"] + after["mb"]) / (before["seconds"] + after["seconds"])
            mbs = r["mb"] / r["tokenize_seconds"]
            rows.append({"corpus GB": gb, "format": fmt, "MB/s": mbs, "tokenizer-only MB/s": ceiling_mbs,
                         "ratio": mbs / ceiling_mbs, "peak RSS MB": r["rss_mb"], "seconds": r["seconds"],
                         "tokens": r["tokens"], "tokenizer train s": trained["seconds"],
                         "tokenizer train RSS MB": trained["rss_mb"], "sample MB": trained["sample_mb"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
            shutil.rmtree(folder / f"out-{fmt}", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- codes


def make_codes(out: Path, clips: int, K: int = 9, codebook: int = 1024, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.clip(rng.normal(9.0, 3.0, clips), 2.0, 30.0) * FRAME_RATE
    with open(out / "manifest.jsonl", "w") as manifest:
        for i, n in enumerate(lengths.astype(int)):
            name = f"clip_{i:06d}.npy"
            np.save(out / name, rng.integers(0, codebook, (n, K), dtype=np.int16))
            manifest.write(json.dumps({"codes": name, "text": f"synthetic clip {i}", "tags": ["a", "b"],
                                       "duration_s": round(n / FRAME_RATE, 4)}) + "\n")
    (out / "codec.json").write_text(json.dumps({"codebook_size": codebook, "n_codebooks": K}))
    return out


def pack_worker(src: str, out: str) -> dict:
    from scratchlab.families.codec.data import pack_codes_dir

    started = time.perf_counter()
    s = pack_codes_dir(src, out)
    return {"seconds": time.perf_counter() - started, "clips": s.clips, "hours": s.hours, "rss_mb": rss_mb()}


def open_worker(packed: str, window: int, seconds: float) -> dict:
    import torch

    from scratchlab.families.codec.data import open_codes_data
    from scratchlab.families.codec.patterns import DelayPattern

    torch.set_num_threads(1)
    before = rss_mb()
    started = time.perf_counter()
    data = open_codes_data(packed)
    opened = time.perf_counter() - started
    after_open = rss_mb()
    store, ids = data.store, np.asarray(data.splits["train"])
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # raw crops through the memory map
        for c in ids[rng.integers(0, len(ids), 1024)]:
            length = int(store.lengths[c])
            start = int(rng.integers(0, max(length - window, 0) + 1))
            np.asarray(store.codes(c)[start : start + window])
        n += 1024
    raw = n / (time.perf_counter() - t0)
    pattern = DelayPattern.preset("musicgen", data.n_codebooks)
    g = torch.Generator().manual_seed(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # what training asks for: pattern + conditioning
        data.batch("train", 64, window, "random", g, pattern=pattern)
        n += 64
    batches = n / (time.perf_counter() - t0)
    return {"open_s": opened, "rss_before_open_mb": before, "rss_after_open_mb": after_open,
            "raw_windows_per_s": raw, "batch_windows_per_s": batches, "rss_mb": rss_mb()}


def bench_codes(clips: int, window: int, work: Path) -> dict:
    src = work / "codes"
    t0 = time.perf_counter()
    make_codes(src, clips)
    print(f"{clips} clips written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    packed = worker("pack", [str(src), str(work / "packed")])
    opened = worker("open", [str(work / "packed"), str(window), "5"])
    size = (work / "packed" / "clips.bin").stat().st_size
    shutil.rmtree(src, ignore_errors=True)
    return {"clips": packed["clips"], "hours": packed["hours"], "packed GB": size / 1e9,
            "pack s": packed["seconds"], "pack peak RSS MB": packed["rss_mb"], "open s": opened["open_s"],
            "RSS before open MB": opened["rss_before_open_mb"], "RSS after open MB": opened["rss_after_open_mb"],
            "raw windows/s": opened["raw_windows_per_s"], "training windows/s": opened["batch_windows_per_s"],
            "window frames": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="text 20 MB, codes 2,000 clips")
    parser.add_argument("--text-gb", default="0.2,2", help="corpus sizes in GB, comma-separated (default 0.2,2)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"source formats (default {','.join(FORMATS)})")
    parser.add_argument("--clips", type=int, default=100_000, help="synthetic codec clips (default 100000)")
    parser.add_argument("--window", type=int, default=500, help="frames per training window (default 500)")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-codes", action="store_true")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if args.worker:
        fn = {"text-prep": text_prep_worker, "tokenizer-only": lambda j, t, m: tokenizer_only_worker(j, t, float(m)),
              "train-tokenizer": train_tokenizer_worker, "pack": pack_worker,
              "open": lambda p, w, s: open_worker(p, int(w), float(s))}[args.worker]
        print(json.dumps(fn(*args.rest)))
        return
    sizes = [0.02] if args.quick else [float(x) for x in args.text_gb.split(",") if x]
    clips = 2_000 if args.quick else args.clips
    work = Path(args.work or tempfile.mkdtemp(prefix="scratchlab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = {}
        if not args.skip_text:
            results["text"] = bench_text(sizes, args.formats.split(","), work)
        if not args.skip_codes:
            results["codes"] = bench_codes(clips, args.window, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# data_prep ({os.cpu_count()} CPUs)")
    for row in results.get("text", []):
        print(f"text {row['corpus GB']:g} GB {row['format']:<9}: {row['MB/s']:6.2f} MB/s = {row['ratio']:.2f}x "
              f"tokenizer-only ({row['tokenizer-only MB/s']:.2f} MB/s), peak RSS {row['peak RSS MB']:.0f} MB, "
              f"{row['seconds']:.0f} s; tokenizer training on {row['sample MB']:.0f} MB: "
              f"{row['tokenizer train s']:.0f} s, peak RSS {row['tokenizer train RSS MB']:.0f} MB")
    if "codes" in results:
        c = results["codes"]
        print(f"codes {c['clips']:,} clips ({c['hours']:.0f} h, {c['packed GB']:.2f} GB packed): pack "
              f"{c['pack s']:.0f} s (peak RSS {c['pack peak RSS MB']:.0f} MB); open {c['open s']:.3f} s, RSS "
              f"{c['RSS before open MB']:.0f} -> {c['RSS after open MB']:.0f} MB (python + torch before); "
              f"random windows of {c['window frames']} frames: {c['raw windows/s']:,.0f}/s raw, "
              f"{c['training windows/s']:,.0f}/s as training batches (1 thread)")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
