"""`scratchlab scaling sweep`: the IsoFLOP sweep configs a scaling fit needs.

For each compute budget C, several model sizes around the law's N_opt(C) (log-spaced, by
default N_opt/4 ... 4 N_opt), each an `lm` shape from shapes.py near the base config's
width/depth ratio, with ``train.max_steps`` set so that 6 N D = C (N = the shape's
non-embedding params, D = steps x tokens per step). Every file is a complete config:
``scratchlab train FILE.yaml``, or ``scratchlab sweep DIR`` for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from scratchlab.config import Config, build_config, deep_merge, load_config, to_yaml
from scratchlab.errors import UserError
import scratchlab.scaling.laws as laws
from scratchlab.scaling.plan import human
from scratchlab.scaling.shapes import Shape, candidate_shapes


@dataclass
class IsoFlopRun:
    path: Path
    compute: float  # the budget asked for
    actual_compute: float  # 6 N D with the rounded step count
    shape: Shape
    max_steps: int
    tokens: int


def _budget_tag(c: float) -> str:
    return f"{c:.2g}".replace("e+", "e")


def _nearest_shape(n_target: float, vocab: int, cfg: Config, aspect: float, seen: set[tuple[int, int]]) -> Shape | None:
    # The step count absorbs a size mismatch (6ND = C holds for the actual N), so a wide tolerance is fine;
    # what matters is a sensible depth for the width. One-layer models are left out.
    # Shapes already used at this budget are left out, so small budgets on a coarse grid still get distinct sizes.
    for tolerance in (0.3, 0.6):  # the grid of tiny models is coarse
        pool = [s for s in candidate_shapes(n_target, vocab, cfg.model, tolerance, seq_len=cfg.train.seq_len)
                if s.n_layers >= 2 and (s.n_layers, s.d_model) not in seen]
        if pool:
            return min(pool, key=lambda s: abs(math.log(s.aspect / aspect)) + 3 * abs(s.error))
    return None


def isoflop_sweep(
    flops: list[float],
    out_dir: str | Path,
    base: str = "tiny-lm",
    overrides: list[str] | None = None,
    sizes: int = 5,
    spread: float = 4.0,
    law: str = laws.DEFAULT_LAW,
) -> list[IsoFlopRun]:
    """Write ``sizes`` configs per budget in ``flops`` to ``out_dir``; returns what was written."""
    if not flops:
        raise UserError("give at least one budget: --flops 1e15,3e15,1e16")
    if sizes < 1 or spread < 1:
        raise UserError(f"--sizes must be >= 1 and --spread >= 1 (got {sizes}, {spread})")
    cfg = load_config(base, overrides)
    chosen = laws.get_law(law)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size  # only an untied head makes N depend on it
    aspect = cfg.model.d_model / cfg.model.n_layers
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[IsoFlopRun] = []
    for c in flops:
        n_opt, _ = chosen.optimal(c)
        targets = [n_opt * spread ** (2 * i / (sizes - 1) - 1) for i in range(sizes)] if sizes > 1 else [n_opt]
        seen: set[tuple[int, int]] = set()
        for n_target in targets:
            shape = _nearest_shape(n_target, vocab, cfg, aspect, seen)
            if shape is None:
                continue  # no unused lm shape near this size
            seen.add((shape.n_layers, shape.d_model))
            steps = round(c / (laws.FLOPS_PER_PARAM_TOKEN * shape.non_embedding_params * tokens_per_step))
            if steps < 1:
                continue
            name = f"isoflop-{_budget_tag(c)}-n{human(shape.non_embedding_params)}"
            raw = deep_merge(cfg.model_dump(mode="json"), {
                "model": {"n_layers": shape.n_layers, "d_model": shape.d_model, "n_heads": shape.n_heads,
                          "n_kv_heads": None},
                "train": {"max_steps": steps, "name": name},
                # a warmup longer than the run would never reach the peak learning rate
                "optim": {"warmup_steps": min(cfg.optim.warmup_steps, steps // 5)},
            })
            run_cfg = build_config(raw)
            path = out / f"{name}.yaml"
            tokens = steps * tokens_per_step
            n = shape.non_embedding_params
            path.write_text(f"# IsoFLOP sweep: budget C = {c:.3g} FLOPs, N = {n:,} non-embedding params, "
                            f"D = {tokens:,} tokens (6ND = {6 * n * tokens:.3g})\n" + to_yaml(run_cfg))
            written.append(IsoFlopRun(path, c, 6.0 * shape.non_embedding_params * tokens, shape, steps, tokens))
    if not written:
        raise UserError("no config fits these budgets: every size was below one step; raise --flops")
    return written
