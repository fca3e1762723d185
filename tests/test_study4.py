"""docs/study/study4/STUDY.md (the fourth run) cannot drift from its data: the committed results CSV is refitted
with the repo's fitter, and every table and figure the document gives is what the CSVs, the committed fit.json, the
driver log and the util log give."""

from __future__ import annotations

import statistics

import pytest
import studydoc
from conftest import REPO

from scaling.lrcheck import lr_check, read_rows
from scaling.paired import paired_difference
from scaling.runs import read_runs

STUDY = REPO / "docs" / "study"
RUN = STUDY / "study4"  # the fourth run: its data and its document
LOSSES = ("loss", "loss_caption", "loss_caption_heldout", "loss_qa", "loss_text")
REFIT = ("loss", "loss_caption", "loss_text")  # the three columns, refitted here (the rest: fit.json)


def text() -> str:
    return (RUN / "STUDY.md").read_text()


def flat() -> str:
    return studydoc.flat(RUN / "STUDY.md")


def table_rows(first: set[str], width: int) -> dict:
    return studydoc.table_rows(RUN / "STUDY.md", first, width)


csv_rows = studydoc.csv_rows


@pytest.fixture(scope="module")
def committed() -> dict:
    return studydoc.committed_fit(RUN)


@pytest.fixture(scope="module")
def refit(tmp_path_factory) -> dict:
    return studydoc.refit(RUN, tmp_path_factory.mktemp("fit4"), REFIT)


def test_the_cells_are_the_specs_forty():
    from scaling.plan import plan
    from scaling.spec import load_spec

    rows = csv_rows(RUN / "results.csv")
    keys = {c.key for c in plan(load_spec(REPO / "configs" / "sweeps" / "study4.yaml")).cells}
    assert {r["key"] for r in rows} == keys and len(rows) == 40  # every cell of the spec, none of an earlier one
    assert "finished **all 40 of its cells**" in flat()
    epochs = max(float(r[f"epochs_{s}"]) for r in rows for s in ("caption", "qa", "text"))
    assert f"more than {epochs:.2f} times" in flat()
    params = sorted(int(r["params"]) for r in rows)
    assert f"{params[0] / 1e3:.0f}K to {params[-1] / 1e6:.1f}M matmul parameters" in flat()
    assert f"the best text cell reached {min(float(r['loss_text']) for r in rows):.4f}" in flat()


def test_the_law_table_is_the_refit_and_the_committed_fit(refit, committed):
    table = table_rows(set(LOSSES), 9)
    assert len(table) == 10
    studydoc.check_law_cells(table, committed, refit)
    for (col, recipe), cells in table.items():
        fit = committed[col][recipe]
        assert cells[5] == ("yes" if fit["approach3"]["converged"] else "**no** (E on its bound)")
        assert cells[6] == f"{100 * fit['held_out']['mean_rel_error']:.1f}%"
    for recipe in ("bidirectional", "causal"):  # the headline: the overall law determined for both recipes
        f3 = committed["loss"][recipe]["approach3"]
        assert f3["converged"] and f"{100 * f3['bootstrap_flagged_share']:.0f}%" in flat().split("refits flagged")[0]
    assert "E ends on its lower bound" in flat() and not committed["loss_caption"]["causal"]["approach3"]["converged"]


def test_approach_two_and_the_compute_optimal_sizes_are_the_fit(refit, committed):
    table = table_rows(set(REFIT), 6)
    assert len(table) == 6
    studydoc.check_approach_two(table, committed, refit)
    keys = {"1e14", "3e14", "1e15", "3e15", "3e16"}
    budgets = [line for line in text().splitlines() if line.startswith("| ") and line.split("|")[1].strip() in keys]
    budgets = [line for line in budgets if "| size " not in line]  # not the position checks' headers
    assert len(budgets) == 5
    for line in budgets:
        key = line.split("|")[1].strip().replace("e", "e+")
        cells = [c.strip() for c in line.split("|")[2:6]]
        for recipe, pair in zip(("bidirectional", "causal"), (cells[:2], cells[2:]), strict=True):
            assert tuple(pair) == studydoc.optimal_cells(committed, recipe, key.replace("e+", "e")), (key, recipe)


