"""Preflight's dataset checks: is the training crop random, how much of the vocabulary do the targets
cover, how many tokens per parameter (thresholds and why: doctor/preflight.py's docstring).

``dataset`` is a map-style Dataset of dicts with ``input_ids`` and ``labels`` (one sample each); items may
carry ``window_start``, ``clip_len`` and ``crop_len`` (see `check_deterministic_windows`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.doctor.findings import Finding, make_finding, sig
from scratchlab.loss import IGNORE_INDEX

WINDOW_INDICES, WINDOW_REPEATS = 4, 3
WINDOW_P_VALUE = 1e-3  # flag a constant crop only when a random crop would look so by chance < 0.1%
COVERAGE_MIN = 0.5
COVERAGE_TARGETS_PER_VOCAB = 10
SCAN_MAX_SAMPLES, SCAN_SECONDS = 512, 2.0
TOKENS_PER_PARAM_MIN = 0.1


def _item(dataset: Any, index: int) -> dict[str, Any]:
    item = dataset[index]
    if not isinstance(item, Mapping) or "input_ids" not in item:
        raise TypeError(f"dataset[{index}] is {type(item).__name__}; expected a dict with 'input_ids' (and 'labels')")
    return dict(item)


def check_deterministic_windows(dataset: Any, training: bool = True) -> list[Finding]:
    """deterministic_windows: are training windows random crops?

    Draws each of 4 indices 3 times. With ``window_start`` and ``clip_len`` in the items: a clip of L
    tokens holds L - T possible starts for a window of T inputs (+1 label); items may say how many tokens
    or frames of the clip a window covers with ``crop_len`` (default T + 1). Flag when every draw starts at
    the same offset (e.g. always 0: an inverted crop flag), or every index returns its same window on
    every draw, while clips are longer than a window and a random crop would look like that with
    probability < 1e-3. That holds whatever the dataset declares: in the field notes the bug WAS the flag
    (``random_crop=False`` on a training set meant "always the clip's first seconds"), so a declared-fixed
    training crop is judged like any other, and the evidence says which part of each clip is never trained
    on. Without those keys there is no telling a fixed dataset (pre-cut sequences, a legitimate design)
    from a broken crop, so identical repeated draws are flagged only when the dataset advertises
    ``random_crop = True``. An evaluation set (``training=False``) is fixed on purpose: no finding.
    """
    if not training:
        return []
    advertised = getattr(dataset, "random_crop", None)
    n = len(dataset)
    if n == 0:
        return []
    indices = sorted({0, n // 3, (2 * n) // 3, n - 1} & set(range(n)))[:WINDOW_INDICES]
    draws = {i: [_item(dataset, i) for _ in range(WINDOW_REPEATS)] for i in indices}
    first = draws[indices[0]][0]
    T = int(torch.as_tensor(first["input_ids"]).shape[0])
    if "window_start" in first and "clip_len" in first:
        starts = {i: [int(d["window_start"]) for d in ds] for i, ds in draws.items()}
        crop = {i: int(ds[0].get("crop_len", T + 1)) for i, ds in draws.items()}  # clip tokens one window covers
        room = {i: int(ds[0]["clip_len"]) - crop[i] + 1 for i, ds in draws.items()}  # possible starts
        movable = [i for i in indices if room[i] > 1]
        if not movable:
            return []
        clip_lens = [int(draws[i][0]["clip_len"]) for i in movable]
        all_starts = {s for i in movable for s in starts[i]}
        # Chance that uniform random crops show the pattern: constant start over every draw,
        # or the same start per index over its repeats.
        p_constant = math.prod((1 / room[i]) ** len(starts[i]) for i in movable) * min(room[i] for i in movable)
        p_per_index = math.prod((1 / room[i]) ** (len(starts[i]) - 1) for i in movable)
        # Each index's clip is only ever seen through its one window: the rest is never trained on.
        unseen = [sig(1 - min(crop[i], length) / length) for i, length in zip(movable, clip_lens)]
        evidence = dict(window_len=T, clip_len=clip_lens, indices=movable, starts=[starts[i] for i in movable],
                        unseen_fraction=unseen, mean_unseen_fraction=sig(statistics.fmean(unseen)),
                        declared_random_crop=advertised)
        flag = f" although the dataset declares random_crop={advertised}" if advertised is not None else ""
        share = f"{statistics.fmean(unseen):.0%} of each clip"
        if len(all_starts) == 1 and p_constant < WINDOW_P_VALUE:
            (s,) = all_starts
            return [make_finding("deterministic_windows", f"every draw of {len(movable)} indices starts at "
                                 f"window_start={s} although clips hold {min(clip_lens)}+ tokens (window {T}){flag}: "
                                 f"crops are not random ({share} is never trained on); draw the start at random for training",
                                 reason="constant_start", start=s, p_random=sig(p_constant), **evidence)]
        if all(len(set(starts[i])) == 1 for i in movable) and p_per_index < WINDOW_P_VALUE:
            return [make_finding("deterministic_windows", f"each dataset index returns the same window on every "
                                 f"draw although clips hold {min(clip_lens)}+ tokens (window {T}){flag}: the rest of "
                                 f"each clip is never seen in that position ({share} lies outside its index's window); use random "
                                 "crops for training",
                                 reason="same_window_per_index", p_random=sig(p_per_index), **evidence)]
        return []
    if advertised is True:
        same = [all(torch.equal(torch.as_tensor(d["input_ids"]), torch.as_tensor(ds[0]["input_ids"])) for d in ds)
                for ds in draws.values()]
        if len(indices) >= 2 and all(same):
            return [make_finding("deterministic_windows", f"the dataset sets random_crop=True but {len(indices)} "
                                 f"indices each returned identical windows on {WINDOW_REPEATS} draws: the crop flag "
                                 "is ignored or inverted", reason="identical_draws", indices=indices,
                                 repeats=WINDOW_REPEATS, window_len=T)]
    return []


@dataclass
class DataScan:
    samples: int  # scanned
    dataset_len: int
    targets: int  # non-ignored labels scanned
    distinct: set[int]
    complete: bool  # the whole dataset was scanned


def scan_dataset(dataset: Any, vocab_size: int | None) -> DataScan:
    """Target ids of up to SCAN_MAX_SAMPLES samples (evenly spread; stops after SCAN_SECONDS)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    item = _item(dataset, 0)
    per_sample = int((torch.as_tensor(item.get("labels", item["input_ids"])) != IGNORE_INDEX).sum())
    want = max(16, math.ceil(COVERAGE_TARGETS_PER_VOCAB * (vocab_size or 0) / max(per_sample, 1)))
    count = min(n, want, SCAN_MAX_SAMPLES)
    indices = np.unique(np.linspace(0, n - 1, num=count).round().astype(np.int64))
    deadline = time.perf_counter() + SCAN_SECONDS
    distinct: set[int] = set()
    targets = scanned = 0
    for i in indices:
        item = _item(dataset, int(i))
        labels = torch.as_tensor(item.get("labels", item["input_ids"]))
        kept = labels[labels != IGNORE_INDEX]
        distinct.update(torch.unique(kept).tolist())
        targets += int(kept.numel())
        scanned += 1
        if time.perf_counter() > deadline:
            break
    return DataScan(scanned, n, targets, distinct, complete=scanned == n)


