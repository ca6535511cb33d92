"""Compare runs: config diff, a strict A/B check with its confounds, metrics at matched steps and tokens.

A strict A/B means the runs differ in exactly one training setting and in nothing else that moves
results: the seed, the code (commit, and the uncommitted changes of a dirty tree), the data (its
content hash and tokenization) and the environment (torch, python, device and precision). Keys
that do not change training (run name, output dir, logging, demo and checkpoint cadence) are
shown in the diff but not counted. Runs of different lengths compare on the steps they share.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlab.errors import UserError
from scratchlab.fileio import atomic_write, why
from scratchlab.runs.index import RunRecord, doctor_findings, read_run, tokens_per_s
from scratchlab.runs.plots import (
    CURVES,
    Series,
    codebook_keys,
    html_page,
    line_plot,
    md_cell,
    md_table,
    png_data_uri,
    series,
    small_multiples,
)

MISSING = "<absent>"
# Config keys that cannot change what a run learns: listed in the diff, never counted as a setting.
BOOKKEEPING_PREFIXES = ("train.name", "train.out_dir", "train.log_every", "train.save_every", "train.keep_last",
                        "train.threads", "log.", "demo.", "doctor.", "eval.every")
HIGHER_IS_BETTER = {"tokens_per_s"}
MAX_TABLE_ROWS = 12


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 3e-3}} -> {"optim.lr": 3e-3}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def data_hash(data: dict[str, Any]) -> str | None:
    """What the data is, not where it lives: the data dir's meta (content hash, tokenization, splits), path left out."""
    meta = {k: v for k, v in data.items() if k not in ("path", "source")}
    if not meta:
        return None
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt(value: Any) -> str:
    if value is MISSING:
        return MISSING
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _is_bookkeeping(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in BOOKKEEPING_PREFIXES)


@dataclass
class Comparison:
    runs: list[RunRecord]
    labels: list[str]  # one per run: its differing settings (or its name when none differ)
    metric: str
    diff: list[tuple[str, str, list[Any]]]  # (key, kind, value per run); kind: setting | seed | data path | bookkeeping
    settings: list[str]  # differing training settings (seed and bookkeeping not counted)
    confounds: list[str]  # what else differs and could explain a result
    strict: bool
    verdict: str
    at_steps: list[tuple[int, list[int | None], list[float | None]]]  # (step, tokens per run, value per run)
    at_tokens: list[tuple[int, list[float | None], list[bool]]]  # (tokens, value per run, interpolated per run)
    same_tokens_per_step: bool
    final: list[tuple[int, float] | None]  # (step, value) of the last row with the metric
    best: list[tuple[int, float] | None]
    tokens_per_s: list[float | None]
    last_shared_step: int | None
    winner: int | None  # index of the best run at the last shared step
    missing: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        return _markdown(self)


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric in HIGHER_IS_BETTER else a < b


def _values(run: RunRecord, metric: str) -> list[tuple[int, int | None, float]]:
    return [(s, t, v) for s, t, v in run.values(metric) if math.isfinite(v)]


def _config_diff(runs: list[RunRecord], same_data: bool) -> tuple[list[tuple[str, str, list[Any]]], list[str]]:
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    diff, settings = [], []
    for key in keys:
        values = [f.get(key, MISSING) for f in flats]
        if all(json.dumps(v, default=str) == json.dumps(values[0], default=str) for v in values):
            continue
        if key == "train.seed":
            kind = "seed"
        elif key == "data.path" and same_data:
            kind = "data path (same data)"
        elif _is_bookkeeping(key):
            kind = "bookkeeping"
        else:
            kind = "setting"
            settings.append(key)
        diff.append((key, kind, values))
    return diff, settings