def test_the_verdict_is_the_fits_multiplier_and_the_cells(committed):
    for col in ("loss", "loss_qa"):
        m = committed[col]["causal"]["compute_multiplier_vs_bidirectional"]
        assert m[0]["from_converged_fits"] and m[0]["share_never"] == 0
        lo, hi = m[0]["interval"]
        assert f"{m[0]['multiplier']:.3g}x" in flat() and f"[{lo:.3g}, {hi:.3g}]" in flat()
    m = committed["loss"]["causal"]["compute_multiplier_vs_bidirectional"]
    assert m[1]["target_flops"] == pytest.approx(10 * m[0]["target_flops"]) and m[1]["share_never"] == 0
    assert (
        f"**{m[1]['multiplier']:.3g}x at 3e16**" in flat()
        and f"[{m[1]['interval'][0]:.3g}, {m[1]['interval'][1]:.3g}]" in flat()
    )
    text_m = committed["loss_text"]["causal"]["compute_multiplier_vs_bidirectional"]
    at_most, never = text_m[0]["interval"][1], 100 * text_m[0]["share_never"]
    assert f"{text_m[0]['multiplier']:.3g}x (at most {at_most:.3g}x; {never:.0f}% never reach)" in flat()
    assert f"{100 * text_m[1]['share_never']:.0f}% never reach)" in flat() and text_m[1]["multiplier"] == 0
    data = read_runs(RUN / "results.csv", ["loss", "loss_caption", "loss_text"], "recipe", flops="6n+attn")
    for col in ("loss", "loss_caption", "loss_text"):
        p = paired_difference(data, col, "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
        lo, hi = p["interval"]
        assert f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]" in flat(), col
    p = paired_difference(data, "loss", "bidirectional", "causal", 0, 0, 0.95)
    assert f"(causal lower in {p['lower_in']}), {p['largest_budget']['mean']:+.4f} at 3e15" in flat()


def test_the_position_check_is_its_csv():
    """The M-RoPE rows are the fourth run's own cells (same keys, same losses); the 1-D RoPE ones ran in the check;
    the table and the means in the prose are the CSV's."""
    from scaling.plan import plan
    from scaling.spec import load_spec

    rows = csv_rows(STUDY / "study4-rope" / "results.csv")
    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study4-rope.yaml")).cells
    assert {r["key"] for r in rows} == {c.key for c in cells} and len(rows) == 16
    study = {r["key"]: r for r in csv_rows(RUN / "results.csv")}
    for r in rows:
        assert (r["key"] in study) == (r["recipe"] in ("bidirectional", "causal"))
        if r["key"] in study:
            assert r == {k: study[r["key"]][k] for k in r}
    by = {(r["recipe"], int(r["size"])): r for r in rows}
    names = {
        "bidirectional, M-RoPE": "bidirectional",
        "causal, M-RoPE": "causal",
        "bidirectional, 1-D RoPE": "bidirectional-rope1d",
        "causal, 1-D RoPE": "causal-rope1d",
    }
    for label, recipe in names.items():
        line = next(line for line in text().splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.split("|")[2:7]]
        assert cells[:4] == [f"{float(by[recipe, n]['loss']):.4f}" for n in range(4, 8)], label
        caption = sorted(float(by[recipe, n]["loss_caption"]) for n in range(4, 8))
        assert cells[4] == f"{caption[0]:.4f}-{caption[-1]:.4f}", label

    def gap(a, b):
        return statistics.mean(float(by[a, n]["loss"]) - float(by[b, n]["loss"]) for n in range(4, 8))

    assert f"bidirectional is worse by a mean {gap('bidirectional', 'causal'):.4f}" in flat()
    assert f"it is **better by {-gap('bidirectional-rope1d', 'causal-rope1d'):.4f}**" in flat()
    assert f"(by a mean {-gap('causal-rope1d', 'causal'):.4f})" in flat()
    lower = [n for n in range(4, 8) if by["bidirectional-rope1d", n]["loss"] < by["causal-rope1d", n]["loss"]]
    assert lower == [4, 6, 7] and "lower at sizes 4, 6 and 7" in flat()
    above = float(by["bidirectional-rope1d", 5]["loss"]) - float(by["causal-rope1d", 5]["loss"])
    assert f"higher by {above:.4f} at 5" in flat()


def test_the_lr_table_is_its_csv():
    checks = lr_check(read_rows(STUDY / "study4-lr-results.csv"))
    lines = [line for line in text().splitlines() if line.startswith("| size ")]
    assert [c["size"] for c in checks] == [1, 2, 3] and len(lines) == 3
    for c, line in zip(checks, lines, strict=True):
        assert [f"{v:.4f}" for v in c["losses"].values()] == [x.strip() for x in line.split("|")[2:7]], line
        assert f"| x{c['best_scale']:g} | {c['rule_excess']:.4f} |" in line and c["rule_within"]


