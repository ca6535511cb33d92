"""A research-log page for one run (`scratchlab report RUN`): notes, figures, curves, findings, demos, config, environment.

The page is written as Markdown from the run dir alone. ``.md`` output puts the PNGs in a
``<name>_files/`` folder beside it; ``.html`` output is one self-contained file (PNGs and, up to
a size cap, audio inlined as data URIs), rendered with raw HTML off so user text is escaped.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import yaml

from scratchlab.doctor.findings import CATALOG, Finding
from scratchlab.errors import UserError
from scratchlab.fileio import atomic_write, read_text, why
from scratchlab.runs.index import RunRecord, doctor_findings, read_run, summarize
from scratchlab.runs.plots import (
    CURVES,
    Series,
    codebook_keys,
    html_page,
    line_plot,
    md_cell,
    md_code,
    md_user,
    md_table,
    png_data_uri,
    series,
    small_multiples,
)

MAX_DEMOS = 6  # text demos shown: evenly spaced over training, first and last included
MAX_INLINE_AUDIO = 20 * 2**20  # bytes of audio inlined into one HTML page; beyond, linked
AUDIO_SUFFIXES = {".wav": "wav", ".mp3": "mpeg", ".ogg": "ogg", ".flac": "flac"}
EXTRA_CURVES = [("update_ratio", "update / weight ratio"), ("val_entropy", "val output entropy (nats)")]
KEY_PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "pydantic", "scratchlab")


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def run_plots(record: RunRecord) -> dict[str, bytes]:
    """{file name: PNG} for the curves this run logged."""
    rows, plots = record.rows, {}
    train, val = series(rows, "loss"), series(rows, "val_loss")
    if train[0] or val[0]:
        plots["loss.png"] = line_plot([Series("train", *train), Series("val", *val)], "loss (nats/token)")
    for key, title in [*CURVES, *EXTRA_CURVES]:
        if key in ("loss", "val_loss"):
            continue
        xs, ys = series(rows, key)
        if not xs:
            continue
        lines = [Series(key, xs, ys)]
        if key == "grad_norm":
            lines.append(Series("clip threshold", *series(rows, "clip_threshold")))
        plots[f"{key}.png"] = line_plot(lines, title)
    for family, keys in codebook_keys(rows).items():
        plots[f"{family}.png"] = small_multiples([(k, [Series(k, *series(rows, k))]) for k in keys],
                                                 f"{family.replace('_', ' ')} per codebook")
    return plots


def _figures(record: RunRecord, findings: list[Finding]) -> str:
    s = summarize(record, findings)
    of = f" / {s.max_steps:,}" if s.max_steps else ""
    rows = [
        ("status", s.status + (f": {s.error}" if s.error else "")),
        ("steps", f"{s.step:,}{of}" if s.step is not None else "-"),
        ("tokens", f"{s.tokens:,}" if s.tokens is not None else "-"),
        ("final train loss", _num(s.last_loss)),
        ("final val loss (nats/token)", _num(s.last_val_loss)),
        ("final val bits/byte", _num(s.last_val_bpb)),
        ("best val loss", f"{_num(s.best_val_loss)} (step {s.best_val_step})" if s.best_val_loss is not None else "-"),
        ("tokens/s (training)", _num(s.tokens_per_s, ",.0f")),
        ("wall time", f"{s.wall_s:.1f} s" if s.wall_s is not None else "-"),
        ("doctor", f"{s.errors} errors, {s.warnings} warnings, {s.findings - s.errors - s.warnings} info"),
    ]
    return md_table(["figure", "value"], rows)


def _environment(record: RunRecord) -> str:
    env, data = record.env, record.data
    git = env.get("git") or {}
    commit = git.get("commit") or "unknown (not a git checkout)"
    if git.get("dirty"):
        commit += f" + uncommitted changes (diff sha256 {str(git.get('diff_sha256') or 'not recorded')[:16]})"
    freeze = env.get("pip_freeze") or []
    wanted = [line for line in freeze if line.split("==")[0].split(" @ ")[0].lower() in KEY_PACKAGES]
    splits = data.get("splits") or {}
    rows = [
        ("code", commit),
        ("command", " ".join(env.get("argv") or []) or "-"),
        ("python / torch", f"{env.get('python', '?')} / {env.get('torch', '?')}"),
        ("device", f"{env.get('device', '?')}" + (f", {env['gpu']} (CUDA {env.get('cuda')})" if env.get("gpu") else "")),
        ("machine", f"{env.get('platform', '?')}, {env.get('processor', '?')}, {env.get('cpu_count', '?')} CPUs, "
                    f"{env.get('torch_threads', '?')} torch threads"),
        ("data", f"{data.get('path', '?')} (content sha256 {str(data.get('content_sha256', '?'))[:16]}, vocab "
                 f"{data.get('vocab_size', '?')}, train {(splits.get('train') or {}).get('tokens', '?'):,} tokens)"
         if isinstance((splits.get("train") or {}).get("tokens"), int) else str(data.get("path", "?"))),
        ("packages", ", ".join(wanted) + f" ({len(freeze)} in env.json)" if freeze else "-"),
    ]
    for extra in record.envs[1:]:  # resumed segments
        g = extra.get("git") or {}
        rows.append(("resumed", f"commit {str(g.get('commit'))[:12]}{' (dirty)' if g.get('dirty') else ''}, torch "
                                f"{extra.get('torch')}, {extra.get('device')}"))
    return md_table(["what", "value"], rows)


def _findings(findings: list[Finding]) -> str:
    if not findings:
        return "None: the doctor found nothing to report.\n"
    rows = []
    for f in findings:
        info = CATALOG.get(f.code)
        rows.append((f.severity, f"`{f.code}`", f.step if f.step is not None else "-", f.message,
                     info.fix if info else "-"))
    return md_table(["severity", "code", "step", "message", "fix"], rows)


def _pick(items: list[Path], n: int = MAX_DEMOS) -> list[Path]:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _demos(record: RunRecord, out: Path, inline: bool) -> str:
    demos = record.path / "demos"
    if not demos.is_dir():
        return "No demos.\n"
    parts = []
    texts = sorted(demos.glob("step_*.txt"))
    for path in _pick(texts):
        parts.append(f"### {path.stem.replace('_', ' ')}\n\n" + md_code(read_text(path, warn=False) or ""))
    if len(texts) > MAX_DEMOS:
        parts.insert(0, f"{MAX_DEMOS} of {len(texts)} text demos, evenly spaced over training; all are in `demos/`.\n")
    codes = sorted(demos.rglob("*.npy"))
    if codes:
        rows = []
        for path in codes:
            try:  # the header only (mmap), never pickle: shape and dtype say what was sampled
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = "x".join(str(d) for d in arr.shape), str(arr.dtype)
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for a damaged header
                shape, dtype = f"unreadable ({type(exc).__name__})", "-"
            rows.append((f"`{path.relative_to(record.path).as_posix()}`", shape, dtype))
        parts.append("### Sampled code files\n\n" + md_table(["file", "shape", "dtype"], rows))
    audio = sorted(p for p in demos.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if audio:
        lines, budget = [], MAX_INLINE_AUDIO
        for path in audio:
            try:
                size = path.stat().st_size
                data = path.read_bytes() if inline and size <= budget else None
            except OSError:
                continue  # vanished or unreadable: nothing to play
            if data is not None:
                budget -= size
                src = f"data:audio/{AUDIO_SUFFIXES[path.suffix.lower()]};base64," + base64.b64encode(data).decode()
            else:  # a relative URL: a run dir's name may hold spaces, parentheses or '#'
                src = quote(Path(os.path.relpath(path, out.parent)).as_posix(), safe="/")
            lines.append(f"- {md_cell(path.relative_to(record.path).as_posix())}: ![audio]({src})\n")
        parts.append("### Audio\n\n" + "".join(lines))
    return "\n".join(parts) if parts else "No demos.\n"


def report_markdown(record: RunRecord, images: dict[str, str], out: Path, inline: bool) -> str:
    """The page; ``images`` maps each plot's file name to the src to use (a relative path or a data URI)."""
    findings = doctor_findings(record)
    notes = record.notes.strip()
    config = yaml.safe_dump(record.config, sort_keys=False) if record.config else "(config.yaml unreadable)"
    out_parts = [
        f"# Run {record.name}\n",
        f"`{record.path}`\n",
        "## Notes\n",
        # Notes are the user's Markdown (one "## time" heading each, nested here); tables of results are welcome and
        # any HTML in them is escaped by the renderer.
        md_user(re.sub(r"^## ", "### ", notes, flags=re.M)) if notes
        else 'No notes yet: `scratchlab runs note RUN "hypothesis: ..."` adds one.\n',
        "## Final figures\n",
        _figures(record, findings),
        "## Curves\n",
        "".join(f"![{name[:-4]}]({src})\n" for name, src in images.items()) or "No metrics logged yet.\n",
        "## Doctor findings\n",
        _findings(findings),
        "## Demo samples over training\n",
        _demos(record, out, inline),
        "## Resolved config\n",
        md_code(config, "yaml"),
        "## Environment\n",
        _environment(record),
    ]
    return "\n".join(out_parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report to ``out`` (.html: self-contained; .md: PNGs in ``<stem>_files/``); returns the path.

    The default is ``RUN/report.html``.
    """
    record = read_run(run_dir)
    out = Path(out) if out is not None else record.path / "report.html"
    if out.suffix.lower() not in (".html", ".md"):
        raise UserError(f"--out {out}: the report is written as .html or .md; give a file name ending in one of them")
    plots = run_plots(record)
    inline = out.suffix.lower() == ".html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if inline:
            images = {name: png_data_uri(png) for name, png in plots.items()}
        else:
            folder = out.with_name(f"{out.stem}_files")
            folder.mkdir(exist_ok=True)
            for name, png in plots.items():
                atomic_write(folder / name, png)
            images = {name: f"{folder.name}/{name}" for name in plots}
    except OSError as exc:
        raise UserError(f"cannot write the report to {out.parent}: {why(exc)}; give a writable --out FILE") from exc
    text = report_markdown(record, images, out, inline)
    try:
        atomic_write(out, html_page(text, f"run {record.name}") if inline else text)
    except UserError as exc:
        raise UserError(f"{exc}; give a writable --out FILE") from exc
    return out
