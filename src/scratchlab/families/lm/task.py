"""The text LM family (`model.family: lm`): BPE token windows, next-token loss, bits per byte, text demos."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from scratchlab.config import Config
from scratchlab.data.text import TextData, load_tokenizer, open_text_data, prepare_stdlib
from scratchlab.data.windows import WindowDataset, get_batch, make_windows, window_starts
from scratchlab.doctor.findings import Finding
from scratchlab.doctor.preflight import preflight
from scratchlab.errors import UserError
from scratchlab.loss import IGNORE_INDEX, token_loss, z_loss
from scratchlab.runs.store import RunDir
from scratchlab.families.lm.sampler import generate_batch
from scratchlab.families.base import Batch, LossOutput, Task
from scratchlab.runtime import autocast
import scratchlab.families.lm.evaluate as lm_eval


def load_text_data(cfg: Config, announce=None) -> TextData:
    if cfg.data.path == "stdlib":
        return open_text_data(prepare_stdlib(cfg.data.vocab_size, cfg.data.max_mb, announce=announce))
    return open_text_data(cfg.data.path)


class LMTask(Task):
    family = "lm"

    def __init__(self, cfg: Config, announce=None) -> None:
        super().__init__(cfg, announce)
        self.data = load_text_data(cfg, announce)
        self._tokenizer = None
        self._byte_table: torch.Tensor | None = None  # bytes per token id on the eval device (bits per byte)
        if cfg.train.seq_len + 1 > len(self.data.val):
            raise UserError(
                f"train.seq_len ({cfg.train.seq_len}) needs at least seq_len+1 validation tokens, the data has "
                f"{len(self.data.val)}; lower train.seq_len or add data"
            )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.data.root / "tokenizer.json")
        return self._tokenizer

    # -- set-up

    def configure(self, cfg: Config) -> Config:
        """Set model.vocab_size from the data, or check that the configured one can hold it."""
        data = self.data
        if cfg.model.vocab_size is None:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": data.vocab_size})})
        elif cfg.model.vocab_size < data.vocab_size:
            raise UserError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's tokenizer vocabulary "
                f"({data.vocab_size}) in {data.root}: tokenizer/vocab mismatch; set model.vocab_size>={data.vocab_size} "
                "or remove it to use the data's"
            )
        self.cfg = cfg
        return cfg

    @property
    def tokens_per_sample(self) -> int:
        return self.cfg.train.seq_len

    def data_summary(self) -> str:
        s = self.data.meta["splits"]
        return f"{s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, vocab {self.data.vocab_size}"

    def write_assets(self, run: RunDir) -> None:
        shutil.copyfile(self.data.root / "tokenizer.json", run.tokenizer_file)
        run.write_json("data.json", {"path": str(self.data.root), **self.data.meta})

    # -- batches and the loss

    def train_batch(self, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> Batch:
        seq_len = self.cfg.train.seq_len
        starts = window_starts(len(self.data.train), seq_len, batch_size, "random", generator=generator)
        return make_windows(self.data.train, starts if rows is None else starts[rows], seq_len)

    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        labels = batch["labels"]
        with autocast(labels.device, precision):
            logits = model(batch["input_ids"])
        loss = token_loss(logits, labels)
        objective, logged = loss, {}
        coef = self.cfg.train.z_loss
        if coef > 0:
            z = z_loss(logits, labels)
            objective = loss + coef * z
            logged["z_loss"] = z.detach()
        return LossOutput(loss=loss, objective=objective, logged=logged, outputs=logits)

    def describe_batch(self, batch: Batch, n_samples: int = 2, n_ids: int = 24) -> str:
        tokenizer = self.tokenizer
        lines = [f"# the first training batch: {tuple(batch['input_ids'].shape)} (showing {n_samples} samples)"]
        for i in range(min(n_samples, len(batch["input_ids"]))):
            ids, labels = batch["input_ids"][i], batch["labels"][i]
            kept = labels != IGNORE_INDEX
            lines += [
                f"\n## sample {i}: {int(kept.sum())}/{labels.numel()} targets in the loss",
                f"input_ids[:{n_ids}] {ids[:n_ids].tolist()}",
                f"labels[:{n_ids}]    {labels[:n_ids].tolist()}",
                "--- input text ---",
                tokenizer.decode(ids.tolist(), skip_special_tokens=False),
                "--- target text (tokens in the loss) ---",
                tokenizer.decode(labels[kept].tolist(), skip_special_tokens=False),
            ]
        return "\n".join(lines) + "\n"

    # -- evaluation, demos, checks

    def val_batch(self, index: int) -> Batch:
        e = self.cfg.eval
        return get_batch(self.data.val, self.cfg.train.seq_len, e.batch_size, "fixed", batch_index=index,
                         count=e.batches * e.batch_size)

    def eval_sums(self, batch: Batch, out: LossOutput) -> dict:
        device = batch["labels"].device
        if self._byte_table is None or self._byte_table.device != device:
            self._byte_table = lm_eval.byte_table(self.data.token_bytes, device)
        return lm_eval.batch_sums(out.outputs, batch["labels"], self._byte_table)

    def eval_metrics(self, sums: dict[str, float], model: nn.Module, device: torch.device, precision: str) -> dict:
        return lm_eval.metrics(sums, model, lambda: self.val_batch(0), device, precision)

    def demo(self, model: nn.Module, step: int, out_dir: Path, device: torch.device, precision: str) -> str | None:
        """Every prompt x temperature continued together: one batched, KV-cached generation."""
        d, tokenizer = self.cfg.demo, self.tokenizer
        rows = [(prompt, temperature) for prompt in d.prompts for temperature in d.temperatures]
        # An empty prompt starts a new document (documents are separated by EOS in training).
        ids = [tokenizer.encode(prompt, add_special_tokens=False).ids or [self.data.eos_id] for prompt, _ in rows]
        generator = torch.Generator(device=device)
        generator.manual_seed(self.cfg.train.seed * 1_000_003 + step * 1009)  # reproducible per step
        new = []
        if rows:
            with autocast(device, precision):
                new = generate_batch(model, ids, d.max_new_tokens, temperature=[t for _, t in rows], top_k=d.top_k,
                                     top_p=d.top_p, eos_id=self.data.eos_id, generator=generator)
        lines = [f"# step {step}"]
        for (prompt, temperature), row in zip(rows, new):
            lines.append(f"\n## prompt={prompt!r} temperature={temperature}\n{prompt}{tokenizer.decode(row)}")
        text = "\n".join(lines) + "\n"
        (out_dir / f"step_{step:06d}.txt").write_text(text, encoding="utf-8")
        return text

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """Every generic check with the family loss (z-loss included), the training windows as the dataset."""
        cfg = self.cfg
        dataset = WindowDataset(self.data.train, cfg.train.seq_len, "random", seed=cfg.train.seed)
        return preflight(model, batch, loss=self.preflight_loss, dataset=dataset, overfit_steps=cfg.doctor.overfit_steps)
