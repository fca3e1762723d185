"""Is the hyperparameter rule's learning rate near the best one? Cells trained at the rule's LR times several
factors (a spec's `lr_scales`), compared per (size, budget): `python -m scaling lrcheck SPEC|RESULTS.csv`.

Porian et al. and model ladders check their LR rules this way at a ladder's ends; the verdict here is the one the
study asks for: the rule's LR (factor 1) is within a factor of 2 of the best factor tried. A best factor at the
edge of those tried says only that the optimum lies at or beyond it. Imports no torch."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path


def lr_check(rows: list[dict], loss: str = "loss", tolerance: float = 2.0) -> list[dict]:
    """Per (base recipe, size, budget) tried at two factors or more: loss by factor, the best factor, and whether
    the rule is within tolerance. A cell alone in its group (a study's other cells, read beside a check) says
    nothing of the LR and is left out. A cell trained more than once (its key in a repeat's CSV too) counts at the
    mean of its runs (`runs` says how many); the same run read twice (a row another sweep reused) counts once."""
    seen: dict[tuple, tuple] = {}
    for r in rows:
        if r.get(loss) in (None, "") or not math.isfinite(float(r[loss])):
            continue
        group = (r["recipe"].split("@lr")[0], int(r["size"]), r["budget"])
        run = (r.get("key") or id(r), r.get("wall_s"), r[loss])  # one training run, however many CSVs hold it
        seen[run] = (group, float(r.get("lr_scale") or 1.0), float(r[loss]))
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for group, scale, value in seen.values():
        groups[group][scale].append(value)
    out = []
    for (recipe, size, budget), runs in sorted(groups.items()):
        if len(runs) < 2:
            continue
        scales = sorted(runs)
        by_scale = {s: sum(runs[s]) / len(runs[s]) for s in scales}
        best = min(scales, key=lambda s: by_scale[s])
        out.append(
            {
                "recipe": recipe,
                "size": size,
                "budget": budget,
                "losses": by_scale,
                "runs": {s: len(runs[s]) for s in scales},
                "best_scale": best,
                "best_at_edge": len(scales) > 1 and best in (scales[0], scales[-1]),
                "rule_loss": by_scale.get(1.0),
                "rule_within": 1.0 in by_scale and 1 / tolerance <= best <= tolerance,
                "rule_excess": by_scale[1.0] - by_scale[best] if 1.0 in by_scale else None,
            }
        )
    return out


def describe(checks: list[dict], tolerance: float = 2.0) -> str:
    lines = []
    for c in checks:
        losses = ", ".join(
            f"x{s:g}: {v:.4f}" + (f" (mean of {c['runs'][s]} runs)" if c["runs"][s] > 1 else "")
            for s, v in c["losses"].items()
        )
        verdict = (
            f"the rule's LR is within {tolerance:g}x of the best tried"
            if c["rule_within"]
            else f"the best LR is {c['best_scale']:g}x the rule's: outside {tolerance:g}x"
        )
        edge = " (best at the edge of the factors tried)" if c["best_at_edge"] else ""
        excess = f"; the rule loses {c['rule_excess']:.4f} to the best" if c["rule_excess"] is not None else ""
        lines.append(f"{c['recipe']}, size {c['size']}, {c['budget']}: {losses}; {verdict}{edge}{excess}")
    return "\n".join(lines)


def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