def _confounds(runs: list[RunRecord], names: list[str]) -> list[str]:
    out = []

    def differs(label: str, values: list[Any], why: str = "") -> None:
        if len({json.dumps(v, default=str) for v in values}) > 1:
            shown = ", ".join(f"{n}: {_fmt(v) if v is not None else 'unknown'}" for n, v in zip(names, values))
            out.append(f"{label} differs ({shown}){why}")

    seeds = [flatten(r.config).get("train.seed") for r in runs]
    differs("seed", seeds)
    # Every segment of a resumed run counts: a resume on another commit changes the code mid-run.
    commits = [sorted({(e.get("git") or {}).get("commit") or "unknown" for e in r.envs} or {"unknown"}) for r in runs]
    differs("code commit", [c[0][:12] if len(c) == 1 else "+".join(x[:12] for x in c) for c in commits])
    unpinned = [n for n, c in zip(names, commits) if "unknown" in c]
    if unpinned:
        out.append(f"code commit not recorded ({', '.join(unpinned)}: not run from a git checkout), so the code is "
                   "not pinned")
    dirty = [any((e.get("git") or {}).get("dirty") for e in r.envs) for r in runs]
    if any(dirty):
        diffs = [sorted({(e.get("git") or {}).get("diff_sha256") or "unknown" for e in r.envs if (e.get("git") or {})
                         .get("dirty")}) for r in runs]
        known = all(d and "unknown" not in d for d, is_dirty in zip(diffs, dirty) if is_dirty)
        same = all(dirty) and known and len({tuple(d) for d in diffs}) == 1 and len(diffs[0]) == 1
        if not same:
            which = ", ".join(n for n, d in zip(names, dirty) if d)
            why = ("the uncommitted changes differ" if known
                   else "the uncommitted changes were not recorded, so the code is not pinned")
            out.append(f"working tree dirty ({which}): {why}")
    hashes = [data_hash(r.data) for r in runs]
    differs("data", [h or "unknown" for h in hashes], " (content hash of the data dir's meta: text, tokenizer, splits)")
    for label, key in (("torch", "torch"), ("python", "python"), ("device/precision", "device"), ("GPU", "gpu")):
        differs(label, [sorted({str(e.get(key)) for e in r.envs}) if r.envs else ["unknown"] for r in runs])
    return out


def _verdict(settings: list[str], confounds: list[str], n_runs: int) -> tuple[bool, str]:
    what = "the two runs" if n_runs == 2 else f"the {n_runs} runs"
    if len(settings) == 1 and not confounds:
        return True, (f"Strict A/B: yes. {what.capitalize()} differ in exactly one setting, `{settings[0]}`; "
                      "seed, code, data and environment are the same.")
    if not settings and not confounds:
        return False, (f"Not an A/B: {what} have the same settings, seed, code, data and environment; "
                       "any difference is run-to-run nondeterminism.")
    if not settings and len(confounds) == 1 and confounds[0].startswith("seed"):
        return False, f"Not an A/B of a setting: {what} differ only in the seed (a seed-variance check)."
    parts = []
    if len(settings) > 1:
        parts.append(f"{len(settings)} settings differ ({', '.join(f'`{s}`' for s in settings)}), so a difference "
                     "cannot be put down to one of them")
    elif not settings:
        parts.append("no training setting differs")
    else:
        parts.append(f"one setting differs (`{settings[0]}`)")
    if confounds:
        parts.append(f"confounded by {len(confounds)}: " + "; ".join(confounds))
    return False, "Strict A/B: no. " + "; ".join(parts) + "."


def _labels(runs: list[RunRecord], diff: list[tuple[str, str, list[Any]]]) -> list[str]:
    keys = [(k, vals) for k, kind, vals in diff if kind in ("setting", "seed")]
    if len(keys) > 3:  # a label is a table header: past three keys the run name says more
        keys = []
    labels = [", ".join(f"{k}={_fmt(vals[i])}" for k, vals in keys) or r.name for i, r in enumerate(runs)]
    if len(set(labels)) < len(labels):  # same settings: tell them apart by name
        labels = [f"{lab} ({r.name})" if lab != r.name else lab for lab, r in zip(labels, runs)]
    return labels


def _subsample(items: list[Any], n: int = MAX_TABLE_ROWS) -> list[Any]:
    if len(items) <= n:
        return items
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def _matched_tokens(vals: list[list[tuple[int, int | None, float]]]) -> list[tuple[int, list[float | None], list[bool]]]:
    points = [sorted((t, v) for _, t, v in run if isinstance(t, int)) for run in vals]
    if not all(points):
        return []
    lo, hi = max(p[0][0] for p in points), min(p[-1][0] for p in points)
    if lo > hi:
        return []
    exact = sorted(set.intersection(*[{t for t, _ in p} for p in points]))
    if exact:  # measured values, no interpolation needed
        grid = exact
    else:  # batch sizes differ: the sparsest run's points, the others interpolated linearly between theirs
        ref = min(points, key=len)
        grid = [t for t, _ in ref if lo <= t <= hi]
    out = []
    for t in _subsample(grid):
        values, interpolated = [], []
        for p in points:
            at = dict(p)
            values.append(at[t] if t in at else _interp(p, t))
            interpolated.append(t not in at)
        out.append((t, values, interpolated))
    return out


