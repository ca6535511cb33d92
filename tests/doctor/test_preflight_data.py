"""Preflight checks on the batch and the dataset: label shift (text and codebook shapes, ignored
targets, repetitive data), special tokens in the loss, crop randomness (with and without
window_start/clip_len), vocabulary coverage and tokens per parameter. The model checks are in
test_preflight.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlab.config import ModelConfig
from scratchlab.data.windows import WindowDataset
from scratchlab.doctor import CATALOG
from scratchlab.doctor.data_checks import DataScan, check_deterministic_windows, check_vocab_coverage
from scratchlab.doctor.preflight import check_label_shift, check_special_tokens, preflight
from scratchlab.families.registry import build_model

V, T, B = 64, 32, 4
DOCTOR = Path(__file__).resolve().parents[2] / "src" / "scratchlab" / "doctor"
PREFLIGHT = (DOCTOR / "preflight.py", DOCTOR / "leaks.py", DOCTOR / "data_checks.py")  # model, batch, leak, dataset checks


def lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=64))


def shifted(tokens: torch.Tensor, offset: int) -> dict[str, torch.Tensor]:
    """Inputs tokens[:, 4:4+T] and labels shifted by ``offset`` along time (+1 is correct)."""
    return {"input_ids": tokens[:, 4 : 4 + T], "labels": tokens[:, 4 + offset : 4 + offset + T].clone()}


def random_tokens(*shape: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


# ---------------------------------------------------------------- label shift


@pytest.mark.parametrize("codebooks", [None, 4])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, -1])
def test_label_offsets(offset, codebooks):
    shape = (B, T + 8) if codebooks is None else (B, T + 8, codebooks)
    batch = shifted(random_tokens(*shape), offset)
    ignored = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(1)) < 0.25
    batch["labels"][ignored] = -100  # a quarter of the targets ignored: judged on the rest
    found = check_label_shift(batch)
    if offset == 1:
        assert found == []
        return
    (f,) = found
    assert f.severity == "error"
    assert f.code == ("labels_not_shifted" if offset == 0 else "labels_misaligned")
    assert f.evidence["offset"] == offset and f.evidence["match_fraction"] == 1.0
    assert f.evidence["next_token_match_fraction"] < 0.1  # random tokens: ~1/V
    assert f.evidence["targets_compared"] > 0.6 * B * T  # ignored targets are not compared


def test_label_offset_evidence_counts_only_comparable_targets():
    batch = shifted(random_tokens(B, T + 8), 3)
    (f,) = check_label_shift(batch)
    assert f.evidence["targets_compared"] == B * (T - 3)  # the last 3 labels have no input to match
    assert f.evidence["match_by_offset"]["1"] < 0.1 and f.evidence["match_by_offset"]["3"] == 1.0


def test_random_and_degenerate_labels_give_no_label_finding():
    tokens = random_tokens(B, T + 8)
    independent = {"input_ids": tokens[:, :T], "labels": random_tokens(B, T, seed=7)}
    constant = {"input_ids": torch.full((B, T), 5), "labels": torch.full((B, T), 5)}  # every shift matches
    almost_all_ignored = shifted(tokens, 0)
    almost_all_ignored["labels"][:, 3:] = -100
    almost_all_ignored["labels"][1:] = -100  # 3 targets left: too few for a verdict
    for batch in (independent, constant, almost_all_ignored):
        assert check_label_shift(batch) == []


def test_repetitive_data_is_judged_by_the_best_shift():
    # Silence-like codes: every token repeated 4 times, so the unshifted labels also match 75% of the time.
    runs = random_tokens(B, (T + 8) // 4 + 1).repeat_interleave(4, dim=1)[:, : T + 8]
    assert check_label_shift(shifted(runs, 1)) == []
    (f,) = check_label_shift(shifted(runs, 0))
    assert f.code == "labels_not_shifted" and f.evidence["match_fraction"] == 1.0
    assert 0.7 < f.evidence["next_token_match_fraction"] < 0.8


def test_unshifted_labels_through_preflight():
    found = {f.code: f for f in preflight(lm(), shifted(random_tokens(B, T + 8), 0))}
    assert found["labels_not_shifted"].severity == "error"


# ---------------------------------------------------------------- special tokens


def test_special_tokens_in_the_loss():
    PAD, BOS = 0, 1
    batch = shifted(random_tokens(B, T + 8).clamp(min=2), 1)
    batch["labels"][1, 20:] = PAD  # padding at the end of sample 1, not masked
    batch["labels"][3, 5] = BOS
    (f,) = check_special_tokens(batch, (PAD, BOS, 2 ** 20))
    assert f.code == "special_tokens_in_loss" and f.severity == "error"
    assert f.evidence["ids"] == [PAD, BOS] and f.evidence["counts"] == {"0": T - 20, "1": 1}
    assert f.evidence["first_position"] == [1, 20]
    assert f.evidence["fraction"] == pytest.approx((T - 20 + 1) / (B * T), rel=1e-3)

    batch["labels"][batch["labels"] <= BOS] = -100  # masked in the data layer: fine
    assert check_special_tokens(batch, (PAD, BOS)) == []
    assert check_special_tokens(batch, ()) == []


def test_special_tokens_in_codebook_labels_and_through_preflight():
    batch = shifted(random_tokens(B, T + 8, 4, vocab=32).clamp(min=1), 1)
    batch["labels"][2, 7, 3] = 0
    (f,) = check_special_tokens(batch, (0,))
    assert f.evidence["first_position"] == [2, 7, 3] and f.evidence["counts"] == {"0": 1}
    text = shifted(random_tokens(B, T + 8), 1)
    found = {f.code for f in preflight(lm(), text, special_token_ids=(int(text["labels"][0, 0]),))}
    assert "special_tokens_in_loss" in found


# ---------------------------------------------------------------- crop randomness


class Clips(torch.utils.data.Dataset):
    """One clip per index, cropped to a window of T inputs + 1 label.

    crop: "random" (a fresh start each draw), "start" (always 0: the inverted flag of the field notes),
    "per_index" (a fixed start that depends on the index).
    """

    def __init__(self, crop: str, n: int = 8, clip_len: int = 200, meta: bool = True, vocab: int = V,
                 random_crop: bool | None = None):
        self.crop, self.clip_len, self.meta = crop, clip_len, meta
        self.clips = random_tokens(n, clip_len, vocab=vocab)
        self.generator = torch.Generator().manual_seed(0)
        if random_crop is not None:
            self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        room = self.clip_len - T  # possible starts of a T+1 window
        if self.crop == "random":
            start = int(torch.randint(0, room, (), generator=self.generator))
        else:
            start = 0 if self.crop == "start" else (7 * i) % room
        window = self.clips[i, start : start + T + 1]
        item = {"input_ids": window[:-1], "labels": window[1:]}
        if self.meta:
            item.update(window_start=start, clip_len=self.clip_len)
        return item


def window_findings(dataset) -> list:
    return [f for f in preflight(lm(), shifted(random_tokens(B, T + 8), 1), dataset=dataset)
            if f.code in ("deterministic_windows", "check_failed")]


def test_random_crops_are_fine():
    stream = np.random.default_rng(0).integers(0, V, 50_000).astype(np.uint16)
    assert window_findings(WindowDataset(stream, T, "random")) == []
    assert window_findings(Clips("random")) == []
    assert window_findings(Clips("random", meta=False, random_crop=True)) == []


def test_crop_always_at_the_start():
    (f,) = window_findings(Clips("start"))
    assert f.severity == "warning" and f.evidence["reason"] == "constant_start"
    assert f.evidence["start"] == 0 and f.evidence["window_len"] == T
    assert f.evidence["clip_len"] == [200] * 4 and f.evidence["starts"] == [[0, 0, 0]] * 4
    assert f.evidence["p_random"] < 1e-3


def test_same_window_per_index():
    (f,) = window_findings(Clips("per_index"))
    assert f.evidence["reason"] == "same_window_per_index"
    # scratchlab's own fixed tiling is for evaluation; as a training set it is flagged the same way.
    stream = np.random.default_rng(0).integers(0, V, 50_000).astype(np.uint16)
    (f,) = window_findings(WindowDataset(stream, T, "fixed"))
    assert f.evidence["reason"] == "same_window_per_index"
    n = (50_000 - 1) // T
    assert f.evidence["indices"] == [0, n // 3, 2 * n // 3, n - 1]
    assert f.evidence["starts"][1] == [(n // 3) * T] * 3


def test_fixed_datasets_that_cannot_or_do_not_crop_are_fine():
    assert window_findings(Clips("start", clip_len=T + 1)) == []  # a clip is exactly one window
    assert window_findings(Clips("start", meta=False)) == []  # pre-cut sequences: fixed by design
    assert window_findings(Clips("start", meta=False, random_crop=False)) == []  # declared fixed, no clip lengths
    # An evaluation set is fixed on purpose, whatever it declares and however long its clips.
    for crop in ("start", "per_index"):
        assert check_deterministic_windows(Clips(crop, random_crop=False), training=False) == []
        assert check_deterministic_windows(Clips(crop), training=False) == []


def test_declared_fixed_training_crop_is_flagged():
    # The field notes' bug was the flag itself: "random_crop off" always cropped a clip's first window.
    # A training set declaring a fixed crop is judged by what it returns, not by what it declares.
    (f,) = window_findings(Clips("start", random_crop=False))
    assert f.severity == "warning" and f.evidence["reason"] == "constant_start"
    assert f.evidence["declared_random_crop"] is False and "random_crop=False" in f.message
    assert f.evidence["unseen_fraction"] == [pytest.approx(1 - (T + 1) / 200, abs=1e-3)] * 4
    assert f.evidence["mean_unseen_fraction"] == pytest.approx(1 - (T + 1) / 200, abs=1e-3)
    assert "84% of each clip is never trained on" in f.message
    (f,) = window_findings(Clips("per_index", random_crop=False))
    assert f.evidence["reason"] == "same_window_per_index" and f.evidence["declared_random_crop"] is False
    # A crop that is random stays silent whatever it declares.
    assert window_findings(Clips("random", random_crop=False)) == []
    assert window_findings(Clips("random", random_crop=True)) == []


def test_crop_len_counts_the_frames_a_window_covers():
    # A codec-style item: the stream is longer than the frames it crops (delays), crop_len says how many.
    class Codec(Clips):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "crop_len": 100}

    (f,) = window_findings(Codec("start", clip_len=200))
    assert f.evidence["unseen_fraction"] == [0.5] * 4
    assert window_findings(Codec("start", clip_len=100)) == []  # one crop fills the clip: nothing to draw


def test_random_crop_flag_that_is_ignored():
    (f,) = window_findings(Clips("start", meta=False, random_crop=True))
    assert f.evidence["reason"] == "identical_draws" and f.evidence["repeats"] == 3


def test_unusable_datasets_give_check_failed():
    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return random_tokens(T), random_tokens(T)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"input_ids": random_tokens(T), "labels": random_tokens(T)}

    for dataset in (Tuples(), Stream()):
        found = window_findings(dataset)
        assert {f.evidence["check"] for f in found} == {"deterministic_windows", "data_scan"}
        assert all(f.code == "check_failed" and f.severity == "info" for f in found)


# ---------------------------------------------------------------- coverage and data size


def data_findings(dataset) -> dict:
    found = preflight(lm(), shifted(random_tokens(B, T + 8), 1), dataset=dataset)
    return {f.code: f for f in found if f.code in ("vocab_coverage_low", "data_too_small", "check_failed")}


def test_low_vocabulary_coverage():
    f = data_findings(Clips("random", vocab=10))["vocab_coverage_low"]
    assert f.severity == "info"
    assert f.evidence["covered"] == 10 and f.evidence["vocab_size"] == V
    assert f.evidence["coverage"] == pytest.approx(10 / V, abs=1e-3)
    assert f.evidence["samples_scanned"] == f.evidence["dataset_len"] == 8  # the whole dataset: conclusive


def test_coverage_needs_a_conclusive_scan():
    partial = DataScan(samples=16, dataset_len=10_000, targets=16 * 256, distinct=set(range(300)), complete=False)
    assert check_vocab_coverage(partial, 4096) == []  # 4k targets cannot cover 4096 ids: no verdict
    large = DataScan(samples=512, dataset_len=10_000, targets=50_000, distinct=set(range(300)), complete=False)
    (f,) = check_vocab_coverage(large, 4096)
    assert f.evidence["coverage"] == pytest.approx(300 / 4096, rel=1e-3)


def test_data_too_small():
    model = lm()
    params = sum(p.numel() for p in model.parameters())
    f = data_findings(Clips("random"))["data_too_small"]
    assert f.severity == "warning"
    assert f.evidence["tokens"] == 8 * T and f.evidence["params"] == params
    assert f.evidence["tokens_per_param"] == pytest.approx(8 * T / params, rel=1e-3)


def test_enough_data_is_silent():
    stream = np.random.default_rng(0).integers(0, V, 200_000).astype(np.uint16)
    assert data_findings(WindowDataset(stream, T, "random")) == {}


# ---------------------------------------------------------------- catalog


def test_preflight_codes_are_catalogued():
    emitted = set()
    for node in (n for path in PREFLIGHT for n in ast.walk(ast.parse(path.read_text()))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_finding":
            assert isinstance(node.args[0], ast.Constant), f"line {node.lineno}: a code must be a literal"
            emitted.add(node.args[0].value)
    assert emitted == {
        "causal_leak", "batch_leak", "labels_not_shifted", "labels_misaligned", "init_loss_high", "nonfinite",
        "special_tokens_in_loss", "dead_params", "grad_outlier", "cannot_overfit", "deterministic_windows",
        "vocab_coverage_low", "data_too_small", "check_failed",
    }  # fmt: skip
    assert emitted <= set(CATALOG)