def check_vocab_coverage(scan: DataScan, vocab_size: int) -> list[Finding]:
    """vocab_coverage_low: few distinct target ids compared with V, on a conclusive scan."""
    coverage = len({t for t in scan.distinct if 0 <= t < vocab_size}) / vocab_size
    conclusive = scan.complete or scan.targets >= COVERAGE_TARGETS_PER_VOCAB * vocab_size
    if coverage >= COVERAGE_MIN or not conclusive:
        return []
    return [make_finding("vocab_coverage_low", f"training targets cover {coverage:.0%} of the {vocab_size} ids "
                         f"(over {scan.targets:,} targets): the other embeddings and output rows stay untrained",
                         coverage=sig(coverage), covered=round(coverage * vocab_size), vocab_size=vocab_size,
                         samples_scanned=scan.samples, targets_scanned=scan.targets, dataset_len=scan.dataset_len)]


def check_data_size(scan: DataScan, n_params: int) -> list[Finding]:
    """data_too_small: len(dataset) x targets per sample vs trainable parameters."""
    per_sample = scan.targets / max(scan.samples, 1)
    tokens = scan.dataset_len * per_sample
    ratio = tokens / max(n_params, 1)
    if ratio >= TOKENS_PER_PARAM_MIN:
        return []
    return [make_finding("data_too_small", f"{tokens:,.0f} training tokens for {n_params:,} parameters "
                         f"({ratio:.3f} tokens/param): use a smaller model or more data",
                         tokens=int(tokens), params=n_params, tokens_per_param=sig(ratio),
                         dataset_len=scan.dataset_len, tokens_per_sample=sig(per_sample),
                         threshold=TOKENS_PER_PARAM_MIN)]
