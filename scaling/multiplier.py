"""The compute multiplier: how many times less compute recipe `other` needs to reach the loss that `base` reaches
compute-optimally at compute C ("the same loss with Nx less compute").

Its bootstrap pairs the two recipes' resamples by index and keeps every one. A resample in which `other` never
reaches the target (the target lies below its E) has multiplier 0 ("never", `other` would need unbounded compute);
one in which `other` reaches it with less than C * e^-60 has multiplier +inf. Both sit in the interval's tails, so
when their share is large the interval is one-sided or unbounded, and says so, instead of narrowing.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

from scaling.conventions import CostModel
from scaling.fit import interval
from scaling.law import Law

SPAN = 60.0  # the search for the other recipe's compute spans C * e^-SPAN .. C * e^SPAN


def multiplier(base: Law, other: Law, C: float, cost: CostModel | None = None) -> tuple[float, str]:
    """(multiplier, why it is 0 or infinite; '' otherwise)."""
    target = float(base.frontier(C, cost))
    if not math.isfinite(target):
        return math.nan, "the base recipe's frontier is not finite at this compute"
    if target <= other.E:
        return 0.0, f"the target loss {target:.4g} lies below the other recipe's E = {other.E:.4g}: it never gets there"
    f = lambda logc: float(other.frontier(math.exp(logc), cost)) - target  # noqa: E731  decreasing in log C
    lo, hi = math.log(C) - SPAN, math.log(C) + SPAN
    if f(lo) <= 0:
        return math.inf, f"the other recipe reaches the target with less than C * e^-{SPAN:g}"
    if f(hi) > 0:
        return 0.0, f"the other recipe needs more than C * e^{SPAN:g} to reach the target"
    return C / math.exp(brentq(f, lo, hi, xtol=1e-12)), ""


def compute_multiplier(base: dict, other: dict, C: float, cost: CostModel | None = None, level: float = 0.95) -> dict:
    """The multiplier from two approach-3 fits, with its paired bootstrap interval."""
    value, why = multiplier(Law.from_fit(base), Law.from_fit(other), C, cost)
    out: dict = {"target_flops": C, "multiplier": value, "level": level}
    reasons = []
    out["from_converged_fits"] = bool(base.get("converged") and other.get("converged"))
    if not out["from_converged_fits"]:
        reasons.append("a fit it rests on did not converge")
    if why:
        reasons.append(why)
    out["caveat"] = "; ".join(reasons)
    pb, po = base.get("_samples", []), other.get("_samples", [])
    if len(pb) != len(po):
        raise ValueError(f"the recipes' bootstraps differ in length ({len(pb)} vs {len(po)}): they cannot be paired")
    if not pb:
        out.update(interval=None, bootstrap=0)
        return out
    values = np.array([multiplier(Law(**b), Law(**o), C, cost)[0] for b, o in zip(pb, po)])
    values = np.where(np.isnan(values), 0.0, values)  # a frontier that is not finite reaches nothing
    never, beyond = float(np.mean(values == 0)), float(np.mean(np.isinf(values)))
    lo, hi = interval(values, level)
    tail = (1 - level) / 2
    if never > tail and beyond > tail:
        kind = "unbounded"
    elif never > tail:
        kind = "upper bound only"
    elif beyond > tail:
        kind = "lower bound only"
    else:
        kind = "two-sided"
    out.update(interval=[lo, hi], interval_kind=kind, bootstrap=len(values), share_never=never, share_beyond=beyond)
    return out


def describe(m: dict) -> str:
    """One line for reports: the value (or why there is none), the interval and the tails' shares."""
    v = m["multiplier"]
    head = f"{v:.3g}x" if math.isfinite(v) and v > 0 else ("never reaches the target" if v == 0 else "undefined")
    if m.get("interval") is None:
        return head + (f" ({m['caveat']})" if m.get("caveat") else "")
    lo, hi = m["interval"]
    pct = f"{m['level']:.0%}"
    if m["interval_kind"] == "two-sided":
        ci = f"{pct} interval [{lo:.3g}, {hi:.3g}]"
    elif m["interval_kind"] == "upper bound only":
        ci = f"{pct} interval: at most {hi:.3g}x"
    elif m["interval_kind"] == "lower bound only":
        ci = f"{pct} interval: at least {lo:.3g}x"
    else:
        ci = f"{pct} interval unbounded on both sides"
    shares = f"{m['share_never']:.0%} of {m['bootstrap']} resamples never reach the target"
    caveat = f"; {m['caveat']}" if m.get("caveat") else ""
    return f"{head} ({ci}; {shares}{caveat})"
