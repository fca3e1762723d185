"""docs/study/STUDY.md's section on row stores and the sixth design cannot drift from its data: the step table is the
committed gpu_step JSON's ratios, the store's figures its build logs and loader benchmark, and the cell-by-cell
comparison with the fifth design what the committed results CSVs give."""

from __future__ import annotations

import json
import re
import statistics

from conftest import REPO
from studydoc import csv_rows, flat

STUDY = REPO / "docs" / "study"
DOC = STUDY / "STUDY.md"
PERF = REPO / "docs" / "perf"


def said() -> str:
    return flat(DOC)


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
    new = {**check, **_by_cell(STUDY / "study6" / "results.csv", trained_only=True)}
    assert len(check) == 20 and len(full) == len(new) == 30
    assert sum(bool(r.get("reused_from")) for r in full) == 20
    first, again = _by_cell(STUDY / "study5" / "results.csv"), _by_cell(STUDY / "study5-again" / "results.csv")
    for k, r in new.items():  # the same cells: sizes, budgets, learning rates and steps
        assert (r["steps"], r["lr"], r["rows"]) == (first[k]["steps"], first[k]["lr"], first[k]["rows"])

    def median_abs(a, b):
        return statistics.median(abs(float(a[k]["loss"]) - float(b[k]["loss"])) for k in new)

    assert (
        f"the median absolute difference in final loss is {median_abs(new, first):.4f} from the first run and "
        f"{median_abs(new, again):.4f} from the second, where the two runs of the fifth design differ from each other "
        f"by {median_abs(again, first):.4f}"
    ) in said()

    def cell_time(rows, keys):
        return sum(float(rows[k]["train_s"]) for k in keys)

    assert (
        f"is {cell_time(new, new):,.0f} s against {cell_time(first, new):,.0f} s and {cell_time(again, new):,.0f} s"
        in said()
    )
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
