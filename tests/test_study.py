"""docs/study/run3/STUDY.md (the third run's record) cannot drift from its data: the committed results CSV is
refitted with the repo's fitter, and the document's fit table, cell-by-cell comparison and GPU-time figures are
what the CSV gives."""

from __future__ import annotations

import csv
import json
import re
import statistics
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

from scaling.lrcheck import lr_check, read_rows
from scaling.paired import paired_difference
from scaling.report import fit_csv
from scaling.runs import read_runs

STUDY = REPO / "docs" / "study"
RUN3 = STUDY / "run3"
COLUMNS = ("loss", "loss_caption", "loss_text")


def doc(study: Path = RUN3) -> str:
    return (study / "STUDY.md").read_text()


def fit_table(study: Path = RUN3) -> dict:
    table = {}
    for line in doc(study).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in COLUMNS:
            table[(cells[0], cells[1])] = cells[2:]
    return table


@pytest.mark.parametrize("study", [RUN3, STUDY / "run2"], ids=["run3", "run2"])
def test_the_fit_table_is_what_the_fitter_gives(tmp_path, study):
    """Point estimates do not depend on the number of resamples (the doc's came with 300; 10 here); whether a fit
    converged does, so that column is checked against the committed fit.json."""
    report = fit_csv(study / "results.csv", tmp_path, COLUMNS, "recipe", bootstrap=10, seed=0, flops="6n+attn")
    table = fit_table(study)
    assert len(table) == 6
    for (col, recipe), values in table.items():
        f3 = report["losses"][col][recipe]["approach3"]
        for name, text in zip(("E", "A", "B", "alpha", "beta"), values[:5], strict=True):
            assert f3[name] == pytest.approx(float(text), rel=6e-4), (col, recipe, name)
        # convergence is judged on the bootstrap intervals: the committed fit's, which came with 300 resamples
        committed = json.loads((study / "fit" / "fit.json").read_text())["losses"][col][recipe]["approach3"]
        assert committed["E"] == pytest.approx(f3["E"], rel=6e-4)  # fit.json is this CSV's fit
        assert values[5] == ("yes" if committed["converged"] else "no")
    assert f"{report['runs']} of the spec's 40 cells" in " ".join(doc(study).split())


