"""Bad input gets one clear `error: ...` line on stderr and exit code 2, never a traceback.

Each test drives the real CLI in-process (`scratchlab.cli.main`) with one kind of bad
input: config typos and types, missing or empty data, corrupt or truncated checkpoints,
tokenizer/vocab mismatches. `--debug` must let the `UserError` propagate instead.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from scratchlab.cli import main
from scratchlab.data.text import prepare_text
from scratchlab.errors import EXIT_USER_ERROR, UserError

WORDS = "the a model token train data loss step layer head batch value sample text run byte merge".split()


def synthetic_docs(n_docs: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 12))) + "." for _ in range(20)) for _ in range(n_docs)
    ]


def tiny_train_args(data_dir: Path, out_dir: Path) -> list[str]:
    """Overrides for a 1-layer model that trains 4 steps in well under a second."""
    return [
        f"data.path={data_dir}", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=64",
        "train.seq_len=32", "train.batch_size=4", "train.max_steps=4", "train.save_every=2", "eval.every=2",
        "eval.batches=1", "eval.batch_size=2", "demo.every=4", "demo.max_new_tokens=4", f"train.out_dir={out_dir}",
        "train.precision=fp32", "train.device=cpu", "log.progress=lines",
    ]  # fmt: skip


def user_error(capsys, *argv: str) -> str:
    """Run the CLI, check the one-line error contract, and return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A prepared data dir (BPE vocab 300) and one finished 4-step run, shared by the module."""
    root = tmp_path_factory.mktemp("errors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHLAB_CACHE", str(root / "cache"))
        data = prepare_text(synthetic_docs(), root / "data", vocab_size=300)
        assert main(["train", *tiny_train_args(data, root / "runs")]) == 0
    (run,) = (root / "runs").iterdir()
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    return {"data": data, "run": run, "vocab": vocab}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def run_copy(env, tmp_path) -> Path:
    return Path(shutil.copytree(env["run"], tmp_path / "run"))


# ---------------------------------------------------------------- data


def test_missing_data_path(env, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    line = user_error(capsys, "train", *tiny_train_args(env["data"], tmp_path / "runs"), f"data.path={missing}")
    assert f"data path {missing} does not exist" in line
    assert "scratchlab data text" in line
    assert not (tmp_path / "runs").exists()  # nothing was created for a run that never started


def test_data_text_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = user_error(capsys, "data", "text", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert str(tmp_path / "empty") in line and "no text documents" in line
    assert not (tmp_path / "out").exists()


def test_data_text_binary_files_only(tmp_path, capsys):
    src = tmp_path / "bin"
    src.mkdir()
    for i in range(3):
        (src / f"blob{i}.dat").write_bytes(bytes(range(128, 256)) * 8)  # never valid UTF-8
    line = user_error(capsys, "data", "text", str(src), "--out", str(tmp_path / "out"))
    assert str(src) in line and "no text documents" in line and "binary" in line


# ---------------------------------------------------------------- config


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 4\n  seq_len: 32: 64\n")
    line = user_error(capsys, "train", str(bad))
    assert str(bad) in line and "invalid YAML" in line
    assert "line 3," in line


def test_unknown_key_did_you_mean(capsys):
    line = user_error(capsys, "train", "optim.lrr=1e-3")
    assert "'optim.lrr'" in line and "did you mean 'optim.lr'?" in line


def test_unknown_section_did_you_mean(capsys):
    line = user_error(capsys, "config", "show", "tiny-lm", "modle.n_layers=2")
    assert "'modle'" in line and "did you mean 'model'?" in line


def test_wrong_type_names_field(capsys):
    line = user_error(capsys, "config", "show", "tiny-lm", "train.batch_size=abc")
    assert "'train.batch_size'" in line and "integer" in line and "'abc'" in line


def test_seq_len_above_max_seq_len(capsys):
    line = user_error(capsys, "config", "show", "tiny-lm", "train.seq_len=128", "model.max_seq_len=64")
    assert "train.seq_len (128)" in line and "model.max_seq_len (64)" in line


def test_unknown_preset_did_you_mean(capsys):
    line = user_error(capsys, "train", "tiny-ml")
    assert "'tiny-ml'" in line and "did you mean 'tiny-lm'?" in line


# ---------------------------------------------------------------- checkpoints


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x13\x37not a safetensors file" * 64)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_garbage, _truncate], ids=["garbage", "truncated"])
@pytest.mark.parametrize("command", ["sample", "resume"])
def test_damaged_checkpoint(run_copy, damage, command, capsys):
    files = sorted(run_copy.glob("checkpoints/*/model.safetensors"))
    assert {f.parent.name for f in files} == {"best", "step_000002", "step_000004"}
    for file in files:  # sample reads best, resume reads the latest step
        damage(file)
    argv = ["sample", str(run_copy), "--prompt", "x"] if command == "sample" else ["train", "--resume", str(run_copy)]
    line = user_error(capsys, *argv)
    expected = "best" if command == "sample" else "step_000004"
    assert f"{expected}/model.safetensors" in line and "corrupt or truncated" in line


# ---------------------------------------------------------------- tokenizer / vocab


def test_resume_with_vocab_smaller_than_data(env, run_copy, capsys):
    small = env["vocab"] - 1
    line = user_error(capsys, "train", "--resume", str(run_copy), f"model.vocab_size={small}")
    assert f"model.vocab_size ({small})" in line and f"vocabulary ({env['vocab']})" in line
    assert "tokenizer/vocab mismatch" in line


def test_resume_with_vocab_larger_than_checkpoint(env, run_copy, capsys):
    line = user_error(capsys, "train", "--resume", str(run_copy), f"model.vocab_size={env['vocab'] + 50}")
    assert "step_000004/model.safetensors does not match the model" in line and "vocab" in line


def test_failed_resume_leaves_run_usable(env, run_copy, capsys):
    config = (run_copy / "config.yaml").read_text()
    user_error(capsys, "train", "--resume", str(run_copy), f"model.vocab_size={env['vocab'] + 50}")
    assert (run_copy / "config.yaml").read_text() == config


def test_new_run_with_vocab_smaller_than_data(env, tmp_path, capsys):
    assert env["vocab"] == 300
    line = user_error(capsys, "train", *tiny_train_args(env["data"], tmp_path / "runs"), "model.vocab_size=100")
    assert "model.vocab_size (100)" in line and "vocabulary (300)" in line and "model.vocab_size>=300" in line


@pytest.mark.parametrize(
    "options",
    [["--prompt", "x", "--max-new-tokens", "0"], ["--prompt", "x " * 100],
     ["--prompt", "x", "--top-p", "0"], ["--prompt", "x", "--top-k", "-1"]],
    ids=["zero-new-tokens", "prompt-too-long", "top-p-0", "top-k-negative"],
)  # fmt: skip
def test_bad_sample_options(env, options, capsys):
    user_error(capsys, "sample", str(env["run"]), *options)


def test_empty_prompt_starts_a_new_document(env, capsys):
    assert main(["sample", str(env["run"]), "--prompt", "", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- --debug


def test_debug_reraises(capsys):
    with pytest.raises(UserError, match="did you mean 'tiny-lm'"):
        main(["--debug", "train", "tiny-ml"])
    assert capsys.readouterr().err == ""
