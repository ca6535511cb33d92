"""The one eval loop (`families.base.evaluate_task`): the family loss on every fixed batch, val_loss the mean
over every target (not of batch means), the family's per-batch sums and finish hook, the model's mode restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchlab.config import build_config
from scratchlab.families.base import LossOutput, Task
from scratchlab.loss import IGNORE_INDEX, token_loss

V = 5
CPU = torch.device("cpu")


class Stub(Task):
    """Two fixed batches: 6 targets, then 2 (the rest ignored); the loss is the family's token_loss."""

    family = "stub"

    def __init__(self) -> None:
        super().__init__(build_config({"eval": {"batches": 2, "batch_size": 2}}))
        self.calls: list[bool] = []  # the model's training flag at each loss call

    def configure(self, cfg):
        return cfg

    tokens_per_sample = 4

    def data_summary(self) -> str:
        return "stub"

    def write_assets(self, run) -> None:
        pass

    def train_batch(self, batch_size, generator):
        return self.val_batch(0)

    def val_batch(self, index: int) -> dict:
        ids = torch.arange(8).reshape(2, 4) % V
        labels = (ids + 1) % V
        if index == 1:
            labels = labels.clone()
            labels[:, 1:] = IGNORE_INDEX
        else:
            labels[0, :1] = IGNORE_INDEX
            labels[1, :1] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def loss(self, model, batch, precision="fp32"):
        self.calls.append(model.training)
        logits = model(batch["input_ids"])
        loss = token_loss(logits, batch["labels"])
        return LossOutput(loss=loss, objective=loss, logged={"kept": float((batch["labels"] != IGNORE_INDEX).sum())},
                          outputs=logits)

    def eval_sums(self, batch, out):
        return {"kept": out.logged["kept"], "max_logit": out.outputs.abs().amax()}  # a float and a tensor

    def eval_metrics(self, sums, model, device, precision):
        return {"val_kept": sums["kept"], "val_max_logit_sum": sums["max_logit"]}


class Biased(nn.Module):
    """Logits that prefer token i+1 by a margin that depends on i, with dropout (off in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        return self.drop(self.table[ids])


def test_val_loss_is_the_mean_over_every_target_and_the_family_adds_its_figures():
    task, model = Stub(), Biased().train()
    row = task.evaluate(model, CPU, "fp32")
    assert model.training and task.calls == [False, False]  # eval mode during the loop, restored after
    per_target = []
    with torch.no_grad():
        for i in range(2):
            b = task.val_batch(i)
            losses = token_loss(model.table[b["input_ids"]], b["labels"], reduction="none")
            per_target += losses[b["labels"].reshape(-1) != IGNORE_INDEX].tolist()
    assert len(per_target) == 8
    assert row["val_loss"] == pytest.approx(sum(per_target) / 8, rel=1e-6)
    batch_means = (sum(per_target[:6]) / 6 + sum(per_target[6:]) / 2) / 2
    assert abs(row["val_loss"] - batch_means) > 1e-3  # not a mean of batch means
    assert list(row) == ["val_loss", "val_kept", "val_max_logit_sum"]
    assert row["val_kept"] == 8.0 and isinstance(row["val_max_logit_sum"], float)
    assert row["val_max_logit_sum"] == pytest.approx(2 * float(model.table.detach()[torch.arange(8) % V].abs().max()))


class MeanOfMeans(Stub):
    def eval_targets(self, batch):
        return 1.0  # every batch weighs the same (the cascade's weighting)


class Pooled(Stub):
    def eval_metrics(self, sums, model, device, precision):
        return {"val_loss": -1.0}  # pooled its own way (the codec's per-codebook means)


def test_a_family_can_weight_batches_equally_or_pool_val_loss_its_own_way():
    model = Biased()
    direct = []
    with torch.no_grad():
        model.eval()
        for i in range(2):
            b = Stub().val_batch(i)
            direct.append(float(token_loss(model(b["input_ids"]), b["labels"])))
    assert MeanOfMeans().evaluate(model, CPU, "fp32")["val_loss"] == pytest.approx(sum(direct) / 2, rel=1e-6)
    assert Pooled().evaluate(model, CPU, "fp32")["val_loss"] == -1.0