def test_the_recipe_comparison_and_gpu_time_are_the_csvs():
    data = read_runs(RUN3 / "results.csv", ["loss", "loss_caption"], "recipe", flops="6n+attn")
    text = doc()
    for col in ("loss", "loss_caption"):
        p = paired_difference(data, col, "causal", "bidirectional", bootstrap=300, seed=0, level=0.95)
        lo, hi = p["interval"]
        assert f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]" in text
    p = paired_difference(data, "loss", "causal", "bidirectional", 0, 0, 0.95)
    assert f"lower in {p['lower_in']} of {p['cells']}" in text
    assert f"{p['largest_budget']['mean']:+.4f} over {p['largest_budget']['cells']} cells" in text
    with open(RUN3 / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train, startup = (round(sum(float(r[k]) for r in rows)) for k in ("train_s", "startup_s"))
    assert re.search(rf"training steps of the {len(rows)} finished cells \| {train} \|", text)
    assert re.search(rf"median [\d.]+ s, at most [\d.]+ s\) \| {startup} \|", text)
    epochs = max(float(r[f"epochs_{s}"]) for r in rows for s in ("caption", "qa", "text"))
    assert f"more than {epochs:.2f} times" in text


def test_the_depth_one_pairs_and_the_text_column_are_the_csvs():
    """Without the depth-1 pairs (where the image mask cannot matter) the comparison is what the doc says; the best
    text loss is the CSV's."""
    with open(RUN3 / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "no-depth-1.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r["size"] != "1")
        data = read_runs(path, ["loss"], "recipe", flops="6n+attn")
    p = paired_difference(data, "loss", "causal", "bidirectional", bootstrap=300, seed=0, level=0.95)
    lo, hi = p["interval"]
    flat = " ".join(doc().split())  # the prose as read, whatever its line breaks
    assert f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] over {p['cells']} cells" in flat
    assert f"the best cell reached {min(float(r['loss_text']) for r in rows):.4f}" in flat


def test_the_lr_table_is_the_lr_csv():
    checks = lr_check(read_rows(RUN3 / "lr-results.csv"))
    lines = [line for line in doc().splitlines() if line.startswith("| size ")]
    assert len(checks) == len(lines) == 2
    for c, line in zip(sorted(checks, key=lambda c: c["size"]), lines):
        assert line.startswith(f"| size {c['size']}, ")
        assert all(f"| {v:.4f} " in line for v in c["losses"].values()), line
        assert f"best x{c['best_scale']:g}" in line and f"loses {c['rule_excess']:.4f}" in line
        assert ("within 2x" in line) == c["rule_within"]


def test_the_second_lr_table_is_its_csv_joined_with_the_studys():
    """The check at the study's horizon: its own cells plus the study's factor-1 cells of the same sizes."""
    rows = read_rows(RUN3 / "lr-next-results.csv") + read_rows(RUN3 / "results.csv")
    checks = lr_check(rows)
    lines = [line for line in doc().splitlines() if re.match(r"\| \d+ \([\d,]+ steps\) \|", line)]
    assert [c["size"] for c in checks] == [6, 7, 8] and len(lines) == 3
    for c, line in zip(checks, lines, strict=True):
        assert line.startswith(f"| {c['size']} (")
        assert [f"{v:.4f}" for v in c["losses"].values()] == [x.strip() for x in line.split("|")[2:7]], line
        assert f"best x{c['best_scale']:g}" in line and f"loses {c['rule_excess']:.4f}" in line
        assert ("within 2x" in line) == c["rule_within"]
    worst = max(c["rule_excess"] for c in checks)
    assert f"within {worst:.4f} of the best" in doc()


def test_the_study_step_table_is_the_benchmark_json():
    rows = json.loads((REPO / "docs" / "perf" / "study_step_h200.json").read_text())
    text = doc()
    for depth in (1, 5, 9):
        mine = [r for r in rows if r["depth"] == depth]  # variants flex:torchengine:DATA:rows=R, then the reference
        by = {(r["variant"].split(":")[-2] if ":" in r["variant"] else "reference"): r for r in mine}
        ref = by["reference"]["tokens_per_s"]
        line = next(line for line in text.splitlines() if line.startswith(f"| {depth} ("))
        for key in ("cached", "loader", "reference"):
            assert f"{by[key]['tokens_per_s']:,.0f}" in line and f"{by[key]['step_ms']:.2f} ms" in line
        for key in ("cached", "loader"):
            assert f"| {by[key]['tokens_per_s'] / ref:.2f}x" in line, line


def test_the_whole_forward_table_is_its_benchmark_json():
    """The step since the third run: each row's ratios to the reference of the same device call."""
    rows = json.loads((REPO / "docs" / "perf" / "study_step2_h200.json").read_text())

    def column(variant: str) -> str:
        if variant == "reference":
            return variant
        data = variant.split(":")[2]
        if "static_shapes" in variant:
            return f"graphs-{data}"
        if "reduce-overhead" in variant:
            return f"graphs-without-static-{data}"
        return f"{'model' if 'compile_scope=model' in variant else 'blocks'}-{data}"

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["depth"], r["rows"], r["call"]), {})[column(r["variant"])] = r
    lines = doc().splitlines()
    for (depth, n, call), g in groups.items():
        ref = g["reference"]["tokens_per_s"]
        cells = [
            f"{g[c]['tokens_per_s'] / ref:.2f}x" if c in g else ""
            for c in ("blocks-cached", "model-cached", "model-loader", "graphs-loader")
        ]
        assert f"| {depth}, {n} | {call} | " + " | ".join(cells) + f" | {ref:,.0f} |" in lines, (depth, n, call)
    without_static = (
        groups[(1, 8, 1)]["graphs-without-static-loader"]["tokens_per_s"]
        / groups[(1, 8, 1)]["reference"]["tokens_per_s"]
    )
    assert f"re-record a graph for each new patch count ({without_static:.2f}x)" in " ".join(doc().split())
    at5 = groups[(5, 64, 3)]
    assert (
        f"**it reaches the reference: {at5['model-cached']['tokens_per_s'] / at5['reference']['tokens_per_s']:.2f}x**"
        in doc()
    )


def test_the_fourth_design_is_what_study_md_says():
    """configs/sweeps/study4.yaml as STUDY.md describes it: the grids, the plan's process-minutes, the LR following
    the floor at sizes 1-3; and its LR check's factor-1 cells are the study's own (the same keys)."""
    from scaling.plan import plan
    from scaling.spec import load_spec

    study4 = plan(load_spec(REPO / "configs" / "sweeps" / "study4.yaml"))
    grids = {}
    for c in study4.cells:
        grids.setdefault(c.budget, set()).add(c.size)
    assert [sorted(grids[b]) for b in sorted(grids, key=lambda b: float(b.split("=")[1]))] == [
        [1, 2, 3, 4, 5],
        [1, 2, 3, 4, 5],
        [3, 4, 5, 6, 7],
        [4, 5, 6, 7, 8],
    ]
    text = " ".join(doc().split())
    assert "(sizes 1-5, 1-5, 3-7 and 4-8)" in text
    assert f"puts it at {sum(c.minutes for c in study4.cells):.0f} process-minutes" in text
    rule = load_spec(REPO / "configs" / "sweeps" / "study4.yaml").hparams
    at_1e14 = [c for c in study4.cells if c.size <= 3 and c.budget == "flops=1e+14"]
    small = sorted((c.size, c.lr / rule.lr(c.params)) for c in at_1e14)
    scales = [f"x{x:.3g}" for _, x in small[::2]]  # each size once per recipe
    assert f"{scales[0]}, {scales[1]} and {scales[2]} at sizes 1, 2 and 3" in text, scales
    check = plan(load_spec(REPO / "configs" / "sweeps" / "study4-lr.yaml"))
    ones = {c.key for c in check.cells if c.lr_scale == 1}
    assert len(ones) == 3 and ones <= {c.key for c in study4.cells}