def compare_runs(run_dirs: Sequence[str | Path], metric: str = "val_loss") -> Comparison:
    """Compare two or more run dirs on ``metric`` (any metrics.jsonl key; lower is better except tokens_per_s)."""
    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run dirs: scratchlab compare RUN_A RUN_B [RUN_C ...]")
    paths = [Path(p).resolve() for p in run_dirs]
    if len(set(paths)) < len(paths):
        raise UserError("compare was given the same run dir twice; give different runs")
    runs = [read_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    hashes = [data_hash(r.data) for r in runs]
    same_data = None not in hashes and len(set(hashes)) == 1
    diff, settings = _config_diff(runs, same_data)
    confounds = _confounds(runs, names)
    strict, verdict = _verdict(settings, confounds, len(runs))
    labels = _labels(runs, diff)

    vals = [_values(r, metric) for r in runs]
    missing = []
    if not any(vals):
        known = sorted({k for r in runs for row in r.rows for k in row if k not in ("step", "tokens")})
        raise UserError(f"no run has metric '{metric}'; pick --metric from: {', '.join(known) or 'none (no metrics yet)'}")
    by_step = [{s: (t, v) for s, t, v in run} for run in vals]
    shared = sorted(set.intersection(*[set(d) for d in by_step]))
    at_steps = [(s, [d[s][0] for d in by_step], [d[s][1] for d in by_step]) for s in _subsample(shared)]
    tps = [{r["step"]: r["tokens"] for r in run.rows if isinstance(r.get("step"), int) and r.get("step") > 0
            and isinstance(r.get("tokens"), int)} for run in runs]
    per_step = {round(t / s) for d in tps for s, t in d.items()}
    final = [(run[-1][0], run[-1][2]) if run else None for run in vals]
    best = []
    for run in vals:
        top = None
        for s, _, v in run:
            if top is None or _better(metric, v, top[1]):
                top = (s, v)
        best.append(top)
    last_shared = shared[-1] if shared else None
    winner = None
    if last_shared is not None:
        at = [d[last_shared][1] for d in by_step]
        winner = min(range(len(at)), key=lambda i: -at[i] if metric in HIGHER_IS_BETTER else at[i])

    # What is missing: unfinished runs, different lengths, metrics some runs lack.
    for r in runs:
        status, last, of = r.status.get("status", "unknown"), r.last_step(), r.max_steps()
        if status != "finished":
            extra = f": {r.status['error']}" if r.status.get("error") else ""
            missing.append(f"`{r.name}` is {status} at step {last if last is not None else '?'}"
                           f"{f' of {of}' if of else ''}{extra}")
    lasts = [r.last_step() for r in runs]
    if len(set(lasts)) > 1:
        missing.append(f"the runs reached different steps ({', '.join(str(s) for s in lasts)}); matched values stop "
                       f"at step {last_shared if last_shared is not None else 'none'}")
    for name, run in zip(names, vals):
        if not run:
            missing.append(f"`{name}` has no `{metric}` values")
    if all(vals) and not shared:
        missing.append(f"`{metric}` was never logged at the same step in all runs: no matched-step comparison")
    keys = [k for k, _ in CURVES] + [k for r in runs for keys in codebook_keys(r.rows).values() for k in keys]
    for key in dict.fromkeys(keys):
        have = [any(key in row for row in r.rows) for r in runs]
        if any(have) and not all(have):
            missing.append(f"`{key}`: missing in {', '.join(f'`{n}`' for n, h in zip(names, have) if not h)}")

    return Comparison(
        runs=runs, labels=labels, metric=metric, diff=diff, settings=settings, confounds=confounds, strict=strict,
        verdict=verdict, at_steps=at_steps, at_tokens=_matched_tokens(vals), same_tokens_per_step=len(per_step) <= 1,
        final=final, best=best, tokens_per_s=[tokens_per_s(r) for r in runs],
        last_shared_step=last_shared, winner=winner, missing=missing,
    )


# ---------------------------------------------------------------- Markdown


def _markdown(c: Comparison) -> str:
    m = c.metric.replace("_", " ")
    out = [f"# Compare: {' vs '.join(c.labels)}\n"]
    out.append(md_table(["run", "label", "status", "steps"],
                        [(f"`{r.name}`", lab, r.status.get("status", "unknown"),
                          f"{r.last_step() if r.last_step() is not None else '-'} / {r.max_steps() or '?'}")
                         for r, lab in zip(c.runs, c.labels)]))
    out.append("## Strict A/B check\n")
    out.append(c.verdict + "\n")
    if c.confounds:
        out.append("Confounds:\n\n" + "".join(f"- {md_cell(x)}\n" for x in c.confounds))
    out.append("## Config diff\n")
    if c.diff:
        out.append(md_table(["key", "kind", *c.labels], [(f"`{k}`", kind, *[_fmt(v) for v in vals])
                                                          for k, kind, vals in c.diff]))
    else:
        out.append("The resolved configs are identical.\n")

    out.append("## Results\n")
    rows = []
    for i, r in enumerate(c.runs):
        notes = []
        status = r.status.get("status", "unknown")
        if status != "finished":
            notes.append(f"{status} at step {r.last_step()}")
        if c.winner == i and len(c.runs) > 1:
            notes.append(f"best at shared step {c.last_shared_step}")
        codes = sorted({f.code for f in doctor_findings(r) if f.severity in ("error", "warning")})
        if codes:
            notes.append("doctor: " + ", ".join(codes))
        fin, top, speed = c.final[i], c.best[i], c.tokens_per_s[i]
        label = f"**{c.labels[i]}**" if c.winner == i else c.labels[i]
        rows.append((label, _num(fin[1]) if fin else "-", _num(top[1]) if top else "-",
                     top[0] if top else "-", f"{speed:,.0f}" if speed else "-", "; ".join(notes)))
    out.append(md_table(["setting", f"final {m}", f"best {m}", "step of best", "tokens/s", "notes"], rows))
    if c.winner is not None and len(c.runs) > 1:
        base = c.at_steps[-1][2] if c.at_steps else None
        line = f"At step {c.last_shared_step}, the last step all runs logged `{c.metric}`, **{c.labels[c.winner]}** is best"
        if base and len(c.runs) == 2 and base[0] is not None and base[1] is not None:
            delta = base[1] - base[0]
            line += f" ({c.labels[1]} minus {c.labels[0]}: {delta:+.4f}, {100 * delta / abs(base[0]):+.1f}%)"
        out.append(line + ". One seed per setting: a gap smaller than the seed-to-seed spread is noise.\n")

    out.append(f"## {c.metric} at matched steps\n")
    if c.at_steps:
        header = ["step", *(["tokens"] if c.same_tokens_per_step else []), *c.labels]
        out.append(md_table(header, [(s, *([f"{toks[0]:,}" if toks[0] is not None else "-"] if c.same_tokens_per_step else []),
                                      *[_num(v) for v in vals]) for s, toks, vals in c.at_steps]))
    else:
        out.append("No step at which every run logged it.\n")
    if not c.same_tokens_per_step:
        out.append(f"## {c.metric} at matched tokens\n")
        if c.at_tokens:
            out.append("Tokens per step differ between the runs; ≈ marks a value interpolated between two logged points.\n\n")
            out.append(md_table(["tokens", *c.labels], [
                (f"{t:,}", *[("≈" if interp else "") + _num(v) for v, interp in zip(vals, interps)])
                for t, vals, interps in c.at_tokens]))
        else:
            out.append("The runs share no range of tokens.\n")
    out.append("## Missing\n")
    out.append("".join(f"- {md_cell(x)}\n" for x in c.missing) if c.missing else "Nothing: every run has every metric.\n")
    return "\n".join(out)


# ---------------------------------------------------------------- files


def comparison_plots(c: Comparison) -> dict[str, bytes]:
    """{file name: PNG bytes}: one overlay per metric any run logged, per-codebook losses as small multiples."""
    x = "step" if c.same_tokens_per_step else "tokens"
    plots = {}
    for key, title in CURVES:
        lines = [Series(lab, *series(r.rows, key, x)) for lab, r in zip(c.labels, c.runs)]
        if any(s.xs for s in lines):
            plots[f"{key}.png"] = line_plot(lines, title, xlabel=x)
    families: dict[str, list[str]] = {}
    for r in c.runs:
        for family, keys in codebook_keys(r.rows).items():
            families.setdefault(family, [])
            families[family] += [k for k in keys if k not in families[family]]
    for family, keys in families.items():
        panels = [(k, [Series(lab, *series(r.rows, k, x)) for lab, r in zip(c.labels, c.runs)]) for k in keys]
        plots[f"{family}.png"] = small_multiples(panels, f"{family.replace('_', ' ')} per codebook", xlabel=x)
    return plots


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """Write compare.md, one PNG per plotted metric and compare.html (images inlined) into ``out_dir``; returns it."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {why(exc)}; give a writable --out DIR") from exc
    plots = comparison_plots(comparison)
    for name, png in plots.items():
        atomic_write(out / name, png)
    text = comparison.markdown()
    section = "\n## Plots\n\n" if plots else ""
    atomic_write(out / "compare.md", text + section + "".join(f"![{n[:-4]}]({n})\n" for n in plots))
    inline = "".join(f"![{n[:-4]}]({png_data_uri(png)})\n" for n, png in plots.items())
    atomic_write(out / "compare.html", html_page(text + section + inline, "compare: " + " vs ".join(comparison.labels)))
    return out