def test_the_gpu_time_is_the_driver_and_util_logs():
    from scaling.gputime import gpu_time, markdown

    t = gpu_time(RUN, peak_tflops=989)
    assert t["cells"] == 40 and t["runs_dated_by_next_start"] == 1
    table = markdown(t).split("\n\n")[0]
    assert table in text()  # the table `python -m scaling time docs/study/study4` prints
    assert f"{t['tokens']:.3g} tokens, {t['tokens_per_s'] / 1e6:.2f}M tokens/s" in flat()
    assert f"**aggregate MFU {100 * t['mfu']:.2f}%**" in flat()
    assert f"The table's {100 * t['train_share']:.1f}% in training steps is **not the study's share**" in flat()
    # the compile inside those steps, from the 21 cell logs of the last call (the others' logs are gone)
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from first_steps import first_window_excess

    logs = sorted((RUN / "logs").glob("*.log"))
    compile_s = {p.stem: first_window_excess(p.read_text()) for p in logs}
    assert (
        len(logs) == 21
        and None not in compile_s.values()
        and set(compile_s) <= {r["key"] for r in csv_rows(RUN / "results.csv")}
    )
    c = sorted(compile_s.values())
    assert (
        f"that is {c[0]:.1f}-{c[-1]:.1f} s a cell, a median {statistics.median(c):.1f} s, {sum(c):.0f} s in all"
        in flat()
    )
    assert f"puts training at **{100 * (t['train_s'] - sum(c)) / t['slot_s']:.1f}%** of the cell" in flat()
    others = 40 - len(c)
    assert f"about {100 * (t['train_s'] - sum(c) - others * statistics.median(c)) / t['slot_s']:.0f}%" in flat()
    fast = [v for v in c if v < 11]
    assert f"Eight of the 21 took {fast[0]:.1f}-{fast[-1]:.1f} s" in flat() and len(fast) == 8
    assert f"the first of each took {c[len(fast)]:.1f}-{c[-1]:.1f} s" in flat()
    assert f"took {t['wall_s'] / 60:.1f} minutes of driver wall time" in flat()
    busy, load, samples = studydoc.util_medians(RUN)
    assert f"busy a median {busy:.0f}% of the {samples} five-second samples" in flat()
    assert f"load average a median {load:.1f} on 16 cores" in flat()


def test_the_interleaved_check_is_its_csv_and_study5_is_study4_interleaved():
    from scaling.plan import plan
    from scaling.spec import load_spec

    rows = csv_rows(STUDY / "study4-mropei" / "results.csv")
    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study4-mropei.yaml")).cells
    assert {r["key"] for r in rows} == {c.key for c in cells} and len(rows) == 12
    study = {r["key"]: r for r in csv_rows(RUN / "results.csv")}
    for r in rows:  # the contiguous rows are the fourth run's cells, the interleaved ones ran in the check
        assert (r["key"] in study) == (r["recipe"] in ("bidirectional", "causal"))
    by = {(r["recipe"], int(r["size"])): r for r in rows}
    for label, recipe in {
        "bidirectional, contiguous M-RoPE": "bidirectional",
        "causal, contiguous M-RoPE": "causal",
        "bidirectional, interleaved M-RoPE": "bidirectional-interleaved",
        "causal, interleaved M-RoPE": "causal-interleaved",
    }.items():
        line = next(line for line in text().splitlines() if line.startswith(f"| {label} |"))
        cells_ = [c.strip() for c in line.split("|")[2:6]]
        assert cells_[:3] == [f"{float(by[recipe, n]['loss']):.4f}" for n in (5, 6, 7)], label
        caption = sorted(float(by[recipe, n]["loss_caption"]) for n in (5, 6, 7))
        assert cells_[3] == f"{caption[0]:.4f}-{caption[-1]:.4f}", label

    def loss(recipe, n, col="loss"):
        return float(by[recipe, n][col])

    gaps = [loss("bidirectional-interleaved", n) - loss("causal-interleaved", n) for n in (5, 6, 7)]
    assert f"(bidirectional higher by {gaps[0]:.4f} and {gaps[1]:.4f})" in flat() and max(gaps[:2]) < 0.001
    assert f"causal is lower by {gaps[2]:.4f}" in flat()
    plateau = [loss("bidirectional-interleaved", n, "loss_caption") for n in (5, 6, 7)]
    assert f"gone at sizes 5 and 6 ({plateau[0]:.4f}, {plateau[1]:.4f})" in flat() and f"({plateau[2]:.4f})" in flat()
    gain = {
        m: statistics.mean(loss(m, n) - loss(f"{m}-interleaved", n) for n in (5, 6, 7))
        for m in ("bidirectional", "causal")
    }
    assert f"bidirectional loss by a mean {gain['bidirectional']:.4f} and the causal by {gain['causal']:.4f}" in flat()
    # the fifth design is the fourth with M-RoPE interleaved and its top budget at 3.2e15 (1.5 decades); the check's
    # interleaved cells are its own
    four = {(c.recipe, c.size, c.budget): c.config for c in plan(load_spec(REPO / "configs/sweeps/study4.yaml")).cells}
    five_cells = plan(load_spec(REPO / "configs/sweeps/study5.yaml")).cells
    five = {(c.recipe, c.size, c.budget.replace("3.2e+15", "3e+15")): c.config for c in five_cells}
    assert four.keys() == five.keys() and len(five) == 40  # the same sizes at every budget
    assert {r["key"] for r in rows if "interleaved" in r["recipe"]} <= {c.key for c in five_cells}
    assert f"({sum(c.minutes for c in five_cells):.0f} process-minutes by `python -m scaling plan`" in flat()
    for k, config in five.items():
        assert config["model"].pop("mrope_interleaved") is True and four[k]["model"].pop("mrope_interleaved") is False
        if k[2] != "flops=3e+15":
            assert {**config, "run_dir": ""} == {**four[k], "run_dir": ""}, k
