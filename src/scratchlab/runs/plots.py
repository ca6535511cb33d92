"""Rendering shared by `compare` and `report`: metric series, matplotlib PNGs, and the page they go in.

Figures are drawn on a bare `matplotlib.figure.Figure` (the Agg canvas), never through pyplot:
no global state, no display needed, safe to call from a training process or a test.
Pages are written once as Markdown and rendered to HTML by markdown-it with raw HTML off,
so every piece of user text (notes, config values, demo samples) is escaped by construction.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scratchlab.fileio import to_float

# Metrics plotted when present, in this order; (key, title, log-scale y when the range is wide).
CURVES: list[tuple[str, str]] = [
    ("loss", "train loss (nats/token)"),
    ("val_loss", "val loss (nats/token)"),
    ("val_bpb", "val bits/byte"),
    ("grad_norm", "grad norm (before clipping)"),
    ("clip_ratio", "clip ratio (last 100 steps)"),
    ("lr", "learning rate"),
]
CODEBOOK_KEY = re.compile(r"^(val_)?loss_cb(\d+)$")


def as_float(value: Any) -> float:
    """A metric value as a float; "nan"/"inf" strings (how metrics.jsonl writes them), inf and junk -> nan (a gap)."""
    f = to_float(value)
    return f if f is not None and math.isfinite(f) else math.nan


def series(rows: Iterable[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of every row that has ``key`` and ``x``; non-finite values stay as nan (a gap in the line)."""
    xs, ys = [], []
    for row in rows:
        if key in row and isinstance(row.get(x), (int, float)):
            xs.append(float(row[x]))
            ys.append(as_float(row[key]))
    return xs, ys


def codebook_keys(rows: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """{"loss_cb": [...keys by codebook], "val_loss_cb": [...]} for codec runs; empty otherwise."""
    found: dict[str, set[tuple[int, str]]] = {}
    for row in rows:
        for key in row:
            m = CODEBOOK_KEY.match(key)
            if m:
                found.setdefault(f"{m.group(1) or ''}loss_cb", set()).add((int(m.group(2)), key))
    return {family: [k for _, k in sorted(keys)] for family, keys in sorted(found.items())}


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]


def _draw(ax: Any, lines: Sequence[Series], colors: Sequence[str]) -> None:
    for i, s in enumerate(lines):
        if not s.xs:
            continue
        sparse = len(s.xs) <= 40  # eval rows: few points, show each one
        ax.plot(s.xs, s.ys, label=s.label, color=colors[i % len(colors)], linewidth=1.4,
                marker="o" if sparse else None, markersize=3.5)
    finite = [y for s in lines for y in s.ys if math.isfinite(y) and y > 0]
    if finite and max(finite) / min(finite) > 300:  # grad norms, lr warmups: a wide range reads better in log
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens are whole numbers


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _colors() -> list[str]:
    from matplotlib import rcParams

    return list(rcParams["axes.prop_cycle"].by_key()["color"])


def line_plot(lines: Sequence[Series], title: str, xlabel: str = "step", ylabel: str = "") -> bytes:
    """One axes, one line per series (runs overlaid); returns PNG bytes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    _draw(ax, lines, _colors())
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def small_multiples(panels: Sequence[tuple[str, Sequence[Series]]], title: str, xlabel: str = "step") -> bytes:
    """A grid of axes (e.g. one per codebook), the same runs overlaid in each; returns PNG bytes."""
    from matplotlib.figure import Figure

    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = _colors()
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        name, lines = panels[i]
        _draw(ax, lines, colors)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0 and len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)


# ---------------------------------------------------------------- Markdown / HTML page


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def md_code(text: str, lang: str = "") -> str:
    """A fenced block that user text cannot close early: the fence is longer than any backtick run in it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}\n"


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def md_user(text: str) -> str:
    """User-written Markdown (notes) made safe to embed: a code fence it leaves open is closed,
    so it cannot swallow the rest of the page. (Raw HTML is off in the renderer anyway.)"""
    open_fence = None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if not m:
            continue
        fence, rest = m.group(1), m.group(2)
        if open_fence is None:
            if not (fence[0] == "`" and "`" in rest):  # a backtick fence's info string holds no backtick
                open_fence = fence
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence) and not rest.strip():
            open_fence = None
    return text.rstrip() + (f"\n{open_fence}\n" if open_fence else "\n")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
code { font-size: 0.92em; }
img { max-width: 100%; margin: 0.3em 0.6em 0.3em 0; border: 1px solid #eee; }
p > img { display: inline-block; width: calc(50% - 1.2em); min-width: 360px; }
h1 { border-bottom: 2px solid #333; }
h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
"""

_AUDIO_URI = re.compile(r"^data:audio/(wav|x-wav|wave|mpeg|ogg|flac);base64,", re.IGNORECASE)
_AUDIO_FILE = re.compile(r"\.(wav|mp3|ogg|flac)$", re.IGNORECASE)


def _markdown() -> Any:
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import escapeHtml

    md = MarkdownIt("js-default")  # CommonMark + tables, raw HTML off: user text is escaped
    default_validate = md.validateLink

    def validate(url: str) -> bool:  # also let inlined audio through (the default allows data:image only)
        return bool(_AUDIO_URI.match(url.strip())) or default_validate(url)

    md.validateLink = validate
    default_image = md.renderer.rules["image"]

    def image(tokens: Any, idx: int, options: Any, env: Any) -> str:
        # An "image" whose source is audio renders as a player: ![label](clip.wav)
        src = tokens[idx].attrGet("src") or ""
        if _AUDIO_URI.match(src) or _AUDIO_FILE.search(src):
            return f'<audio controls preload="none" src="{escapeHtml(src)}"></audio>'
        return default_image(tokens, idx, options, env)

    md.renderer.rules["image"] = image
    return md


def html_page(markdown_text: str, title: str) -> str:
    """A self-contained HTML page (no scripts, no external resources) from Markdown."""
    from html import escape

    body = _markdown().render(markdown_text)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )
