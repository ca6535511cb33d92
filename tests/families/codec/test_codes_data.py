"""Codes datasets: validation of bad files, summary numbers, the split, windows, conditioning, the loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlab.cli import main
from scratchlab.families.codec.data import (
    open_codes_data,
    split_of,
    synthetic_clip,
    validate_codes_dir,
    write_synthetic_codes,
)
from scratchlab.families.codec.conditioning import (
    COND_BOS,
    COND_PAD,
    COND_VOCAB,
    collate_conditions,
    condition_ids,
    decode_condition,
)
from scratchlab.data.windows import clip_window_start
from scratchlab.families.codec.patterns import codes_window
from scratchlab.errors import UserError
from scratchlab.families.codec.patterns import IGNORE_INDEX, DelayPattern, SpecialIds

PRESETS = ("parallel", "musicgen", "dia")


def write_dataset(root: Path, clips: dict[str, np.ndarray], rows: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in clips.items():
        np.save(root / name, arr)
    if rows is None:
        rows = [{"codes": name, "text": f"text of {name}", "tags": ["t"], "duration_s": len(arr) / 50}
                for name, arr in clips.items()]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def ramp(n: int, k: int = 3, base: int = 0) -> np.ndarray:
    """codes[t, j] = base + t + 1000 * j: every value says which frame and codebook it is."""
    return (base + np.arange(n)[:, None] + 1000 * np.arange(k)[None, :]).astype(np.int16)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_codes(tmp_path_factory.mktemp("synth"), n_clips=40, T=120, K=4, codebook_size=64,
                                 seed=3, min_T=10)


# -- validation


def test_each_bad_file_kind_is_named_with_its_reason(tmp_path):
    good = {f"good{i}.npy": ramp(20 + i) for i in range(3)}
    bad = {
        "wrong_k.npy": ramp(20, k=2),
        "too_big.npy": ramp(20) + 3200,  # codebook 2 reaches 3200 + 19 + 2000 >= 4096
        "negative.npy": ramp(20) - 5,
        "empty.npy": np.zeros((0, 3), dtype=np.int16),
        "floats.npy": ramp(20).astype(np.float32),
        "one_d.npy": np.arange(20, dtype=np.int16),
    }
    root = write_dataset(tmp_path / "d", {**good, **bad})
    (root / "garbage.npy").write_bytes(b"\x93NUMPY this is not an array")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    outside = tmp_path / "outside.npy"
    np.save(outside, ramp(20))
    rows = [{"codes": n, "text": "x", "tags": []} for n in [*good, *bad, "garbage.npy", "objects.npy",
                                                             "missing.npy", "../outside.npy", "good0.npy"]]
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + json.dumps({"codes": "good1.npy", "tags": "x"}) + "\n"
    (root / "manifest.jsonl").write_text(text)

    s = validate_codes_dir(root, codebook_size=4096)
    reasons = {b.file: b.reason for b in s.bad}
    assert s.clips == 3 and s.n_codebooks == 3
    assert "K=2" in reasons["wrong_k.npy"]
    assert ">= codebook size 4096" in reasons["too_big.npy"]
    assert "negative" in reasons["negative.npy"]
    assert "empty" in reasons["empty.npy"]
    assert "dtype float32" in reasons["floats.npy"]
    assert "2-D" in reasons["one_d.npy"]
    assert reasons["garbage.npy"].startswith("unreadable")
    assert reasons["objects.npy"].startswith("unreadable") and "pickle" in reasons["objects.npy"]
    assert reasons["missing.npy"] == "missing"
    assert "outside" in reasons["../outside.npy"]
    assert "listed twice" in reasons["good0.npy"]
    assert "not valid JSON" in reasons["manifest.jsonl:15"]
    assert '"tags"' in reasons["good1.npy"]
    assert len(s.bad) == 13

    with pytest.raises(UserError, match=r"13 bad file\(s\) in .*outside.npy: path outside"):
        validate_codes_dir(root, codebook_size=4096, on_bad="refuse")
    with pytest.raises(UserError, match="13 bad"):
        open_codes_data(root, codebook_size=4096, on_bad="refuse")
    data = open_codes_data(root, codebook_size=4096)  # skip: only the good clips are used
    assert sorted(c.name for c in data.clips) == sorted(good)


def test_summary_numbers(tmp_path):
    clips = {"a.npy": ramp(3, k=2), "b.npy": ramp(5, k=2), "c.npy": ramp(10, k=2, base=590)}
    rows = [{"codes": "a.npy", "text": "", "tags": ["x", "y"], "duration_s": 0.06},
            {"codes": "b.npy", "text": "", "tags": ["x"], "duration_s": 0.1},
            {"codes": "c.npy", "text": "", "tags": []}]
    root = write_dataset(tmp_path / "d", clips, rows)
    np.save(root / "stray.npy", ramp(4, k=2))
    s = validate_codes_dir(root, write_summary=True)
    assert (s.clips, s.n_codebooks, s.frames_min, s.frames_max, s.frames_total) == (3, 2, 3, 10, 18)
    assert s.frames_mean == 6.0
    assert s.max_code == 1599 and s.codebook_size == 2048 and s.codebook_size_inferred  # 1599 + 1 -> 2048
    assert s.hours == round(0.16 / 3600, 4) and s.clips_without_duration == 1
    assert s.tag_coverage == round(2 / 3, 4) and s.top_tags[0] == ("x", 2)
    # codebook 0 uses 0..4 and 590..599 (15 distinct of 2048), codebook 1 the same shifted by 1000
    assert s.codebook_usage == [round(15 / 2048, 4)] * 2
    assert s.unlisted_npy == 1 and not s.bad
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["clips"] == 3 and on_disk["codebook_size"] == 2048
    given = validate_codes_dir(root, codebook_size=1600)
    assert given.codebook_size == 1600 and not given.codebook_size_inferred and not given.bad
    assert [b.file for b in validate_codes_dir(root, codebook_size=1000).bad] == ["a.npy", "b.npy", "c.npy"]


def test_missing_manifest_or_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        validate_codes_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="manifest.jsonl"):
        validate_codes_dir(tmp_path)


# -- the split


def test_split_is_deterministic_by_name_and_disjoint(synth):
    a, b = open_codes_data(synth, val_fraction=0.25), open_codes_data(synth, val_fraction=0.25)
    assert a.splits == b.splits and a.n_clips("val") > 0
    assert not set(a.splits["train"]) & set(a.splits["val"])
    assert len(a.splits["train"]) + len(a.splits["val"]) == len(a) == 40
    for i in a.splits["val"]:
        assert split_of(a.clip(i).name, 0.25) == "val"
    names = [f"clip_{i}.npy" for i in range(4000)]
    share = sum(split_of(n, 0.2) == "val" for n in names) / len(names)
    assert 0.17 < share < 0.23
    assert [split_of(n, 0.2) for n in names[:50]] == [split_of(n, 0.2) for n in names[:50]]


def test_tiny_dataset_keeps_a_val_clip(tmp_path):
    root = write_dataset(tmp_path / "d", {f"c{i}.npy": ramp(8) for i in range(3)})
    data = open_codes_data(root, val_fraction=0.01)
    assert data.n_clips("val") == 1 and data.n_clips("train") == 2


# -- windows


def test_clip_window_start_modes():
    g = torch.Generator().manual_seed(0)
    starts = [clip_window_start(100, 30, "random", generator=g) for _ in range(400)]
    assert min(starts) == 0 and max(starts) == 70 and len(set(starts)) > 50  # random crop, full range
    assert [clip_window_start(100, 30, "fixed", index=i) for i in range(4)] == [0, 35, 70, 0]
    assert clip_window_start(10, 30, "random", generator=g) == 0  # shorter than the window: starts at 0
    with pytest.raises(ValueError, match="unknown window mode"):
        clip_window_start(100, 30, "crop")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", PRESETS)
def test_codes_window_targets_are_the_crop_and_context_follows_it(name):
    pattern, special = DelayPattern.preset(name, 3), SpecialIds.for_codebook(4096)
    codes = ramp(60)
    x, y = codes_window(codes, 10, 20, pattern, special)
    L = 20 + 1 + pattern.max_delay
    assert x.shape == y.shape == (L, 3)
    crop = pattern.revert(torch.where(y == IGNORE_INDEX, 0, y), n_frames=20)
    assert torch.equal(crop, torch.from_numpy(codes[10:30]).long())  # targets: exactly the crop's 20 frames
    assert (y != IGNORE_INDEX).sum() == 20 * 3  # no EOS: the crop ends mid-clip
    # Past the crop, the inputs hold the clip's real next frames (as sampling a longer piece would).
    if pattern.max_delay:
        assert x[21, 0] == codes[30, 0]
    else:
        assert (y[20] == IGNORE_INDEX).all()


def test_short_clip_is_padded_not_dropped(tmp_path):
    root = write_dataset(tmp_path / "d", {"short.npy": ramp(4), "long.npy": ramp(50), "x.npy": ramp(40)})
    data = open_codes_data(root, val_fraction=0.0)
    pattern = DelayPattern.preset("musicgen", 3)
    g = torch.Generator().manual_seed(0)
    seen_short = 0
    for _ in range(10):
        b = data.batch("train", 8, 16, "random", g, pattern=pattern)
        assert b["input_ids"].shape == (8, 16 + 1 + 2, 3)
        for y in b["labels"]:
            n_targets = int((y != IGNORE_INDEX).sum())
            if n_targets == 4 * 3 + 3:  # the 4-frame clip: its codes and each codebook's EOS
                seen_short += 1
                assert (y[4 + 3 :] == IGNORE_INDEX).all()  # the padding is never a target
    assert seen_short > 0


@pytest.mark.parametrize("name", PRESETS)
def test_no_bos_or_pad_target_and_eos_where_the_pattern_puts_it(synth, name):
    data = open_codes_data(synth, val_fraction=0.2)
    pattern, special = DelayPattern.preset(name, 4), data.special
    g = torch.Generator().manual_seed(1)
    eos_seen = 0
    for mode, split in (("random", "train"), ("fixed", "val")):
        for i in range(3):
            b = data.batch(split, 16, 40, mode, g if mode == "random" else None, i, pattern=pattern)
            labels = b["labels"]
            assert not torch.isin(labels, torch.tensor([special.bos, special.pad])).any()
            for y in labels:
                eos_rows = [(y[:, k] == special.eos).nonzero().flatten().tolist() for k in range(4)]
                assert all(len(r) <= 1 for r in eos_rows)
                if eos_rows[0]:
                    eos_seen += 1
                    # Staggered exactly by the delays, right after each codebook's last target frame.
                    for k, d in enumerate(pattern.delays):
                        assert eos_rows[k] == [eos_rows[0][0] + d]
                        frames = int(((y[:, k] != IGNORE_INDEX) & (y[:, k] != special.eos)).sum())
                        assert eos_rows[k][0] == d + frames
                else:
                    assert not any(eos_rows)
            # Inputs are the labels' stream shifted by one, after a BOS row.
            x = b["input_ids"]
            assert (x[:, 0] == special.bos).all()
            kept = labels[:, :-1] != IGNORE_INDEX
            assert torch.equal(x[:, 1:][kept], labels[:, :-1][kept])
    assert eos_seen > 0


def test_eval_batches_are_fixed_and_cover_clip_ends(synth):
    data = open_codes_data(synth, val_fraction=0.2)
    pattern = DelayPattern.preset("musicgen", 4)
    a = data.batch("val", 6, 30, "fixed", None, 2, pattern=pattern, uncond_prob=0.5)
    b = data.batch("val", 6, 30, "fixed", None, 2, pattern=pattern, uncond_prob=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["cond_mask"].sum(1) > 1).all()  # eval never drops the condition
    n = data.n_clips("val")
    batches = [data.batch("val", n, 30, "fixed", None, i, pattern=pattern) for i in range(3)]
    eos = sum(int((bt["labels"] == data.special.eos).any(-1).any(-1).sum()) for bt in batches)
    assert eos >= n  # over three passes every clip is also seen at its end


def test_crops_are_random_in_training(synth):
    data = open_codes_data(synth, val_fraction=0.2)
    pattern = DelayPattern.preset("parallel", 4)
    g = torch.Generator().manual_seed(0)
    firsts = {tuple(data.batch("train", 1, 8, "random", g, pattern=pattern)["labels"][0, :, 0].tolist())
              for _ in range(40)}
    assert len(firsts) > 20


# -- conditioning


def test_uncond_is_per_sample(synth):
    data = open_codes_data(synth, val_fraction=0.2)
    pattern = DelayPattern.preset("musicgen", 4)
    g = torch.Generator().manual_seed(0)
    b = data.batch("train", 400, 8, "random", g, pattern=pattern, uncond_prob=0.5)
    empty = b["cond_mask"].sum(1) == 1
    assert 0.4 < empty.float().mean() < 0.6
    assert (b["cond_ids"][empty, 0] == COND_BOS).all() and (b["cond_ids"][empty, 1:] == COND_PAD).all()
    small = [data.batch("train", 8, 8, "random", g, pattern=pattern, uncond_prob=0.5)["cond_mask"].sum(1) == 1
             for _ in range(20)]
    assert any(0 < int(s.sum()) < 8 for s in small)  # mixed within a batch, not all-or-nothing
    none = data.batch("train", 64, 8, "random", g, pattern=pattern, uncond_prob=0.0)
    assert (none["cond_mask"].sum(1) > 1).all()
    # The crops do not depend on uncond_prob or shuffle_tags (same generator state, same windows).
    s = g.get_state()
    c1 = data.batch("train", 16, 8, "random", g, pattern=pattern, uncond_prob=0.0)
    g.set_state(s)
    c2 = data.batch("train", 16, 8, "random", g, pattern=pattern, uncond_prob=0.9, shuffle_tags=False)
    assert torch.equal(c1["labels"], c2["labels"])


def test_tags_are_shuffled_per_sample_in_training(tmp_path):
    tags = ["alpha", "beta", "gamma", "delta"]
    root = write_dataset(tmp_path / "d", {"a.npy": ramp(30), "b.npy": ramp(30)},
                         [{"codes": "a.npy", "text": "song", "tags": tags}, {"codes": "b.npy", "text": "x", "tags": []}])
    data = open_codes_data(root, val_fraction=0.0)
    pattern = DelayPattern.preset("parallel", 3)
    g = torch.Generator().manual_seed(0)

    def lines(**kw):
        b = data.batch("train", 64, 8, "random", g, pattern=pattern, **kw)
        texts = [decode_condition(ids[m].tolist()) for ids, m in zip(b["cond_ids"], b["cond_mask"])]
        return [t for t in texts if t.startswith("song")]

    shuffled = lines()
    assert all(sorted(t.split("tags: ")[1].split(", ")) == sorted(tags) for t in shuffled)
    assert len(set(shuffled)) > 5
    assert set(lines(shuffle_tags=False)) == {"song\ntags: alpha, beta, gamma, delta"}
    fixed = data.batch("train", 2, 8, "fixed", pattern=pattern)
    assert decode_condition(fixed["cond_ids"][0][fixed["cond_mask"][0]].tolist()) == "song\ntags: alpha, beta, gamma, delta"


def test_condition_ids_encoding():
    assert condition_ids("") == [COND_BOS] and COND_VOCAB == 258
    ids = condition_ids("héllo", ["a", "b"])
    assert ids[0] == COND_BOS and bytes(ids[1:]).decode() == "héllo\ntags: a, b"
    # Too long: the free text is cut at a character boundary, the tags survive.
    cut = condition_ids("é" * 50, ["rock"], max_text_bytes=20)
    assert len(cut) - 1 <= 20 and bytes(cut[1:]).decode().endswith("\ntags: rock")
    assert bytes(cut[1:]).decode().startswith("éééé")
    ids, mask = collate_conditions([[COND_BOS, 1, 2], [COND_BOS]])
    assert ids.tolist() == [[COND_BOS, 1, 2], [COND_BOS, COND_PAD, COND_PAD]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_batch_contract(synth):
    data = open_codes_data(synth, val_fraction=0.2)
    pattern = DelayPattern.preset("dia", 4)
    b = data.batch("train", 3, 24, "random", torch.Generator().manual_seed(0), pattern=pattern)
    assert set(b) == {"input_ids", "labels", "cond_ids", "cond_mask"}
    assert b["input_ids"].dtype == b["labels"].dtype == b["cond_ids"].dtype == torch.long
    assert b["cond_mask"].dtype == torch.bool
    assert b["input_ids"].shape == b["labels"].shape == (3, 24 + 1 + 10, 4)
    assert b["cond_ids"].shape == b["cond_mask"].shape and b["cond_ids"].shape[0] == 3
    assert int(b["input_ids"].max()) < data.special.n_classes and int(b["cond_ids"].max()) < COND_VOCAB
    with pytest.raises(UserError, match="codebooks"):
        data.batch("train", 3, 24, "random", torch.Generator(), pattern=DelayPattern.preset("dia", 9))
    clip = data.clip(0)
    assert clip.codes.shape[1] == 4 and clip.text.endswith("loop")
    assert data.condition_text("val", 0) == "\n".join(
        p for p in (data.clip(0, "val").text, "tags: " + ", ".join(data.clip(0, "val").tags)
                    if data.clip(0, "val").tags else "") if p)
    assert data.frame_rate == 50.0 and data.meta["splits"]["train"]["clips"] == data.n_clips("train")


# -- the synthetic dataset


def test_synthetic_codes_are_learnable_and_deterministic(tmp_path):
    a = write_synthetic_codes(tmp_path / "a", n_clips=8, T=200, K=4, codebook_size=64, seed=5)
    b = write_synthetic_codes(tmp_path / "b", n_clips=8, T=200, K=4, codebook_size=64, seed=5)
    for i in range(8):
        assert np.array_equal(np.load(a / f"clip_{i:05d}.npy"), np.load(b / f"clip_{i:05d}.npy"))
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    codes = synthetic_clip(2, 1, 2000, 4, 64, np.random.default_rng(0), noise=0.05)
    c0 = codes[:, 0]
    assert np.array_equal(c0[8:], c0[:-8])  # codebook 0 loops a motif of period 8
    for k in range(1, 4):
        agree = np.mean(codes[:, k] == ((2 * k + 1) * c0 + 7 * k) % 64)
        assert 0.93 < agree < 0.98  # a function of codebook 0 plus ~5% noise
    rows = [json.loads(line) for line in (a / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        mood = row["text"].split()[2]
        assert not row["tags"] or mood in row["tags"]  # text and tags agree with the content's motif
    s = validate_codes_dir(a)
    assert s.clips == 8 and s.n_codebooks == 4 and s.codebook_size == 64 and not s.bad


# -- the CLI


def test_cli_codes_and_synth(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth-codes", str(out), "--clips", "6", "--frames", "40", "--codebooks", "3"]) == 0
    assert main(["data", "codes", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert summary["clips"] == 6 and summary["n_codebooks"] == 3
    assert json.loads((out / "summary.json").read_text())["clips"] == 6
    np.save(out / "clip_00002.npy", np.zeros((5, 2), dtype=np.int16))
    assert main(["data", "codes", str(out)]) == 0  # skipped, listed
    assert "clip_00002.npy" in capsys.readouterr().out
    assert main(["data", "codes", str(out), "--refuse-bad"]) == 2
    err = capsys.readouterr().err
    assert "clip_00002.npy: K=2 codebooks, expected 3" in err and len(err.strip().splitlines()) == 1


# -- packed datasets


def test_packed_windows_and_batches_equal_unpacked(synth, tmp_path):
    from scratchlab.families.codec.data import pack_codes_dir

    packed = tmp_path / "packed"
    summary = pack_codes_dir(synth, packed)
    a, b = open_codes_data(synth, val_fraction=0.2), open_codes_data(packed, val_fraction=0.2)
    assert summary.clips == len(a) == len(b) == 40
    assert a.splits == b.splits and a.frame_rate == b.frame_rate and a.codebook_size == b.codebook_size
    assert [c.name for c in a.clips] == [c.name for c in b.clips]
    for i in (0, 7, 39):
        ca, cb = a.clip(i), b.clip(i)
        assert np.array_equal(ca.codes, cb.codes) and (ca.text, ca.tags, ca.duration_s) == (cb.text, cb.tags, cb.duration_s)
    pattern = DelayPattern.preset("musicgen", 4)
    for i in range(len(a)):
        for start in (0, 3, len(a.clip(i).codes) // 2):
            wa, wb = a.window(i, start, 24, pattern), b.window(i, start, 24, pattern)
            assert torch.equal(wa["input_ids"], wb["input_ids"]) and torch.equal(wa["labels"], wb["labels"])
    for mode, split, gen in (("random", "train", 5), ("fixed", "val", None)):
        ga = torch.Generator().manual_seed(gen) if gen is not None else None
        gb = torch.Generator().manual_seed(gen) if gen is not None else None
        ba = a.batch(split, 16, 30, mode, ga, 1, pattern=pattern, uncond_prob=0.3)
        bb = b.batch(split, 16, 30, mode, gb, 1, pattern=pattern, uncond_prob=0.3)
        assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert b.meta["packed"] == str(packed) and b.meta["splits"] == a.meta["splits"]
    assert b.condition_text("val", 0) == a.condition_text("val", 0)


def test_a_packed_dataset_opens_without_reading_the_clip_files(synth, tmp_path, monkeypatch):
    from scratchlab.families.codec.data import pack_codes_dir

    packed = tmp_path / "p"
    pack_codes_dir(synth, packed)

    def no_npy(*args, **kwargs):
        raise AssertionError("a packed dataset must not re-scan the .npy files")

    monkeypatch.setattr("scratchlab.families.codec.data._load", no_npy)
    data = open_codes_data(packed, val_fraction=0.2)
    assert data.n_clips("train") + data.n_clips("val") == 40
    with pytest.raises(UserError, match="codes up to 63 >= codebook size 32"):
        open_codes_data(packed, codebook_size=32)
    assert open_codes_data(packed, codebook_size=128).codebook_size == 128
    (packed / "clips.bin").write_bytes((packed / "clips.bin").read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        open_codes_data(packed)


def test_cli_pack_skips_and_names_bad_files_and_trains(tmp_path, capsys):
    from scratchlab.config import load_config
    from scratchlab.families.registry import build_task

    src = tmp_path / "syn"
    assert main(["data", "synth-codes", str(src), "--clips", "12", "--frames", "60", "--codebooks", "3"]) == 0
    np.save(src / "clip_00004.npy", np.zeros((5, 2), dtype=np.int16))
    out = tmp_path / "packed"
    assert main(["data", "codes", str(src), "--pack", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clip_00004.npy" in printed and f"packed 11 clips into {out}" in printed
    assert main(["data", "codes", str(src), "--pack", str(tmp_path / "refused"), "--refuse-bad"]) == 2
    assert not (tmp_path / "refused" / "pack.json").exists()
    (tmp_path / "not_a_pack").mkdir()
    (tmp_path / "not_a_pack" / "keep.txt").write_text("mine")
    assert main(["data", "codes", str(src), "--pack", str(tmp_path / "not_a_pack")]) == 2
    said = []
    cfg = load_config("musicgen-tiny", [f"data.path={out}", "data.val_fraction=0.2", "model.max_seq_len=64",
                                        "train.seq_len=16"])
    cfg, task = build_task(cfg, said.append)
    assert task.data.n_clips("train") + task.data.n_clips("val") == 11 and task.data.n_codebooks == 3
    assert len(said) == 1 and "skipping 1 bad file(s)" in said[0] and "clip_00004.npy: K=2" in said[0]
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape[0] == 4
    # What training passes as `announce` is its reporter: the line reaches the console (and train.log).
    import io

    from rich.console import Console

    from scratchlab.train.progress import Reporter

    screen = io.StringIO()
    build_task(cfg, Reporter(Console(file=screen, width=300)))
    assert "skipping 1 bad file(s)" in screen.getvalue() and "clip_00004.npy" in screen.getvalue()


@pytest.mark.parametrize("declared_in", ["codec.json", "summary.json"])
def test_codebook_size_comes_from_the_declared_metadata(tmp_path, declared_in):
    clips = {f"c{i}.npy": ramp(20, k=2, base=i) for i in range(4)}
    clips["loud.npy"] = ramp(20, k=2)
    clips["loud.npy"][3, 0] = 5000  # one out-of-range value: 8192 if inferred
    root = write_dataset(tmp_path / "d", clips)
    assert validate_codes_dir(root).codebook_size == 8192  # nothing declared: inferred, as before
    if declared_in == "codec.json":
        (root / "codec.json").write_text(json.dumps({"codebook_size": 2048, "n_codebooks": 2}))
    else:
        validate_codes_dir(root, codebook_size=2048, write_summary=True)  # `data codes DIR --codebook-size 2048`
    said = []
    data = open_codes_data(root, val_fraction=0.0, announce=said.append)
    assert data.codebook_size == 2048 and data.summary.codebook_size_from == declared_in
    assert sorted(c.name for c in data.clips) == [f"c{i}.npy" for i in range(4)]
    assert "loud.npy: code 5000 >= codebook size 2048 (declared in " + declared_in + ")" in said[0]
    with pytest.raises(UserError, match="loud.npy"):
        open_codes_data(root, on_bad="refuse")
