"""The accuracy–thought-tokens frontier of a thought-compression study, from `rl_report.py`'s JSON: the start, each
length-term strength's held-out curve over RL steps (pooled over seeds, 95% intervals), the cut baselines, and
routing by task (no thought for the tasks the compressed models stopped thinking on, the start's whole chain for the
rest: what a model gets with no training if it knows which tasks need thoughts).

    python benchmarks/rl_frontier.py docs/rl/gpu/curves.json --png docs/rl/gpu/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.reasoning import wilson


def route_by_task(report: dict, alpha: str) -> dict:
    """Accuracy and mean thought tokens of routing by task at one strength's final lengths: a task its per-task cut
    closed at once (budget 0) scores what that cut scored, the others what the start's whole chains scored."""
    cut, start = report["cut_baseline_per_task"][alpha], report["start"]
    tasks = list(cut["budget"])
    acc = [cut["per_task_accuracy"][t] if cut["budget"][t] == 0 else start["per_task"][t]["accuracy"] for t in tasks]
    tokens = [0.0 if cut["budget"][t] == 0 else start["per_task"][t]["thought_tokens"] for t in tasks]
    mean = sum(acc) / len(acc)
    return {"accuracy": mean, "accuracy_95": wilson(mean, start["items"]), "thought_tokens": sum(tokens) / len(tokens)}


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))

    def point(x, label, marker, color):
        lo, hi = x["accuracy_95"]
        err = [[x["accuracy"] - lo], [hi - x["accuracy"]]]
        ax.errorbar(x["thought_tokens"], x["accuracy"], yerr=err, fmt=marker, color=color, label=label, capsize=3)

    point(report["start"], "start (Thinking)", "o", "black")
    for i, (alpha, curve) in enumerate(report["curves"].items()):
        steps = sorted(curve["heldout"], key=int)
        xs = [curve["heldout"][s]["thought_tokens"] for s in steps]
        ys = [curve["heldout"][s]["accuracy"] for s in steps]
        ax.plot(xs, ys, "-", color=f"C{i}", alpha=0.4)
        point(curve["heldout"][steps[-1]], f"alpha {alpha}, step {steps[-1]}", "s", f"C{i}")
    for cut in report["cut_baseline"]:
        point(cut, f"start cut at {cut['budget']}", "v", "grey")
    for alpha in report.get("cut_baseline_per_task", {}):
        point(report["cut_baseline_per_task"][alpha], f"start cut per task (alpha {alpha})", "^", "grey")
        point(route_by_task(report, alpha), f"routing by task (alpha {alpha})", "D", "green")
    blind = report["blind_majority_answer"]["accuracy"]
    ax.axhline(blind, color="red", linestyle=":", label="blind: majority answer")
    ax.set_xlabel("mean thought tokens per held-out answer")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    report = json.loads(args.report.read_text())
    for alpha in report.get("cut_baseline_per_task", {}):
        r = route_by_task(report, alpha)
        lo, hi = r["accuracy_95"]
        print(
            f"routing by task at alpha {alpha}'s lengths: {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], "
            f"{r['thought_tokens']:.1f} thought tokens"
        )
    if args.png:
        plot(report, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
