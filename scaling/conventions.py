"""What C and N mean in a fit. Small models are where these choices move exponents, so they are named in every
output rather than assumed.

FLOPs: `6n` is 6 x the matmul parameters per token (Kaplan, Chinchilla); `6n+attn` adds attention's score and
value matmuls at the trained context, 12 * layers * d_attn * T per token (PaLM's count; the model's own
`model.counting.flops_per_token`). At depth 2 to 8 with a 2,048 context the attention term is 0.6x to 1.1x of 6N,
so a 6N budget gives the smallest models up to twice the real compute of the largest.

Parameters: `params` is the N of 6N (matmul parameters: non-embedding plus a tied head), `params_total` counts
the input embeddings too, `params_non_embedding` leaves a tied head out (Kaplan's N).

The cost model links the two: the runs' FLOPs per token, fitted as k * N^p in log-log space (k = 6, p = 1 exactly
under 6N with N = params), so that compute-optimal allocations and multipliers solve C = k N^p D, the convention the
budgets were planned in, rather than C = 6ND.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FLOPS = {  # convention -> (results.csv column, description)
    "6n": ("flops_6n", "6N per token (N: matmul parameters)"),
    "6n+attn": ("flops_6n_attn", "6N + 12 * layers * d_attn * T per token (attention at the trained context)"),
}
PARAMS = {  # column -> description
    "params": "matmul parameters, the N of 6N (non-embedding plus a tied output head)",
    "params_total": "all parameters, input embeddings included",
    "params_non_embedding": "non-embedding parameters (a tied head left out)",
}


class ConventionError(ValueError):
    """A FLOP or parameter convention that the CSV cannot supply or the fitter does not know."""


def flops_column(convention: str | None, columns: list[str], csv_convention: str | None = None) -> tuple[str, str]:
    """(column to read, description) for a FLOP convention; None: the CSV's `flops` column, else 6ND computed."""
    if convention is None:
        if "flops" in columns:
            return "flops", FLOPS[csv_convention][1] if csv_convention in FLOPS else "as given in column 'flops'"
        return "", FLOPS["6n"][1] + ", computed as 6ND (the CSV has no 'flops' column)"
    if convention in FLOPS:
        column, text = FLOPS[convention]
        if column in columns:
            return column, text
        if "flops" in columns and csv_convention == convention:
            return "flops", text
        if convention == "6n":
            return "", text + ", computed as 6ND"
        raise ConventionError(f"FLOP convention '{convention}' needs a '{column}' column; the CSV has {columns}")
    if convention in columns:
        return convention, f"as given in column '{convention}'"
    raise ConventionError(
        f"unknown FLOP convention '{convention}': use one of {sorted(FLOPS)} or a column of the CSV ({columns})"
    )


def params_column(name: str, columns: list[str]) -> str:
    """A description of the N convention; a name that is neither known nor a column is refused."""
    if name not in columns:
        known = f"known conventions: {sorted(PARAMS)}"
        raise ConventionError(f"parameter convention '{name}' is not a column of the CSV ({columns}); {known}")
    return PARAMS.get(name, f"as given in column '{name}'")


@dataclass
class CostModel:
    """FLOPs per token as k * N^p: C = k N^p D."""

    k: float = 6.0
    p: float = 1.0
    max_rel_error: float = 0.0  # of the fitted k N^p against the runs' own FLOPs per token

    @classmethod
    def fit(cls, N: np.ndarray, flops_per_token: np.ndarray) -> CostModel:
        logN, logF = np.log(N), np.log(flops_per_token)
        if len(set(np.round(logN, 9))) < 2:
            p, logk = 1.0, float(np.mean(logF - logN))
        else:
            p, logk = np.polyfit(logN, logF, 1)
        model = cls(float(np.exp(logk)), float(p))
        model.max_rel_error = float(np.max(np.abs(model.per_token(N) / flops_per_token - 1)))
        return model

    def per_token(self, N):
        return self.k * np.power(N, self.p)

    def tokens(self, C, N):
        return np.asarray(C) / self.per_token(N)

    def as_dict(self) -> dict:
        return asdict(self)
