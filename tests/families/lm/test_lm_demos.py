"""lm demos and `scratchlab sample` with several prompts: one batched generation, each row as if alone."""

from __future__ import annotations

import re

import torch

from scratchlab.cli import main
from scratchlab.families.lm.sampler import generate
from scratchlab.families.registry import build_task
from scratchlab.runs.load import load_run

PROMPTS = ["def ", "import os\nclass Parser(", ""]


def test_sample_several_prompts_is_each_prompt_alone(record_runs, capsys):
    run = str(record_runs["a"])
    common = ["--temperature", "0", "--max-new-tokens", "12"]
    argv = ["sample", run, *[arg for p in PROMPTS for arg in ("--prompt", p)], *common]
    assert main(argv) == 0
    out = capsys.readouterr().out
    alone = []
    for prompt in PROMPTS:
        assert main(["sample", run, "--prompt", prompt, *common]) == 0
        alone.append(capsys.readouterr().out)
    expected = "".join(f"--- prompt {i + 1}/3: {p!r}\n{text}" for i, (p, text) in enumerate(zip(PROMPTS, alone)))
    assert out == expected
    assert len(set(alone)) == 3 and all(text.startswith(p) for p, text in zip(PROMPTS, alone))


def test_lm_demo_is_one_batch_whose_greedy_rows_equal_each_prompt_alone(record_runs, tmp_path, monkeypatch):
    loaded = load_run(record_runs["a"], None, "cpu", purpose="sample from")
    cfg = loaded.cfg
    cfg = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"prompts": PROMPTS, "temperatures": [0.0, 1.0]})})
    cfg, task = build_task(cfg)
    calls = []
    import scratchlab.families.lm.task as lm_task

    real = lm_task.generate_batch

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(lm_task, "generate_batch", counted)
    text = task.demo(loaded.model, 8, tmp_path, torch.device("cpu"), "fp32")
    assert calls == [len(PROMPTS) * 2]  # every prompt x temperature in one generation
    assert (tmp_path / "step_000008.txt").read_text() == text
    sections = re.split(r"\n## ", text)[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [
        f"prompt={p!r} temperature={t}" for p in PROMPTS for t in (0.0, 1.0)]
    tokenizer, eos_id = task.tokenizer, task.data.eos_id
    for prompt, section in zip(PROMPTS, sections[::2]):  # the greedy rows
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id]
        new = generate(loaded.model, ids, cfg.demo.max_new_tokens, temperature=0.0, eos_id=eos_id)
        assert section.split("\n", 1)[1] == prompt + tokenizer.decode(new) + "\n"
