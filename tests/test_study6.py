"""docs/study/STUDY.md's section on row stores and the sixth design cannot drift from its data: the step table is the
committed gpu_step JSON's ratios, the store's figures its build logs and loader benchmark, and the cell-by-cell
comparison with the fifth design what the committed results CSVs give."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import studydoc
from conftest import REPO
from studydoc import csv_rows, flat, row, table_rows

from scaling.paired import paired_difference
from scaling.runs import read_runs

STUDY = REPO / "docs" / "study"
DOC = STUDY / "STUDY.md"
RUN = STUDY / "study6"
DOC6 = RUN / "STUDY.md"
POOLED = [STUDY / "study5" / "results.csv", STUDY / "study5-again" / "results.csv", RUN / "results.csv"]
LOSSES = ("loss", "loss_caption", "loss_caption_heldout", "loss_qa", "loss_text")
RECIPES = ("bidirectional", "causal")
PERF = REPO / "docs" / "perf"


def said() -> str:
    return flat(DOC)


def said6() -> str:
    return flat(DOC6)


def test_the_step_table_from_the_row_store():
    steps = json.loads((PERF / "study_step6_h200.json").read_text())
    store, cached = {}, {}
    for depth in (1, 3, 5, 8):
        mine = [s for s in steps if s["depth"] == depth]
        ref = next(s for s in mine if s["variant"] == "reference")
        s = next(s for s in mine if "@data.rows=" in s["variant"])
        c = next(s for s in mine if s["variant"].startswith("flex:graph:cached:"))
        assert s["graph"] and c["graph"] and s["rows"] == c["rows"] == ref["rows"]
        store[depth], cached[depth] = s["tokens_per_s"] / ref["tokens_per_s"], c["tokens_per_s"] / ref["tokens_per_s"]
        cells = [
            f"{store[depth]:.2f}x",
            f"{cached[depth]:.2f}x",
            f"{s['tokens_per_s'] / 512:,.0f}",
            f"{s['loader_wait_ms']:.2f} + {s['copy_ms']:.2f}",
        ]
        line = f"| {depth}, {ref['rows']} | " + " | ".join(cells) + f" | {ref['tokens_per_s']:,.0f} |"
        assert line in DOC.read_text().splitlines(), line
    streaming = next(
        s
        for s in steps
        if s["depth"] == 1 and s["variant"] == "flex:graph:loader:rows=64:@deepspeed.compile_scope=model"
    )
    ref1 = next(s for s in steps if s["depth"] == 1 and s["variant"] == "reference")
    assert (
        f"The streaming loader in the same process at depth 1: {streaming['tokens_per_s'] / ref1['tokens_per_s']:.2f}x"
        in said()
    )
    low = [store[d] for d in (1, 3, 5)]
    assert (
        min(low) >= 1.0
        and f"reaches 1.0x the plain compiled GPT at depths 1, 3 and 5 ({min(low):.2f}-{max(low):.2f}x)" in said()
    )
    assert f"reaches {min(low):.2f}-{max(low):.2f}x at depths 1, 3 and 5 and {store[8]:.2f}x at depth 8" in said()
    assert f"and {store[8]:.2f}x at depth 8**, where the step on cached batches is {cached[8]:.2f}x" in said()
    c8 = next(s for s in steps if s["depth"] == 8 and s["variant"].startswith("flex:graph:cached:"))
    r8 = next(s for s in steps if s["depth"] == 8 and s["variant"] == "reference")
    assert f"({c8['step_ms']:.2f} against {r8['step_ms']:.2f} ms)" in said()
    cached1 = next(s for s in steps if s["depth"] == 1 and s["variant"].startswith("flex:graph:cached:"))
    assert f"the {round(cached1['tokens_per_s'] / 512, -3) / 1000:.0f}k the cached step eats" in said()
    perf = flat(REPO / "docs" / "PERFORMANCE.md")
    by = ", ".join(f"{store[d]:.2f}x" for d in (1, 3, 5))
    assert f"runs at {by} and {store[8]:.2f}x the plain GPT at depths 1, 3, 5 and 8" in perf
    by = ", ".join(f"{cached[d]:.2f}x" for d in (1, 3, 5))
    assert f"(on cached batches in the same call {by} and {cached[8]:.2f}x)" in perf
    speed = json.loads((PERF / "row_store_speed_h200.json").read_text())
    rates = [f"{r['rows_per_s']:,.0f}" for r in speed]
    assert [r["workers"] for r in speed] == [0, 1, 2, 3, 4]
    assert f"{', '.join(rates[:-1])} and {rates[-1]} rows a second inline and with 1-4 threads" in said()


def test_the_bound_it_lifts_is_the_committed_cpu_time_a_row():
    rows = json.loads((PERF / "host_cores2_h200.json").read_text())["default"]
    at = {r["processes"]: r["user_ms_per_row"] for r in rows}
    assert f"{at[4]:.3f} ms of user CPU a row with 4 processes on the H200's host and {at[16]:.3f} with 16" in said()


def test_the_stores_build_as_logged():
    for run, rows in (("study6", 88256), ("study6-check", 70912)):
        log = (STUDY / run / "rows.log").read_text()
        m = re.search(
            r"x ([\d,]+) rows over ([\d,]+) documents stored once \(([\d,]+) positions, ([\d,]+) patches\), ([\d.]+) s",
            log,
        )
        assert m and int(m[1].replace(",", "")) == rows, log
        if run == "study6":
            assert f"**{m[2]} documents stored once ({m[3]} positions, {m[4]} patches) in {m[5]} s" in said()
        else:
            assert f"{m[5]} s for the check's {m[1]} rows a stream" in said()


def _by_cell(path, trained_only=False) -> dict:
    return {
        (r["recipe"], r["size"], r["budget"]): r for r in csv_rows(path) if not (trained_only and r.get("reused_from"))
    }


def test_the_sixth_design_against_the_fifth_cell_by_cell():
    check = _by_cell(STUDY / "study6-check" / "results.csv")
    full = csv_rows(STUDY / "study6" / "results.csv")
    new = _by_cell(STUDY / "study6" / "results.csv")
    assert len(check) == 20 and len(full) == len(new) == 40
    assert sum(bool(r.get("reused_from")) for r in full) == 20
    for k, r in check.items():  # the check's rows are the design's own, named as reused from it
        assert {**r, "reused_from": "docs/study/study6-check/results.csv"} == new[k]
    first, again = _by_cell(STUDY / "study5" / "results.csv"), _by_cell(STUDY / "study5-again" / "results.csv")
    for k, r in new.items():  # the same cells: sizes, budgets, learning rates and steps
        assert (r["steps"], r["lr"], r["rows"]) == (first[k]["steps"], first[k]["lr"], first[k]["rows"])

    def median_abs(a, b):
        return statistics.median(abs(float(a[k]["loss"]) - float(b[k]["loss"])) for k in new)

    def cell_time(rows, keys):
        return sum(float(rows[k]["train_s"]) for k in keys)

    d1, d2, d12 = median_abs(new, first), median_abs(new, again), median_abs(again, first)
    assert (
        f"the median absolute difference in final loss is {d1:.4f} from the first run and {d2:.4f} from the second, "
        f"where the two runs of the fifth design differ from each other by {d12:.4f}"
    ) in said()
    assert (
        f"the median absolute difference in final loss is {d1:.4f} from the fifth design's first run and {d2:.4f} "
        f"from its second, where those two runs differ from each other by {d12:.4f}"
    ) in said6()
    times = f"{cell_time(new, new):,.0f} s against {cell_time(first, new):,.0f} s and {cell_time(again, new):,.0f} s"
    assert times in said() and f"**{times}**" in said6()
    ratios = [cell_time(first, new) / cell_time(new, new), cell_time(again, new) / cell_time(new, new)]
    assert f"{ratios[0]:.2f}x and {ratios[1]:.2f}x less" in said6()
    assert f"in {min(ratios):.1f}-{max(ratios):.1f}x less cell time" in said()
    assert (
        f"these 20 cells trained for {cell_time(check, check):,.0f} s summed over cells, the fifth design's same 20 "
        f"for {cell_time(again, check):,.0f} s in its second run" in said()
    )
    big = [k for k in new if k[2] == "flops=3.2e+15" and int(k[1]) >= 6]
    ours, theirs = [float(new[k]["train_s"]) for k in big], [float(again[k]["train_s"]) for k in big]
    assert f"({min(ours):.0f}-{max(ours):.0f} s against {min(theirs):.0f}-{max(theirs):.0f} s at 3.2e15)" in said()
    time_md = (STUDY / "study6-check" / "time.md").read_text()
    wall = re.search(r"wall time of 1 driver run\(s\) \| (\d+)", time_md)[1]
    share = re.search(r"training steps of the 20 finished cells \| \d+ \| ([\d.]+)%", time_md)[1]
    assert f"**20 cells in {wall} s of driver wall time**" in said() and f"{share}% of the GPU's cell slots" in said()
    log = (STUDY / "study6" / "sweep.log").read_text()
    assert log.count("\nfinished ") == 10 and log.count("\ninterrupted ") == 8 and "2 not started" in log
    assert "10 more cells finished, 8 were stopped at a checkpoint" in said() and "2 did not start" in said()


@pytest.fixture(scope="module")
def committed() -> dict:
    return studydoc.committed_fit(RUN)


def test_the_sixth_designs_laws_are_its_fit(tmp_path, committed):
    """The law table is the committed fit.json's, whose overall-loss points the repo's fitter gives again from the
    CSV; the prose's figures are the fit's and the CSV's."""
    table = table_rows(DOC6, set(LOSSES), 10)
    assert len(table) == 10
    studydoc.check_law_cells(table, committed, studydoc.refit(RUN, tmp_path, ("loss",)))
    studydoc.check_law_flags(table, committed)
    overall = [committed["loss"][r] for r in RECIPES]
    assert all(x["approach3"]["converged"] for x in overall)
    flagged = [f"{100 * x['approach3']['bootstrap_flagged_share']:.0f}%" for x in overall]
    errors = [f"{100 * x['held_out']['mean_rel_error']:.1f}%" for x in overall]
    assert f"{flagged[0]} and {flagged[1]} of 300 bootstrap refits flagged" in said6()
    assert f"predicted to {errors[0]} and {errors[1]} when held out" in said6()
    text_e = [committed["loss_text"][r]["approach3"]["E"] for r in RECIPES]
    above = [f"{100 * (e / 1.7269 - 1):.1f}%" for e in text_e]
    assert f"{above[0]} and {above[1]} above the generator's 1.7269" in said6()
    caption_e = [committed[c][r]["approach3"]["E"] for c in ("loss_caption", "loss_caption_heldout") for r in RECIPES]
    assert f"Their E ({min(caption_e):.3f}-{max(caption_e):.3f}) lies below" in said6()
    cells = csv_rows(RUN / "results.csv")
    best_caption = min(float(r["loss_caption"]) for r in cells)
    above_floor = f"{100 * (best_caption / 0.0913 - 1):.0f}% above"
    assert f"The best caption cell reached {best_caption:.4f}, {above_floor}" in said6()
    assert f"The best text cell reached {min(float(r['loss_text']) for r in cells):.4f}" in said6()
    epochs = max(float(r[f"epochs_{s}"]) for r in cells for s in ("caption", "qa", "text"))
    assert f"more than {epochs:.2f} times" in said6()

    def caption(budget):
        return sorted(float(r["loss_caption"]) for r in cells if r["budget"] == f"flops={budget}")

    low, high = caption("1e+14"), caption("3.2e+15")
    assert f"({low[0]:.2f}-{low[-1]:.2f} across the 1e14 cells, {high[0]:.3f}-{high[-1]:.3f} across the 3.2e15" in (
        said6()
    )


