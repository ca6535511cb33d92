"""`scratchlab scaling plan`: what model and how many tokens a compute budget should buy.

The compute-optimal (N, D) comes from a published loss law (laws.py), the epochs and
advice from Muennighoff et al. 2023 when the data is smaller than D, and the concrete
shapes from the `lm` family (shapes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from scratchlab.config import ModelConfig
from scratchlab.errors import UserError
import scratchlab.scaling.laws as laws
from scratchlab.scaling.gpus import PEAK_BF16_FLOPS, flops_from_gpu_hours
from scratchlab.scaling.shapes import Shape, pick_shapes

MUENNIGHOFF = "Muennighoff et al. 2023, Scaling Data-Constrained Language Models, arXiv:2305.16264"


@dataclass
class DataConstrained:
    unique_tokens: float
    epochs: float  # of the compute-optimal plan
    effective_tokens: float  # what the plan's D is worth when repeated (D')
    loss_repeated: float  # the plan's predicted loss with repetition discounted
    n: float  # the data-constrained optimum
    d: float
    loss: float
    advice: str

    @property
    def epochs_optimum(self) -> float:
        return self.d / self.unique_tokens


@dataclass
class Plan:
    compute: float
    law: laws.LossLaw
    n: float
    d: float
    loss: float
    vocab_size: int
    seq_len: int
    shapes: list[Shape]
    alternatives: list[tuple[str, float, float, str]] = field(default_factory=list)
    gpu: str | None = None
    gpu_hours: float | None = None
    mfu: float | None = None
    data: DataConstrained | None = None

    @property
    def tokens_per_param(self) -> float:
        return self.d / self.n


def epoch_advice(epochs: float) -> str:
    """Muennighoff et al. 2023's findings, by the number of epochs over the unique data."""
    if epochs <= 1:
        return "enough unique data: no token needs to be seen twice"
    if epochs <= 4:
        return ("up to ~4 epochs of repeated data are nearly as good as new data (Muennighoff et al. 2023): "
                "train the plan as is")
    if epochs <= 16:
        return ("repeated tokens lose value beyond ~4 epochs: prefer the data-constrained allocation below "
                "(fewer parameters, more epochs) or find more data")
    return ("beyond ~16 epochs extra compute on repeated data is worth little (Muennighoff et al. 2023): "
            "get more data (their code-augmentation result: up to ~2x), or spend less compute")


def plan(
    compute: float | None = None,
    *,
    gpu_hours: float | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    tokens_available: float | None = None,
    law: str = laws.DEFAULT_LAW,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    base: ModelConfig | None = None,
) -> Plan:
    """The compute-optimal plan for ``compute`` FLOPs, or for ``gpu_hours`` of ``gpu`` at ``mfu``."""
    if (compute is None) == (gpu_hours is None):
        raise UserError("give exactly one budget: --flops C or --gpu-hours H (with --gpu and --mfu)")
    if gpu_hours is not None:
        compute = flops_from_gpu_hours(gpu_hours, gpu, mfu)
    assert compute is not None
    if vocab_size < 2:
        raise UserError(f"--vocab-size must be at least 2 (got {vocab_size})")
    chosen = laws.get_law(law)
    n, d = chosen.optimal(compute)
    alternatives = [(other.name, *other.optimal(compute), other.source)
                    for other in laws.LAWS.values() if other.name != chosen.name]
    alternatives.append((laws.APPROACH_1.name, *laws.APPROACH_1.optimal(compute), laws.APPROACH_1.source))
    result = Plan(compute, chosen, n, d, chosen.loss(n, d), vocab_size, seq_len,
                  pick_shapes(n, vocab_size, base, seq_len=seq_len), alternatives,
                  gpu if gpu_hours is not None else None, gpu_hours, mfu if gpu_hours is not None else None)
    if tokens_available is not None:
        if not tokens_available > 0:
            raise UserError(f"--tokens-available must be a positive number of tokens (got {tokens_available})")
        u = float(tokens_available)
        n_dc, d_dc = laws.data_constrained_optimum(chosen, compute, u)
        result.data = DataConstrained(
            unique_tokens=u,
            epochs=d / u,
            effective_tokens=laws.effective_tokens(d, u),
            loss_repeated=laws.data_constrained_loss(chosen, n, d, u),
            n=n_dc,
            d=d_dc,
            loss=laws.data_constrained_loss(chosen, n_dc, d_dc, u),
            advice=epoch_advice(d / u),
        )
    return result


