"""Published scaling laws: the loss surface L(N, D) = E + A/N^alpha + B/D^beta and C = 6 N D.

N is parameters, D training tokens, C training FLOPs (6 per parameter per token:
2 forward, 4 backward; Kaplan et al. 2020, Hoffmann et al. 2022 section 3). Minimising L
on C = 6ND has a closed form (Hoffmann et al. 2022, eq. 4):

    G = (alpha*A / (beta*B))^(1/(alpha+beta))
    N_opt = G (C/6)^(beta/(alpha+beta)),   D_opt = (C/6) / N_opt

The constant E does not move the optimum. The losses are in nats/token on the fit's own
corpus and tokenizer, so the predicted loss is a relative guide, not a number to expect on
other data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scratchlab.errors import UserError

FLOPS_PER_PARAM_TOKEN = 6.0


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, with where it comes from."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        """Exponent of N_opt in C: N_opt ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the loss at ``compute`` FLOPs under C = 6ND."""
        _check_compute(compute)
        n = self.G * (compute / FLOPS_PER_PARAM_TOKEN) ** self.a
        return n, compute / (FLOPS_PER_PARAM_TOKEN * n)

    def n_for_tokens(self, d: float) -> float:
        """The N whose compute-optimal D is ``d`` (Muennighoff et al.'s D_to_N)."""
        return self.G * (d * self.G) ** (self.beta / self.alpha)


@dataclass(frozen=True)
class PowerLawAllocation:
    """N_opt = G (C/6)^a, D_opt = (C/6) / N_opt: Hoffmann et al.'s approaches 1 and 2 (Table 2)."""

    name: str
    a: float
    G: float
    source: str

    def optimal(self, compute: float) -> tuple[float, float]:
        _check_compute(compute)
        n = self.G * (compute / FLOPS_PER_PARAM_TOKEN) ** self.a
        return n, compute / (FLOPS_PER_PARAM_TOKEN * n)


def _check_compute(compute: float) -> None:
    if not (compute > 0 and math.isfinite(compute)):
        raise UserError(f"compute budget must be a positive number of FLOPs (got {compute!r})")


# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv:2203.15556,
# eq. (10) / Appendix D.2 (approach 3, as printed in the paper).
HOFFMANN_2022 = LossLaw(
    "hoffmann2022", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
    source="Hoffmann et al. 2022 (Chinchilla), approach 3, eq. 10, arXiv:2203.15556",
)

# Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv:2404.10102: approach 3
# refit on data extracted from Hoffmann et al.'s Figure 4. Hoffmann's printed (rounded) estimates
# give ~93 tokens/param at Chinchilla's budget, inconsistent with their approaches 1 and 2 (~20);
# the refit agrees with them, which is why it is the default here.
BESIROGLU_2024 = LossLaw(
    "besiroglu2024", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="Besiroglu et al. 2024, Chinchilla approach-3 refit, arXiv:2404.10102",
)

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", arXiv:2305.16264: their C4 fit
# (github.com/huggingface/datablations README, "Parametric Fit": a, b, e are logs of A, B, E).
MUENNIGHOFF_2023 = LossLaw(
    "muennighoff2023", E=math.exp(0.6254804), A=math.exp(6.255414), B=math.exp(7.3049974),
    alpha=0.3526596, beta=0.3526596,
    source="Muennighoff et al. 2023, C4 fit, arXiv:2305.16264",
)

LAWS: dict[str, LossLaw] = {law.name: law for law in (BESIROGLU_2024, HOFFMANN_2022, MUENNIGHOFF_2023)}
DEFAULT_LAW = BESIROGLU_2024.name

# Hoffmann et al. 2022, Table 3 (approach 1): compute-optimal (params, FLOPs, tokens).
HOFFMANN_TABLE3 = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)


def _table3_allocation() -> PowerLawAllocation:
    # Approach 1 gives a = b = 0.50 (Table 2); G is the least-squares fit of log N - a log(C/6)
    # over Table 3's rows (about 20 tokens per parameter).
    a = 0.50
    logs = [math.log(n) - a * math.log(c / FLOPS_PER_PARAM_TOKEN) for n, c, _ in HOFFMANN_TABLE3]
    return PowerLawAllocation(
        "approach1", a=a, G=math.exp(sum(logs) / len(logs)),
        source="Hoffmann et al. 2022, approach 1 (Table 2: a = b = 0.50; G fitted to Table 3)",
    )


APPROACH_1 = _table3_allocation()


def get_law(name: str) -> LossLaw:
    try:
        return LAWS[name]
    except KeyError:
        raise UserError(f"unknown scaling law '{name}'; choose one of {', '.join(LAWS)}") from None


# ---------------------------------------------------------------- data-constrained (Muennighoff et al. 2023)

# Fitted decay constants: repeated tokens (R_D*) and excess parameters (R_N*) lose value
# exponentially with these "half-lives" (datablations README, Parametric Fit).
R_D_STAR = 15.387756
R_N_STAR = 5.309743


def effective_tokens(d: float, unique: float, r_star: float = R_D_STAR) -> float:
    """D' = U + U R* (1 - exp(-R/R*)), R = D/U - 1 repetitions: what D tokens over U unique ones are worth."""
    if d <= unique:
        return d
    r = d / unique - 1.0
    return unique + unique * r_star * (1.0 - math.exp(-r / r_star))


def effective_params(n: float, unique_tokens: float, law: LossLaw, r_star: float = R_N_STAR) -> float:
    """N' = U_N + U_N R_N* (1 - exp(-R_N/R_N*)): parameters beyond those the unique data can use are worth less."""
    u_n = min(n, law.n_for_tokens(unique_tokens))
    r = max(n / u_n - 1.0, 0.0)
    return u_n + u_n * r_star * (1.0 - math.exp(-r / r_star))


def data_constrained_loss(law: LossLaw, n: float, d: float, unique_tokens: float) -> float:
    """Muennighoff et al. 2023, eq. 5: the law with N' and D' in place of N and D."""
    n_eff = effective_params(n, unique_tokens, law)
    d_eff = effective_tokens(d, unique_tokens)
    return law.E + law.A / n_eff**law.alpha + law.B / d_eff**law.beta


def data_constrained_optimum(law: LossLaw, compute: float, unique_tokens: float, points: int = 2001) -> tuple[float, float]:
    """(N, D) minimising the data-constrained loss on C = 6ND (a log grid search, as the authors do)."""
    n_opt, _ = law.optimal(compute)
    best = (math.inf, n_opt, compute / (FLOPS_PER_PARAM_TOKEN * n_opt))
    for i in range(points):  # N from N_opt/1000 to N_opt*10
        n = n_opt * 10 ** (-3 + 4 * i / (points - 1))
        d = compute / (FLOPS_PER_PARAM_TOKEN * n)
        loss = data_constrained_loss(law, n, d, unique_tokens)
        if loss < best[0]:
            best = (loss, n, d)
    return best[1], best[2]