def test_approach_two_and_the_compute_optimal_sizes(committed):
    table = table_rows(DOC6, {"loss", "loss_caption", "loss_text"}, 6)
    assert len(table) == 6
    for (col, recipe), cells in table.items():
        fit = committed[col][recipe]
        a2 = fit["approach2"]
        lo, hi = a2["interval"]["N_exponent"]
        assert cells == [
            f"{fit['compute_optimal']['N_exponent']:.3f}",
            f"{a2['N_exponent']:.3f} [{lo:.3f}, {hi:.3f}]",
            f"{a2['budgets'] - len(a2['rejected'])} of {a2['budgets']}",
            f"{100 * a2['bootstrap_fallback_share']:.0f}%",
        ]
        assert lo <= fit["compute_optimal"]["N_exponent"] <= hi  # "agree within approach 2's interval everywhere"
    for budget in ("1e14", "3e14", "1e15", "3.2e15", "3.2e16"):
        cells = row(DOC6, budget)
        for recipe, pair in zip(RECIPES, (cells[:2], cells[2:4]), strict=True):
            assert tuple(pair) == studydoc.optimal_cells(committed, recipe, budget), (budget, recipe)


def _multiplier(m: dict) -> str:
    return f"{m['multiplier']:.3g}x"


def test_the_verdict_is_the_fits_multiplier_and_the_cells(committed):
    m = committed["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    assert m[0]["from_converged_fits"] and m[1]["target_flops"] == pytest.approx(10 * m[0]["target_flops"])
    lo, hi = m[0]["interval"]
    assert lo < 1 < hi
    assert (
        f"**bidirectional needs {_multiplier(m[0])} less compute than causal for causal's loss at 3.2e15 FLOPs** "
        f"(95% interval [{lo:.3g}, {hi:.3g}]; {100 * m[0]['share_never']:.0f}% of 300 resamples never reach the "
        f"target) and {_multiplier(m[1])} at 3.2e16, extrapolated (at most {m[1]['interval'][1]:.3g}x; "
        f"{100 * m[1]['share_never']:.0f}% never reach it)" in said6()
    )
    assert f"needs **{_multiplier(m[0])}** less compute than causal" in said6()
    cheaper = f"causal about {1 / m[0]['multiplier']:.1f}x cheaper"
    assert f"(95% interval [{lo:.3g}, {hi:.3g}]), that is, {cheaper}" in said6()
    assert f"bidirectional {_multiplier(m[0])} [{lo:.3g}, {hi:.3g}]" in said()
    assert committed["loss_qa"]["bidirectional"]["compute_multiplier_vs_causal"][0]["from_converged_fits"]
    studydoc.check_column_verdicts(committed, said6())
    cols = ["loss", "loss_caption", "loss_qa", "loss_text"]
    data = read_runs(RUN / "results.csv", cols, "recipe", flops="6n+attn")
    for col, name in zip(cols, ("overall **", "caption ", "QA ", "text "), strict=True):
        p = paired_difference(data, col, "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
        text = f"{name}{p['mean']:+.4f} [{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}]"
        assert text.replace("**", "") in said6().replace("**", ""), text
        if col == "loss":
            assert p["cells"] == 20 and p["interval"][0] < 0 < p["interval"][1]
            big = p["largest_budget"]
            assert f"(causal lower in {p['lower_in']}), {big['mean']:+.4f} at 3.2e15 (causal lower in " in said6()
            assert f"{big['lower_in']} of {big['cells']})" in said6()


def test_three_runs_of_every_cell_fitted_together(tmp_path):
    """The pooled fit reads the three CSVs; its table, verdict and cell-by-cell difference (each cell at the mean of
    its runs) are what the committed fit.json and the CSVs give, and the fitter gives its overall points again."""
    pooled = studydoc.committed_fit(STUDY / "study5-6")
    fit = json.loads((STUDY / "study5-6" / "fit" / "fit.json").read_text())
    assert fit["runs"] == 120 and fit["csv"] == [str(p).removeprefix(str(REPO) + "/") for p in POOLED]
    labels = {f"three runs: {col}, {r}" for col in LOSSES for r in RECIPES}
    table = table_rows(DOC6, labels, 9)
    assert len(table) == 10
    converged = 0
    for (label, e_cell), cells in table.items():
        col, recipe = label.removeprefix("three runs: ").split(", ")
        assert [e_cell, *cells] == studydoc.pooled_cells(pooled[col][recipe]), label
        converged += pooled[col][recipe]["approach3"]["converged"]
    assert converged == 9 and "Nine of ten laws converge" in said6()
    m = pooled["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    lo, hi = m[0]["interval"]
    assert m[0]["from_converged_fits"] and lo < 1 < hi
    assert (
        f"**Bidirectional needs {_multiplier(m[0])} less compute than causal for causal's loss at 3.2e15** (95% "
        f"interval [{lo:.3g}, {hi:.3g}], {100 * m[0]['share_never']:.0f}% of resamples never reach it), "
        f"{_multiplier(m[1])} at 3.2e16 extrapolated (at most {m[1]['interval'][1]:.3g}x; "
        f"{100 * m[1]['share_never']:.0f}% never reach)" in said6()
    )
    assert f"**bidirectional {_multiplier(m[0])} [{lo:.3g}, {hi:.3g}]** at 3.2e15" in said6()
    readme = flat(REPO / "README.md")
    assert f"fitted together, bidirectional {_multiplier(m[0])} [{lo:.3g}, {hi:.3g}]" in readme
    assert f"causal is at most {1 / lo:.1f}x cheaper and bidirectional at most {hi:.2f}x cheaper" in said6()
    assert f"the point estimate leans causal by {1 / m[0]['multiplier']:.1f}x" in said6()
    data = read_runs(POOLED, ["loss"], "recipe", flops="6n+attn")
    p = paired_difference(data, "loss", "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
    text = f"{p['mean']:+.4f} [{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}]"
    assert p["cells"] == 20 and f"**{text}** over the 20 cells (causal lower in {p['lower_in']})" in said6()
    assert f"{p['largest_budget']['mean']:+.4f} at 3.2e15" in said6()
    assert f"within {max(map(abs, p['interval'])):.3f} of each other in loss" in said6()
    assert f"causal minus bidirectional {text} cell by cell" in said()
    refitted = studydoc.refit_csvs(POOLED, tmp_path, ("loss",))
    for recipe in RECIPES:
        for name in ("E", "alpha", "beta"):
            got = refitted["loss"][recipe]["approach3"][name]
            assert got == pytest.approx(pooled["loss"][recipe]["approach3"][name], rel=6e-4)


def _time_md(run) -> dict:
    """The figures of a committed time.md (what `python -m scaling time DIR` printed)."""
    md = (run / "time.md").read_text()
    return {
        "wall": int(re.search(r"wall time of \d driver run\(s\) \| (\d+)", md)[1]),
        "cells": re.search(r"training steps of the (\d+) finished cells", md)[1],
        "share": re.search(r"training steps of the \d+ finished cells \| \d+ \| ([\d.]+)%", md)[1],
        "startup": re.search(r"their start-up .* \| \d+ \| ([\d.]+)%", md)[1],
        "rest": re.search(r"the rest \| \d+ \| ([\d.]+)%", md)[1],
        "mfu": re.search(r"aggregate MFU ([\d.]+)%", md)[1],
        "warm": re.search(
            r"([\d.]+) over the (\d+) cell\(s\) on a warm worker; ([\d.]+) over the (\d+) cell", md
        ).groups(),
    }


def test_the_time_table_is_the_time_files():
    from scaling.gputime import gpu_time, markdown

    for run in ("study6-check", "study6", "study6-whole"):  # each time.md: what `python -m scaling time DIR` prints
        assert markdown(gpu_time(STUDY / run, peak_tflops=989)) + "\n" == (STUDY / run / "time.md").read_text()
    for label, run in (("the check (`study6-check/time.md`)", "study6-check"), ("the two calls after it", "study6")):
        t = _time_md(STUDY / run)
        line = next(x for x in DOC6.read_text().splitlines() if x.startswith(f"| {label}"))
        assert line.split(" | ")[1:] == [str(t["wall"]), t["cells"], f"{t['share']}%", f"{t['mfu']}% |"], line
    walls = [_time_md(STUDY / r)["wall"] for r in ("study6-check", "study6")]
    assert f"**{sum(walls)} s of driver wall time for the 40 cells** ({sum(walls) / 60:.1f} minutes" in said6()
    log = (RUN / "sweep2.log").read_text()
    assert log.count("\nfinished ") == 10 and "30 of 40 cells already finished" in log
    each = re.search(r"wall time of each driver run, in order: (\d+) s, (\d+) s", (RUN / "time.md").read_text())
    assert f"stopped the call at {each[1]} s of driver wall time" in said6()
    assert f"in {each[2]} s of driver wall time (`sweep2.log`" in said6()
    assert f"cut at {each[1]} s" in said()


def test_a_reused_row_keeps_the_sweep_that_trained_it(tmp_path):
    """Reusing the sixth design's results (whose check rows it reused itself) names the check for those rows and
    the sixth design for the rest: `scaling time` then leaves both out, and provenance survives a second reuse."""
    from scaling.plan import plan
    from scaling.results import adopt
    from scaling.spec import load_spec

    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study6.yaml")).cells
    assert adopt(tmp_path, cells, RUN / "results.csv") == 40
    got = {r["key"]: r["reused_from"] for r in csv_rows(tmp_path / "results.csv")}
    mine = {r["key"]: r.get("reused_from") for r in csv_rows(RUN / "results.csv")}
    assert {k: v or str(RUN / "results.csv") for k, v in mine.items()} == got
    assert sorted(set(got.values())) == sorted({"docs/study/study6-check/results.csv", str(RUN / "results.csv")})


def test_the_copy_beside_the_step_at_depth_8():
    """STUDY.md's "The copy beside the step": the table and every ratio are the two committed gpu_step runs', and the
    reference's best figure is the highest of the earlier calls' at depth 8."""
    runs = [json.loads((PERF / f).read_text()) for f in ("study_step7_d8_h200.json", "study_step7_d8_again_h200.json")]

    def pick(run, word):
        for s in run:
            v = s["variant"]
            if word == "reference" and v == "reference":
                return s
            if word == "side" and "@data.rows=" in v and not s["samestream"]:
                return s
            if word == "same" and "@data.rows=" in v and s["samestream"]:
                return s
            if word == "cached" and v.startswith("flex:graph:cached:"):
                return s
        return None

    for s in (x for run in runs for x in run):
        assert "model.depth=8" in s.get("overrides", ["model.depth=8"]) and s["rows"] == 96
    text, lines = said(), DOC.read_text().splitlines()
    for word, name in (
        ("side", "captured, rows from the store, copy on its own stream"),
        ("same", "captured, rows from the store, copy on the compute stream"),
        ("cached", "captured, cached batches"),
        ("reference", "the plain compiled GPT"),
    ):
        cells = []
        for run in runs:
            s = pick(run, word)
            cells += [f"{s['tokens_per_s']:,.0f}", f"{s['step_ms']:.2f}"] if s else ["", ""]
        assert [name, *cells] in [[c.strip() for c in x.strip("|").split("|")] for x in lines], (name, cells)
    gains = sorted(pick(r, "same")["step_ms"] / pick(r, "side")["step_ms"] - 1 for r in runs)
    assert f"worth {100 * gains[0]:.1f}-{100 * gains[-1]:.1f}% of the step" in text
    first = runs[0]
    assert f"({pick(first, 'side')['tokens_per_s'] / pick(first, 'cached')['tokens_per_s']:.3f}x)" in text
    vs = [pick(r, "side")["tokens_per_s"] / pick(r, "reference")["tokens_per_s"] for r in runs]
    assert min(vs) >= 1.0 and f"**{vs[0]:.2f}x and {vs[1]:.2f}x**" in text
    earlier = [
        s["tokens_per_s"]
        for f in ("study_step5_h200.json", "study_step6_h200.json")
        for s in json.loads((PERF / f).read_text())
        if s["variant"] == "reference" and s["depth"] == 8
    ]
    best = max(earlier)
    assert f"highest figure the reference has given on this host, {best:,.0f} tokens/s" in text
    ours = [pick(r, "side")["tokens_per_s"] for r in runs]
    assert min(ours) / best >= 0.995 and f"is **{min(ours) / best:.2f}x**" in text
    assert f"4.36M tokens/s here, {earlier[0] / 1e6:.2f}M and {earlier[1] / 1e6:.2f}M" in text
    perf = flat(REPO / "docs" / "PERFORMANCE.md")
    assert f"{vs[0]:.2f}x and {vs[1]:.2f}x the plain GPT in two runs of one call" in perf
    side_ms = {f"{pick(r, 'side')['step_ms']:.2f}" for r in runs}
    same_ms = sorted(f"{pick(r, 'same')['step_ms']:.2f}" for r in runs)
    refs = sorted(pick(r, "reference")["tokens_per_s"] for r in runs)
    assert len(side_ms) == 1 and f"{side_ms.pop()} ms a step against {same_ms[0]}-{same_ms[1]} ms" in perf
    assert f"({refs[0] / 1e6:.2f}-{refs[1] / 1e6:.2f}M tokens/s against" in perf
    assert f"{min(earlier) / 1e6:.2f}-{max(earlier) / 1e6:.2f}M); against the reference's best figure, 1.00x" in perf
    assert f"{min(ours) / best:.2f}x" == "1.00x"


WHOLE = STUDY / "study6-whole"
FOUR = [*POOLED, WHOLE / "results.csv"]


def _compact_table(label: str, fit: dict) -> None:
    """A pooled-form table of the sixth design's STUDY.md: every row the fit's (studydoc.pooled_cells)."""
    table = table_rows(DOC6, {f"{label}: {col}, {r}" for col in LOSSES for r in RECIPES}, 9)
    assert len(table) == 10
    for (name, e_cell), cells in table.items():
        col, recipe = name.removeprefix(f"{label}: ").split(", ")
        assert [e_cell, *cells] == studydoc.pooled_cells(fit[col][recipe]), name


def _verdict(fit: dict, paths) -> tuple[str, str, dict, dict]:
    m = fit["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    lo, hi = m[0]["interval"]
    assert m[0]["from_converged_fits"] and lo < 1 < hi  # a tie: the interval holds 1
    data = read_runs(paths, ["loss"], "recipe", flops="6n+attn")
    p = paired_difference(data, "loss", "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
    cells = f"{p['mean']:+.4f} [{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}]"
    return f"{_multiplier(m[0])} less compute", f"[{lo:.3g}, {hi:.3g}]", m, {**p, "text": cells}


def test_the_uninterrupted_run_is_its_files(tmp_path):
    """ "One uninterrupted run": the 40 cells of the spec in one driver run, no row reused; the time table is its
    time.md, which is what `scaling time` gives from its files today; the plan's wall time is what the plan says;
    the comparison with the three calls' run, the laws and the verdict are what the CSVs and the committed fit give."""
    from scaling.plan import plan, slot_wall
    from scaling.spec import load_spec

    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study6.yaml")).cells
    rows = csv_rows(WHOLE / "results.csv")
    assert sorted(r["key"] for r in rows) == sorted(c.key for c in cells)
    assert not any(r.get("reused_from") for r in rows)
    log = (WHOLE / "study.log").read_text()
    assert log.count("\nfinished ") == 40 and "0 of 40 cells already finished; running 40 on 1 GPU(s)" in log
    assert len([x for x in (WHOLE / "driver.jsonl").read_text().splitlines() if '"start"' in x]) == 1
    data_s, prep_s = re.search(r"1800000 training samples in ([\d.]+) s .* prepared \S+ in ([\d.]+) s", log).groups()
    store_s = re.search(r"16 streams x 88,256 rows over 1,800,000 documents, ([\d.]+) s", log)[1]
    text = said6()
    assert f"(1.8M samples in {data_s} s and the prepared copy in {prep_s} s" in text
    assert f"(16 streams of 88,256 rows, {store_s} s" in text
    t = _time_md(WHOLE)
    assert f"**one driver run of {t['wall']} s** ({t['wall'] / 60:.1f} minutes" in text
    assert f"plan configs/sweeps/study6.yaml` had said about {slot_wall(cells, 8):.0f} minutes" in text
    before = [_time_md(STUDY / r) for r in ("study6-check", "study6")]
    assert row(DOC6, "driver wall time") == [
        f"{t['wall']} s, one run",
        f"{sum(b['wall'] for b in before)} s over three runs",
    ]
    shares = f"{before[0]['share']}% and {before[1]['share']}%"
    assert row(DOC6, "share of the GPU's cell slots in training steps") == [f"**{t['share']}%**", shares]
    mfu = row(DOC6, "aggregate MFU (model FLOPs over GPU-seconds x 989 TFLOPs, start-up included)")
    assert mfu == [f"{t['mfu']}%", f"{before[0]['mfu']}% and {before[1]['mfu']}%"]
    warm, n_warm, cold, n_cold = t["warm"]
    b = before[1]["warm"]
    startup = row(DOC6, "start-up, median a cell on a warm worker / one that started a process")
    assert startup == [f"{warm} s ({n_warm} cells) / {cold} s ({n_cold} cells)", f"{b[0]} s / {b[2]} s"]
    assert (
        float(t["share"]) >= 80
        and f"**The goal of at least 80% of the GPU time in training steps is met: {t['share']}%**" in text
    )
    assert f"start-up and the first steps' compile {t['startup']}%, the rest {t['rest']}%" in text
    assert f"aggregate MFU {t['mfu']}%" in said()
    timed = {1, 3, 5, 8} | set(_every_depth())  # study_step6 and study_step7_d8, then the four of study_step8
    assert timed == {int(r["size"]) for r in rows}
    assert "in the same run at every depth of the study, 1 to 8 (the last three sections)" in said()
    assert f"{t['share']}% of the GPU's cell slots in training steps" in flat(REPO / "README.md")
    # against the three calls' run of the same cells
    old = {r["key"]: r for r in csv_rows(RUN / "results.csv")}
    diffs = [abs(float(r["loss"]) - float(old[r["key"]]["loss"])) for r in rows]
    assert f"the median absolute difference in final loss cell by cell is {statistics.median(diffs):.4f}" in text
    worst = max(rows, key=lambda r: abs(float(r["loss"]) - float(old[r["key"]]["loss"])))
    assert (worst["recipe"], worst["size"], worst["budget"]) == ("causal", "1", "flops=1e+14")
    caption = (
        f"caption loss {float(worst['loss_caption']):.3f} here, {float(old[worst['key']]['loss_caption']):.3f} before"
    )
    assert caption in text
    # its laws and verdict
    fit = studydoc.committed_fit(WHOLE)
    _compact_table("whole run", fit)
    refitted = studydoc.refit(WHOLE, tmp_path, ("loss",))
    for recipe in RECIPES:
        assert fit["loss"][recipe]["approach3"]["converged"]
        for name in ("E", "alpha", "beta"):
            got = refitted["loss"][recipe]["approach3"][name]
            assert got == pytest.approx(fit["loss"][recipe]["approach3"][name], rel=6e-4)
    errors = [f"{100 * fit['loss'][r]['held_out']['mean_rel_error']:.1f}%" for r in RECIPES]
    assert f"({errors[0]} and {errors[1]} held-out error on the 3.2e15 budget)" in text
    assert fit["loss"]["bidirectional"]["approach2"]["rejected"]  # "approach 2 rejects its 1e15 budget"
    less, interval, m, p = _verdict(fit, WHOLE / "results.csv")
    assert f"**bidirectional needs {less} than causal for causal's loss at 3.2e15** (95% interval {interval}, " in text
    assert f"{100 * m[0]['share_never']:.0f}% of resamples never reach it): a tie again" in text
    assert f"overall {p['text']} (causal lower in {p['lower_in']} of 20)" in text
    assert f"masks tie again (bidirectional {_multiplier(m[0])} {interval})" in text


def test_four_runs_of_every_cell_fitted_together(tmp_path):
    """The four-run fit reads the four CSVs (160 runs); its table, verdict and cell-by-cell difference are what the
    committed fit.json and the CSVs give, the fitter gives its overall points again, and the study's summaries
    (both STUDY.md files and the README) quote them."""
    path = STUDY / "study5-6x4"
    fit = studydoc.committed_fit(path)
    meta = json.loads((path / "fit" / "fit.json").read_text())
    assert meta["runs"] == 160 and meta["csv"] == [str(p).removeprefix(str(REPO) + "/") for p in FOUR]
    _compact_table("four runs", fit)
    converged = sum(fit[c][r]["approach3"]["converged"] for c in LOSSES for r in RECIPES)
    assert converged == 9 and not fit["loss_text"]["causal"]["approach3"]["converged"]
    less, interval, m, p = _verdict(fit, FOUR)
    text = said6()
    assert f"**Bidirectional needs {less} than causal for causal's loss at 3.2e15** (95% interval {interval}, " in text
    assert (
        f"{100 * m[0]['share_never']:.0f}% of resamples never reach it), {_multiplier(m[1])} at 3.2e16 extrapolated "
        f"(at most {m[1]['interval'][1]:.3g}x; {100 * m[1]['share_never']:.0f}% never reach)" in text
    )
    assert f"**{p['text']}** over the 20 cells (causal lower in {p['lower_in']})" in text
    assert f"leans causal (by {1 / m[0]['multiplier']:.1f}x)" in text
    assert f"within {max(map(abs, p['interval'])):.3f} of each other" in text
    three = studydoc.committed_fit(STUDY / "study5-6")["loss"]["bidirectional"]["compute_multiplier_vs_causal"][0]
    assert m[0]["interval"][1] - m[0]["interval"][0] < three["interval"][1] - three["interval"][0]  # "narrower"
    assert f"**bidirectional {_multiplier(m[0])} {interval}** at 3.2e15, causal minus bidirectional {p['text']}" in text
    study = said()
    assert (
        f"needs **{_multiplier(m[0])}** less compute than causal for causal's loss at 3.2e15 FLOPs, 95% interval "
        f"{interval}" in study
    )
    assert f"cell by cell causal minus bidirectional {p['text']}" in study
    caption = [fit[c][r] for c in ("loss_caption", "loss_caption_heldout") for r in RECIPES]
    assert all(x["approach3"]["converged"] for x in caption)
    errors = sorted(100 * x["held_out"]["mean_rel_error"] for x in caption)
    assert (
        f"the caption laws converge when runs are pooled but miss the held-out budget by "
        f"{errors[0]:.0f}-{errors[-1]:.0f}%" in study
    )
    readme = flat(REPO / "README.md")
    assert f"(160 runs, the study's best estimate) {_multiplier(m[0])} {interval}" in readme
    refitted = studydoc.refit_csvs(FOUR, tmp_path, ("loss",))
    for recipe in RECIPES:
        for name in ("E", "alpha", "beta"):
            got = refitted["loss"][recipe]["approach3"][name]
            assert got == pytest.approx(fit["loss"][recipe]["approach3"][name], rel=6e-4)


def _every_depth() -> dict:
    """study_step8_d{2,4,6,7}: per depth its rows and the runs by role (store, cached, reference before and after)."""
    out = {}
    for depth in (2, 4, 6, 7):
        roles = {}
        for s in json.loads((PERF / f"study_step8_d{depth}_h200.json").read_text()):
            v = s["variant"]
            role = {"reference-before": "before", "reference": "after"}.get(v)
            role = role or ("store" if "@data.rows=" in v else "cached" if v.startswith("flex:graph:cached:") else v)
            assert f"model.depth={depth}" in s.get("overrides", [f"model.depth={depth}"])
            roles[role] = s
        assert set(roles) == {"before", "after", "store", "cached"}, roles
        out[depth] = roles
    return out


def test_every_depth_of_the_study_is_timed():
    """STUDY.md's "Every depth of the study": its table is the four committed gpu_step runs, each ratio against the
    faster reference of its own run, every one at least 1.0x; the stricter check's figures are the committed
    references' best at the shallower depths."""
    lines = [[c.strip() for c in x.strip("|").split("|")] for x in DOC.read_text().splitlines()]
    ratios = []
    for depth, r in _every_depth().items():
        ref = max(r["before"]["tokens_per_s"], r["after"]["tokens_per_s"])
        store, cached = r["store"], r["cached"]
        ratios.append(store["tokens_per_s"] / ref)
        cells = [
            f"{depth}, {store['rows']}",
            f"{store['tokens_per_s'] / ref:.2f}x",
            f"{cached['tokens_per_s'] / ref:.2f}x",
            f"{store['tokens_per_s']:,.0f}",
            f"{store['loader_wait_ms']:.2f} + {store['copy_ms']:.2f}",
            f"{r['before']['tokens_per_s']:,.0f} / {r['after']['tokens_per_s']:,.0f}",
        ]
        assert cells in lines, cells
    assert min(ratios) >= 1.0
    best = {}
    for path in PERF.glob("study_step*_h200.json"):
        run = json.loads(path.read_text())
        depths = {o for s in run for o in s.get("overrides", []) if o.startswith("model.depth=")}
        for s in run:  # runs of several depths name each entry's; a run of one depth names it in its overrides
            depth = s.get("depth") or (int(next(iter(depths)).split("=")[1]) if len(depths) == 1 else None)
            if depth and s["variant"].startswith("reference"):
                best[depth] = max(best.get(depth, 0), s["tokens_per_s"])
    store = {d: r["store"]["tokens_per_s"] for d, r in _every_depth().items()}
    text = said()
    for depth, shallower in ((4, 3), (6, 5)):
        assert f"{store[depth] / 1e6:.2f}M against depth {shallower}'s {best[shallower] / 1e6:.2f}M, " in text
        assert f"{store[depth] / best[shallower]:.2f}x" in text
    assert f"depth 7 is at {store[7] / best[5]:.2f}x of depth 5's {best[5] / 1e6:.2f}M" in text
    assert f"depth 2, against depth 1's {best[1] / 1e6:.2f}M, {store[2] / best[1]:.2f}x" in text