def human(x: float) -> str:
    """1.4e12 -> '1.40T'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def render_plan(p: Plan, console: Console) -> None:
    head = Table(title="compute-optimal plan", show_header=False)
    budget = f"{p.compute:.3g} FLOPs"
    if p.gpu_hours is not None:
        peak = PEAK_BF16_FLOPS[p.gpu.lower()][0]
        budget += f"  ({p.gpu_hours:,.0f} {p.gpu} GPU-hours x {peak / 1e12:,.0f} TFLOP/s bf16 peak x MFU {p.mfu:.2f})"
    rows = [
        ("budget C", budget),
        ("parameters N (non-embedding)", human(p.n)),
        ("training tokens D", human(p.d)),
        ("tokens per parameter", f"{p.tokens_per_param:.1f}"),
        ("predicted loss", f"{p.loss:.3f} nats/token (on the fit's corpus and tokenizer; a relative guide only)"),
        ("law", f"L = {p.law.E:.4g} + {p.law.A:.5g}/N^{p.law.alpha:.4g} + {p.law.B:.6g}/D^{p.law.beta:.4g}, C = 6ND"),
        ("source", p.law.source),
    ]
    for label, value in rows:
        head.add_row(label, value)
    console.print(head)

    alt = Table(title="other published allocations at this budget")
    for col in ("allocation", "N", "D", "tokens/param", "source"):
        alt.add_column(col)
    for name, n, d, source in p.alternatives:
        alt.add_row(name, human(n), human(d), f"{d / n:.1f}", source)
    console.print(alt)

    if p.data is not None:
        dc = p.data
        t = Table(title="data-constrained (Muennighoff et al. 2023)", show_header=False)
        t.add_row("unique tokens available U", human(dc.unique_tokens))
        t.add_row("epochs of the plan", f"{dc.epochs:.2f}")
        if dc.epochs > 1:
            t.add_row("plan's D is worth (D')", f"{human(dc.effective_tokens)} unique-token equivalents "
                      f"({dc.effective_tokens / p.d:.0%}); predicted loss {dc.loss_repeated:.3f}")
            t.add_row("data-constrained optimum", f"N {human(dc.n)}, D {human(dc.d)} ({dc.epochs_optimum:.1f} epochs), "
                      f"predicted loss {dc.loss:.3f}")
        t.add_row("advice", dc.advice)
        t.add_row("formula", "D' = U + U R*(1 - exp(-R/R*)), R = D/U - 1, R* = 15.4; "
                  "N' likewise for parameters beyond what U supports, R_N* = 5.3")
        t.add_row("source", MUENNIGHOFF)
        console.print(t)

    s = Table(title=f"lm shapes with ~{human(p.n)} non-embedding params (vocab {p.vocab_size:,}, seq {p.seq_len})")
    for col in ("shape", "n_layers", "d_model", "n_heads", "ffn hidden", "non-emb params", "vs N", "total params",
                "GFLOP/token"):
        s.add_column(col, justify="right" if col != "shape" else "left")
    for sh in p.shapes:
        s.add_row(sh.label, str(sh.n_layers), str(sh.d_model), str(sh.n_heads), str(sh.ffn_hidden),
                  human(sh.non_embedding_params), f"{sh.error:+.1%}", human(sh.total_params),
                  f"{sh.flops_per_token / 1e9:.3g}")
    console.print(s)
    if p.shapes:
        first = p.shapes[min(1, len(p.shapes) - 1)]
        console.print("config overrides for the balanced shape: " + " ".join(first.overrides()), markup=False,
                      highlight=False)
