"""`scratchlab report`: the research-log page of one run, on real tiny runs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import wave

import numpy as np
import pytest
from PIL import Image

from scratchlab.cli import main
from scratchlab.doctor.findings import CATALOG
from scratchlab.errors import UserError
from scratchlab.runs import read_metrics
from scratchlab.runs.index import add_note
from scratchlab.runs.report import write_report

EVIL = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


@pytest.fixture
def run(tmp_path, record_runs):
    """A copy of a finished run with a note, a codec code file and a short audio clip among its demos."""
    run = shutil.copytree(record_runs["a"], tmp_path / "run")
    add_note(run, f"hypothesis: lr 3e-3 beats 1e-3 {EVIL}")
    np.save(run / "demos" / "step_000008_codes.npy", np.zeros((2, 50), dtype=np.int16))
    with wave.open(str(run / "demos" / "step_000008.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(800, dtype=np.int16).tobytes())
    return run


def _images(html):
    return re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)


def test_html_report_content(run):
    out = write_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    # User text is escaped: no live tag from the note, its text still shown.
    assert "<script" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in html
    assert "hypothesis: lr 3e-3 beats 1e-3" in html
    for section in ("Notes", "Final figures", "Curves", "Doctor findings", "Demo samples over training",
                    "Resolved config", "Environment"):
        assert f"<h2>{section}</h2>" in html
    rows = read_metrics(run / "metrics.jsonl")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert f"<td>final val loss (nats/token)</td>\n<td>{vals[-1]:.4f}</td>" in html
    assert f"<td>best val loss</td>\n<td>{min(vals):.4f} (step" in html
    assert "lr: 0.003" in html and "0123456789abcdef" in html  # resolved config, pinned commit
    # Curves are inlined PNGs that decode.
    images = _images(html)
    assert len(images) >= 5
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.size[0] > 300
    # Demo samples over training, the code file listed with its shape, the audio as a player.
    assert "step 000004" in html and "step 000008" in html
    from markdown_it.common.utils import escapeHtml

    for step in (4, 8):  # each sample, verbatim (escaped) in a code block
        demo = (run / "demos" / f"step_{step:06d}.txt").read_text()
        assert "## prompt='def ' temperature=0.0" in demo and escapeHtml(demo.rstrip()) in html
    assert "demos/step_000008_codes.npy" in html and "2x50" in html and "int16" in html
    assert re.search(r'<audio controls preload="none" src="data:audio/wav;base64,UklGR', html)  # "RIFF"


def test_crashed_run_report_shows_the_finding_and_its_fix(record_runs, tmp_path):
    html = write_report(record_runs["crashed"], tmp_path / "crashed.html").read_text()
    assert "<td>status</td>\n<td>crashed: RuntimeError: simulated crash in eval</td>" in html
    assert "<code>run_crashed</code>" in html
    from markdown_it import MarkdownIt

    assert MarkdownIt("js-default").renderInline(CATALOG["run_crashed"].fix) in html  # the catalog's fix, as written


def test_markdown_report_with_image_files(run, tmp_path):
    out = write_report(run, tmp_path / "log" / "report.md")
    text = out.read_text()
    assert EVIL in text  # Markdown keeps the user's text as written
    pngs = sorted(p.name for p in (tmp_path / "log" / "report_files").glob("*.png"))
    assert "loss.png" in pngs and "lr.png" in pngs
    assert all(f"](report_files/{p})" in text for p in pngs)
    assert "](../run/demos/step_000008.wav)" in text  # audio linked relative to the report, not inlined


def test_notes_survive_markdown_tricks(tmp_path, record_runs):
    run = shutil.copytree(record_runs["b"], tmp_path / "r")
    add_note(run, "```\nfence closed early\n[click](javascript:alert(1))")
    html = write_report(run).read_text()
    assert 'href="javascript' not in html
    assert "<h2>Resolved config</h2>" in html  # the note's fence did not swallow the rest of the page


def test_bad_output_name(run):
    with pytest.raises(UserError, match=r"\.html or \.md"):
        write_report(run, run / "report.pdf")


def test_cli_report(run, tmp_path, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path)]) == 2


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    html = write_report(run).read_text()
    n_images = len(_images(html))
    # A copy with a probe: after load, write each image's decoded width into the DOM for --dump-dom.
    probe = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre');"
             "p.id = 'probe'; p.textContent = JSON.stringify([...document.images].map(i => "
             "[i.complete, i.naturalWidth, i.naturalHeight])); document.body.appendChild(p); });</script>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, "the probe did not run: the page did not load"
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(sizes) == n_images >= 5
    assert all(done and w > 300 and h > 200 for done, w, h in sizes)  # every plot decoded

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1800", f"--screenshot={shot}", (run / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (pixels.min(axis=1) < 200).mean() > 0.01  # text, tables and plots, not a blank page
    blue = (np.abs(pixels.astype(int) - (31, 119, 180)).sum(axis=1) < 30).sum()
    assert blue > 200  # matplotlib's first line colour: the curves are on screen
