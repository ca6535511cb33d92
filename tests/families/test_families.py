"""A new family is one folder and one registry line: docs/families.md's worked example, run as written.

The test executes the doc's Python block (so the doc cannot drift from what works), registers its
SPEC into a copy of the registry and trains it through the ordinary trainer, then samples from the run.
"""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from scratchlab.cli import main
from scratchlab.config import load_config
from scratchlab.families import registry
from scratchlab.runs.metrics import read_metrics
from scratchlab.sample import sample_run
from scratchlab.train import train

DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"


def example_family() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/families.md: the worked example is its one ```python block"
    module = types.ModuleType("scratchlab_doc_count_family")
    exec(compile(blocks[0], str(DOC), "exec"), module.__dict__)  # our own doc, not untrusted input
    return module


@pytest.fixture
def count_family(monkeypatch):
    family = example_family()
    monkeypatch.setattr(registry, "FAMILIES", {**registry.FAMILIES, family.SPEC.name: family.SPEC})
    return family


def test_the_worked_example_trains_two_steps_and_samples(count_family, tmp_path, capsys):
    cfg = load_config(None, ["model.family=count", "model.d_model=32", "train.seq_len=16", "train.batch_size=8",
                             "train.max_steps=2", "train.save_every=2", "train.log_every=1", "eval.every=2", "eval.batches=1",
                             "eval.batch_size=4", "demo.every=1000", "log.progress=lines",
                             f"train.out_dir={tmp_path}", "train.name=count"])
    result = train(cfg, console=Console(file=open(Path(tmp_path) / "console.txt", "w")))
    assert result.step == 2
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and abs(losses[0] - math.log(count_family.VOCAB)) < 0.5  # chance at step 1
    assert math.isfinite(result.val_loss)
    record = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert record["model"]["family"] == "count" and record["model"]["vocab_size"] == count_family.VOCAB
    assert "codec" not in record["model"] and "cascade" not in record["model"]  # other families' sections

    [line] = sample_run(result.run_dir, count_family.SampleRequest(prompt="3", max_new_tokens=4))
    assert [int(t) for t in line.split()][0] == 3 and len(line.split()) == 5
    assert main(["sample", str(result.run_dir), "--prompt", "5", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.split()[0] == "5"


def test_an_unregistered_family_is_one_line(tmp_path, capsys):
    assert main(["train", "model.family=count", f"train.out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == "error: unknown model.family 'count'; known: cascade, codec_lm, lm\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family, preset, sizes", [
    ("codec", "dia-tiny", ["model.codec.n_codebooks=4", "model.codec.codebook_size=16"]),
    ("cascade", "cascade-tiny", ["model.cascade.n_features=8"]),
])
@pytest.mark.parametrize("switch", ["model.value_embed=true", "model.moe.n_routed_experts=4", "model.attention=mla"])
def test_lm_only_block_switches_are_refused_by_the_other_families(family, preset, sizes, switch):
    """A switch the family's blocks cannot honour is one UserError naming it (was: ignored, or a ValueError traceback)."""
    from scratchlab.errors import UserError

    cfg = load_config(preset, [*sizes, switch])
    with pytest.raises(UserError, match=f"the {family} family uses dense MHA/GQA blocks; {switch.split('=')[0]}"):
        registry.build_model(cfg.model)
    registry.build_model(load_config(preset, sizes).model)  # the control: the preset itself builds


def test_lm_only_switch_on_a_codec_run_is_one_line_exit_2(tmp_path, capsys):
    code = main(["train", "dia-tiny", "model.value_embed=true", "train.max_steps=1", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: the codec family uses dense MHA/GQA blocks; model.value_embed is lm-only: remove it"]
