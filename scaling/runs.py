"""Reading a CSV of runs for the fitter: N, D, C and loss columns as arrays, every value checked."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from scaling.conventions import ConventionError, CostModel, flops_column, params_column


class FitError(ValueError):
    """Data that cannot support the fit asked for; the message says what is missing."""


def _column(rows: list[dict], col: str, where: list[str]) -> np.ndarray:
    try:
        values = np.array([float(r[col]) for r in rows])
    except ValueError as e:
        raise FitError(f"column '{col}' holds a value that is not a number: {e}") from e
    bad = np.flatnonzero(~(values > 0) | ~np.isfinite(values))
    if len(bad):
        raise FitError(f"column '{col}' must be positive and finite; {where[bad[0]]} holds {values[bad[0]]}")
    return values


def read_runs(
    path: str | Path | list,
    loss_cols: list[str],
    recipe_col: str | None = None,
    params_col: str = "params",
    flops: str | None = None,
) -> dict:
    """Arrays `params` (N in the chosen convention), `tokens`, `flops` (C in the chosen convention), each loss
    column and `recipe`; `conventions` says what N and C mean and holds the cost model C = k N^p D. `path` may be
    several CSVs (the same design run twice, say): their rows are read as one set, a cell in two of them twice."""
    rows, where = [], []
    for one in [path] if isinstance(path, str | Path) else path:
        with open(one, newline="") as f:
            mine = list(csv.DictReader(f))
        if not mine:
            raise FitError(f"{one} has no rows")
        columns = list(mine[0])
        missing = [c for c in ["tokens", *loss_cols] + ([recipe_col] if recipe_col else []) if c not in columns]
        if missing:
            raise FitError(f"{one} lacks the column(s) {missing}; it has {columns}")
        rows += mine
        where += [f"{one} row {i + 2}" for i in range(len(mine))]
    columns = [c for c in rows[0] if all(c in r for r in rows)]
    csv_conventions = {r.get("flops_convention") for r in rows} - {None, ""}
    if len(csv_conventions) > 1:
        raise FitError(f"{path} mixes FLOP conventions {sorted(csv_conventions)} in one 'flops' column")
    try:
        params_text = params_column(params_col, columns)
        flops_col, flops_text = flops_column(flops, columns, next(iter(csv_conventions), None))
    except ConventionError as e:
        raise FitError(str(e)) from e
    out: dict = {"params": _column(rows, params_col, where), "tokens": _column(rows, "tokens", where)}
    for col in loss_cols:
        out[col] = _column(rows, col, where)
    out["flops"] = _column(rows, flops_col, where) if flops_col else 6 * out["params"] * out["tokens"]
    if recipe_col:
        out["recipe"] = np.array([r[recipe_col] for r in rows])
    cost = CostModel.fit(out["params"], out["flops"] / out["tokens"])
    out["conventions"] = {
        "params": {"column": params_col, "meaning": params_text},
        "flops": {"column": flops_col or "6 * params * tokens", "meaning": flops_text, "cost_model": cost.as_dict()},
    }
    out["cost"] = cost
    return out


def budgets(flops: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
    """Group runs into FLOP budgets: values within rel_tol of each other share one (their geometric mean)."""
    order = np.argsort(flops)
    labels = np.empty(len(flops))
    group = [order[0]]
    for i in order[1:]:
        if flops[i] <= flops[group[0]] * (1 + rel_tol):
            group.append(i)
        else:
            labels[group] = np.exp(np.mean(np.log(flops[group])))
            group = [i]
    labels[group] = np.exp(np.mean(np.log(flops[group])))
    return labels