def test_the_floored_lr_table_is_the_cells_training_loss():
    """The third LR check's first attempt: per depth, the five factors' training losses in LR order, the best factor
    and what the rule (factor 1) lost to it, as benchmarks/train_tail.py wrote them."""
    with open(STUDY / "study4-lr-attempt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = doc().splitlines()
    for depth in (1, 2, 3):
        mine = sorted((r for r in rows if int(r["depth"]) == depth), key=lambda r: float(r["lr"]))
        lrs, losses = [float(r["lr"]) for r in mine], [float(r["train_loss_tail"]) for r in mine]
        assert [x / lrs[2] for x in lrs] == pytest.approx([0.25, 0.5, 1, 2, 4])
        best = min(range(5), key=losses.__getitem__)
        line = next(line for line in lines if line.startswith(f"| depth {depth} ("))
        cells = [x.strip() for x in line.split("|")[2:9]]
        assert cells[:5] == [f"{x:.4f}" for x in losses], line
        assert cells[5] == f"x{[0.25, 0.5, 1, 2, 4][best]:g}" and cells[6] == f"{losses[2] - losses[best]:.4f}"


def test_the_floored_lr_check_with_validation_is_its_csv():
    """The third LR check rerun with validation: the table, the verdict and the columns the prose quotes."""
    rows = read_rows(STUDY / "study4-lr-results.csv")
    checks, text_checks = lr_check(rows), lr_check(rows, loss="loss_text")
    lines = [line for line in doc().splitlines() if line.startswith("| floored ")]
    assert [c["size"] for c in checks] == [1, 2, 3] and len(lines) == 3
    for c, line in zip(checks, lines, strict=True):
        cells = [x.strip() for x in line.split("|")[2:9]]
        assert cells == [f"{v:.4f}" for v in c["losses"].values()] + [
            f"x{c['best_scale']:g}",
            f"{c['rule_excess']:.4f}",
        ]
        assert c["rule_within"]
    text = " ".join(doc().split())
    assert "within 2x of the best factor at all three sizes" in text
    assert f"within {max(c['rule_excess'] for c in checks[1:]):.3f} of it" in text
    t1 = text_checks[0]
    assert f"the rule within {t1['rule_excess']:.4f} of its best (x{t1['best_scale']:g})" in text
    caption = lr_check(rows, loss="loss_caption")[0]["losses"]
    assert all(f"x{k:g} {v:.4f}" in text for k, v in caption.items() if k >= 1)


def test_the_cells_util_log_and_causal_law_are_the_committed_data(tmp_path):
    """The committed cells are the spec's (no config change re-keyed them), the util figures are the log's, and
    the causal law's intervals, held-out error and compute-optimal sizes are what the fitter writes."""
    from scaling.plan import plan
    from scaling.spec import load_spec

    with open(RUN3 / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {c.key for c in plan(load_spec(REPO / "configs" / "sweeps" / "study.yaml")).cells}
    assert {r["key"] for r in rows} == keys  # every cell of the spec as committed, none of an earlier one
    text = " ".join(doc().split())
    samples = [line.split() for line in (RUN3 / "util.log").read_text().splitlines()]
    running = [(int(r[1]), float(r[5])) for r in samples if len(r) >= 6 and r[2] == "%," and int(r[3]) > 0]
    busy, load = statistics.median(b for b, _ in running), statistics.median(x for _, x in running)
    assert f"busy a median {busy:.0f}% of the {len(running)} five-second samples" in text
    assert f"load average a median {load:.1f} on 16 cores" in text
    fit = json.loads((RUN3 / "fit" / "fit.json").read_text())["losses"]["loss"]["causal"]
    f3, lo, hi = fit["approach3"], *zip(*(fit["approach3"]["interval"][k] for k in ("E", "alpha", "beta")))
    assert f"E = {f3['E']:.4g} [{lo[0]:.3g}, {hi[0]:.3g}]" in text and f"alpha = {f3['alpha']:.4g} [" in text
    assert f"predicts the five 3e15 cells to a mean {100 * fit['held_out']['mean_rel_error']:.1f}%" in text
    optimal = fit["compute_optimal"]
    ratio = f3["beta"] / (f3["alpha"] + f3["beta"])
    assert f"beta / (alpha + beta) alone gives {ratio:.3f}) is **{optimal['N_exponent']:.2f}**" in text
    for budget, v in ((k, v) for k, v in optimal.items() if isinstance(v, dict)):
        n, (nlo, nhi) = v["N"], v["N_interval"]
        row = f"{n:.2e} [{nlo:.2e}, {nhi:.2e}] | {v['tokens_per_param']:.0f} ["
        assert row.replace("e+0", "e") in text, budget
