"""docs/study/STUDY.md (the fifth run) cannot drift from its data: the committed results CSV is refitted with the
repo's fitter, and every table and figure the document gives is what the CSVs, the committed fit.json, the driver
log and the util log give."""

from __future__ import annotations

import statistics

import pytest
import studydoc
from conftest import REPO
from studydoc import csv_rows, flat, row, table_rows

from scaling.paired import paired_difference
from scaling.runs import read_runs

STUDY = REPO / "docs" / "study"
RUN = STUDY / "study5"
DOC = STUDY / "STUDY.md"
LOSSES = ("loss", "loss_caption", "loss_caption_heldout", "loss_qa", "loss_text")
REFIT = ("loss", "loss_caption", "loss_text")  # the issue's three columns, refitted here (the rest: fit.json)
RECIPES = ("bidirectional", "causal")


def said() -> str:
    return flat(DOC)


def rows(path=RUN / "results.csv") -> list[dict]:
    return csv_rows(path)


@pytest.fixture(scope="module")
def committed() -> dict:
    return studydoc.committed_fit(RUN)


@pytest.fixture(scope="module")
def refit(tmp_path_factory) -> dict:
    return studydoc.refit(RUN, tmp_path_factory.mktemp("fit5"), REFIT)


def test_the_cells_are_the_specs_forty_six_of_them_from_the_check():
    from scaling.plan import plan
    from scaling.spec import load_spec

    cells = rows()
    keys = {c.key for c in plan(load_spec(REPO / "configs" / "sweeps" / "study5.yaml")).cells}
    assert {r["key"] for r in cells} == keys and len(cells) == 40
    assert "finished **all 40 of its cells**" in said()
    # the interleaved check's six cells are this study's own: the same keys and numbers, the recipe without a suffix
    check = [r for r in rows(STUDY / "study4-mropei" / "results.csv") if r["recipe"].endswith("-interleaved")]
    mine = {r["key"]: r for r in cells}
    assert len(check) == 6
    for r in check:
        assert {**r, "recipe": r["recipe"].removesuffix("-interleaved")} == {k: mine[r["key"]][k] for k in r}
    assert sum(not r.get("warmup_s") for r in cells) == 6  # only they ran before the trainer timed its first steps
    epochs = max(float(r[f"epochs_{s}"]) for r in cells for s in ("caption", "qa", "text"))
    assert f"more than {epochs:.2f} times" in said()
    params = sorted(int(r["params"]) for r in cells)
    assert f"{params[0] / 1e3:.0f}K to {params[-1] / 1e6:.1f}M matmul parameters" in said()
    assert f"The best text cell reached {min(float(r['loss_text']) for r in cells):.4f}" in said()
    best_caption = min(float(r["loss_caption"]) for r in cells)
    assert f"The best caption cell reached {best_caption:.4f}, {100 * (best_caption / 0.0913 - 1):.0f}% above" in said()

    def caption(budget):
        return sorted(float(r["loss_caption"]) for r in cells if r["budget"] == f"flops={budget}")

    low, high = caption("1e+14"), caption("3.2e+15")
    assert (
        f"({low[0]:.2f}-{low[-1]:.2f} across the 1e14 cells, {high[0]:.3f}-{high[-1]:.3f} across the 3.2e15 ones"
        in said()
    )


def test_the_law_table_is_the_refit_and_the_committed_fit(refit, committed):
    table = table_rows(DOC, set(LOSSES), 10)
    assert len(table) == 10
    studydoc.check_law_cells(table, committed, refit)
    studydoc.check_law_flags(table, committed)
    for recipe in RECIPES:  # the headline: the overall law determined for both recipes
        f3 = committed["loss"][recipe]["approach3"]
        assert f3["converged"] and f3["bootstrap_flagged_share"] == pytest.approx(0.01, abs=0.005)
    errors = [f"{100 * committed['loss'][r]['held_out']['mean_rel_error']:.1f}%" for r in RECIPES]
    assert f"predicted to {errors[0]} (bidirectional) and {errors[1]} (causal)" in said()
    text_e = [committed["loss_text"][r]["approach3"]["E"] for r in RECIPES]
    above = [f"{100 * (e / 1.7269 - 1):.1f}%" for e in text_e]
    assert f"{above[0]} and {above[1]} above the generator's 1.7269" in said()


def test_approach_two_and_the_compute_optimal_sizes_are_the_fit(refit, committed):
    table = table_rows(DOC, set(REFIT), 6)
    assert len(table) == 6
    studydoc.check_approach_two(table, committed, refit)
    for budget in ("1e14", "3e14", "1e15", "3.2e15", "3.2e16"):
        cells = row(DOC, budget)
        for recipe, pair in zip(RECIPES, (cells[:2], cells[2:4]), strict=True):
            assert tuple(pair) == studydoc.optimal_cells(committed, recipe, budget), (budget, recipe)
    # each budget's best cell inside its grid, as the prose says
    best = {}
    for r in rows():
        key = (r["recipe"], r["budget"])
        best.setdefault(key, []).append((float(r["loss"]), int(r["size"])))
    for recipe in RECIPES:
        got = [min(best[recipe, f"flops={b}"])[1] for b in ("1e+14", "3e+14", "1e+15", "3.2e+15")]
        grids = [sorted(s for _, s in best[recipe, f"flops={b}"]) for b in ("1e+14", "3e+14", "1e+15", "3.2e+15")]
        assert got == [3, 3, 5, 6] and all(g[0] < n < g[-1] for n, g in zip(got, grids, strict=True))


def test_the_verdict_is_the_fits_multiplier_and_the_cells(committed):
    m = committed["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    assert m[0]["from_converged_fits"] and m[1]["target_flops"] == pytest.approx(10 * m[0]["target_flops"])
    lo, hi = m[0]["interval"]
    assert lo < 1 < hi  # the tie: the interval holds 1
    assert (
        f"**{m[0]['multiplier']:.3g}x** less compute than causal for causal's loss at 3.2e15 FLOPs (95% interval "
        f"[{lo:.3g}, {hi:.3g}], {100 * m[0]['share_never']:.0f}% of resamples never reach it)" in said()
    )
    assert (
        f"{m[1]['multiplier']:.3g}x (at most {m[1]['interval'][1]:.3g}x; {100 * m[1]['share_never']:.0f}% never "
        "reach" in said()
    )
    studydoc.check_column_verdicts(committed, said())
    cols = ["loss", "loss_caption", "loss_qa", "loss_text"]
    data = read_runs(RUN / "results.csv", cols, "recipe", flops="6n+attn")
    for col, name in zip(cols, ("overall **", "caption ", "QA ", "text "), strict=True):
        p = paired_difference(data, col, "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
        lo, hi = p["interval"]
        stars = "**" if col == "loss" else ""
        assert f"{name}{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]{stars}" in said(), col
    p = paired_difference(data, "loss", "bidirectional", "causal", 0, 0, 0.95)
    top = p["largest_budget"]
    top_said = f"{top['mean']:+.4f} at 3.2e15 (causal lower in {top['lower_in']} of 5)"
    assert f"(causal lower in {p['lower_in']}), {top_said}" in said()
    by = {(r["recipe"], r["budget"], int(r["size"])): float(r["loss"]) for r in rows()}
    gaps = [by["bidirectional", "flops=3.2e+15", n] - by["causal", "flops=3.2e+15", n] for n in range(4, 9)]
    assert max(abs(g) for g in gaps) < 0.01 and "the masks are within 0.01 at every size" in said()
    # the cells on the caption transition, where the masks differ most
    gap = {
        (budget, n): by["bidirectional", f"flops={budget}", n] - by["causal", f"flops={budget}", n]
        for budget, n in (("1e+14", 1), ("3e+14", 1), ("1e+15", 3), ("1e+15", 7))
    }
    g = [f"{v:.3f}" for v in gap.values()]
    assert (
        f"size 1 at 1e14 and 3e14 (bidirectional higher by {g[0]} and {g[1]}), sizes 3 and 7 at 1e15 (by {g[2]} and "
        f"{g[3]})" in said()
    )
    # the masks differ most there: every other shared cell is closer
    others = [
        abs(a - b)
        for (r, bud, n), a in by.items()
        if r == "bidirectional" and (bud[6:], n) not in gap
        for b in [by["causal", bud, n]]
    ]
    assert max(others) < min(abs(v) for v in gap.values())


def test_what_interleaving_changed_is_the_two_csvs():
    four = {(r["recipe"], r["budget"], int(r["size"])): r for r in rows(STUDY / "study4" / "results.csv")}
    five = {(r["recipe"], r["budget"], int(r["size"])): r for r in rows()}
    shared = [k for k in five if k in four]
    assert len(shared) == 30 and {k[1] for k in shared} == {"flops=1e+14", "flops=3e+14", "flops=1e+15"}
    for col, words in (("loss", "overall loss"), ("loss_caption", "caption loss")):
        d = [statistics.mean(float(five[k][col]) - float(four[k][col]) for k in shared if k[0] == r) for r in RECIPES]
        assert d[0] < 0 and d[1] < 0
        if col == "loss":
            assert f"lowered the {words} by a mean {-d[0]:.4f} (bidirectional) and {-d[1]:.4f} (causal)" in said()
        else:
            assert f"the {words} by {-d[0]:.4f} and {-d[1]:.4f}" in said()
    d = [
        statistics.mean(float(five[k]["loss_text"]) - float(four[k]["loss_text"]) for k in shared if k[0] == r)
        for r in RECIPES
    ]
    assert f"the text loss rose by {d[0]:.4f} and {d[1]:.4f}" in said()


def test_the_gpu_time_is_the_driver_results_and_util_logs():
    from scaling.gputime import gpu_time, markdown

    t = gpu_time(RUN, peak_tflops=989)
    assert t["cells"] == 40 and t["runs"] == 4 and t["runs_without_end"] == 0 and t["cells_untimed"] == 6
    table = markdown(t).split("\n\n")[0]
    assert table in DOC.read_text()  # the table `python -m scaling time docs/study/study5` prints
    assert f"{t['tokens']:.3g} tokens, {t['tokens_per_s'] / 1e6:.2f}M tokens/s" in said()
    assert f"**aggregate MFU {100 * t['mfu']:.2f}%**" in said()
    assert f"**{100 * t['train_share']:.1f}% in training steps is an upper bound" in said()
    assert f"took {t['wall_s'] / 60:.1f} minutes of driver wall time" in said()
    warm = sorted(float(r["warmup_s"]) for r in rows() if r["warmup_s"])
    first, cached = [w for w in warm if w > 40], [w for w in warm if w < 15]
    assert len(first) == 16 and len(cached) == 16  # the 16 shapes (8 sizes x 2 masks): one compile each
    assert len({(r["recipe"], r["micro_rows"], r["size"]) for r in rows()}) == 16
    assert f"compiled for {first[0]:.1f}-{first[-1]:.1f} s" in said()
    assert f"took {cached[0]:.1f}-{cached[-1]:.1f} s" in said()
    middle = [w for w in warm if 15 <= w <= 40]
    assert f"two took {middle[0]:.1f} and {middle[1]:.1f} s" in said()
    busy, load, samples = studydoc.util_medians(RUN)
    assert f"busy a median {busy:.0f}% of the {samples} five-second samples" in said()
    assert f"load average a median {load:.1f} on 16 cores" in said()


def test_the_lr_check_reuses_the_studys_own_cells(tmp_path):
    """configs/sweeps/study5-lr.yaml's factor-1 cells are the fifth run's (same configs, same keys):
    `scaling run --reuse` copies their rows under the check's recipe name, so they count as finished and only the
    other factors train; copying again adds nothing."""
    from scaling.plan import plan
    from scaling.results import adopt, finished, recorded_keys
    from scaling.spec import load_spec

    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study5-lr.yaml")).cells
    assert adopt(tmp_path, cells, RUN / "results.csv") == 6
    assert adopt(tmp_path, cells, RUN / "results.csv") == 0
    recorded = recorded_keys(tmp_path)
    done = [c for c in cells if finished(c, recorded)]
    assert sorted((c.budget, c.size) for c in done) == [("flops=1e+14", n) for n in (1, 2, 3)] + [
        ("flops=1e+15", n) for n in (4, 5, 6)
    ]
    assert {c.lr_scale for c in done} == {1} and len(cells) == 30
    from scaling.gputime import gpu_time, markdown

    t = gpu_time(tmp_path)  # their device time was the study's: this sweep's account leaves them out
    assert t["cells"] == 0 and t["cells_reused"] == 6 and "no cell of this sweep's own" in markdown(t)
    study = {r["key"]: r for r in rows()}
    for r in rows(tmp_path / "results.csv"):
        mine = study[r["key"]]
        assert r["recipe"] == "bidirectional@lr1" and r.pop("reused_from") == str(RUN / "results.csv")
        assert {**r, "recipe": "bidirectional"} == {**dict.fromkeys(r, ""), **mine}


def test_the_calibrated_plan_is_the_runs():
    from scaling.spec import load_spec
    from scaling.throughput import calibrate, errors, measured

    cells = measured(RUN / "results.csv")
    t = load_spec(REPO / "configs" / "sweeps" / "study5.yaml").throughput
    guessed, fit = errors(cells, t.flops_per_s, t.step_s, t.startup_s), calibrate(cells)
    fitted = errors(cells, **fit)
    assert f"planned {guessed['planned_min']:.1f} process-minutes for these cells; they took" in said()
    assert f"took {fitted['measured_min']:.1f} (start-up and training" in said()
    assert (
        f"{fit['flops_per_s']:.3g} model FLOP/s a process, {fit['step_s']:.3g} s a step at least, "
        f"{fit['startup_s']:.3g} s of start-up, which plan {fitted['planned_min']:.1f} process-minutes, each cell "
        f"within {100 * fitted['median_abs_error']:.0f}% (median; the guessed constants: "
        f"{100 * guessed['median_abs_error']:.0f}%)" in said()
    )
    lr = load_spec(REPO / "configs" / "sweeps" / "study5-lr.yaml").throughput
    assert (lr.flops_per_s, lr.step_s, lr.startup_s) == (
        float(f"{fit['flops_per_s']:.3g}"),
        float(f"{fit['step_s']:.3g}"),
        float(f"{fit['startup_s']:.3g}"),
    )


LR = STUDY / "study5-lr"
GATE = STUDY / "compile-gate"


def test_the_lr_check_table_is_both_runs_of_its_cells():
    from scaling.lrcheck import lr_check, read_rows

    first, repeat = read_rows(LR / "results.csv"), read_rows(GATE / "results.csv")
    checks = lr_check(first + repeat)
    assert len(checks) == 6
    for c in checks:
        line = row(DOC, f"size {c['size']}, {c['budget'][6:]}")
        assert line == [f"{v:.4f}" for v in c["losses"].values()] + [f"x{c['best_scale']:g}", f"{c['rule_excess']:.4f}"]
        twice = c["size"] < 4  # the 1e14 cells ran again, all but the rule's (the study's own)
        assert c["rule_within"] and c["runs"] == {s: 2 if twice and s != 1 else 1 for s in c["runs"]}
    assert "**The rule's LR is within 2x of the best factor at all six sizes**" in said()
    for rows_ in (first, repeat):
        assert all(c["rule_within"] for c in lr_check(rows_, "loss_text"))
    one, two = lr_check(first)[0], lr_check(repeat)[0]
    assert (one["size"], one["best_scale"], one["rule_within"]) == (1, 2.0, True)
    assert (two["size"], two["best_scale"], two["rule_within"]) == (1, 4.0, False)
    assert f"x2 (the rule within 2x, {one['rule_excess']:.4f} behind)" in said()
    assert f"x4, the edge of those tried (outside 2x, {two['rule_excess']:.4f} behind)" in said()
    assert f"Sizes 2-6 lose at most {max(c['rule_excess'] for c in checks[1:]):.4f}" in said()
    caption = sorted(float(r["loss_caption"]) for r in first + repeat if r["size"] == "1" and r["lr_scale"] != "1.0")
    assert len(caption) == 8 and caption[5] < 0.7 < caption[6]
    assert f"{caption[0]:.3f}-{caption[5]:.3f} in six of the eight runs" in said()
    assert f"{caption[6]:.3f} and {caption[7]:.3f} in two" in said()
    rule = next(r for r in first if r["size"] == "1" and r["lr_scale"] == "1.0")
    assert f"and {float(rule['loss_caption']):.3f} in the rule's one run" in said()


def test_run_to_run_differences_are_the_two_csvs():
    from scaling.repeats import repeats

    found = repeats(LR / "results.csv", GATE / "results.csv")
    assert "`python -m scaling repeats docs/study/study5-lr/results.csv docs/study/compile-gate/results.csv`" in said()
    d = found["losses"]["loss"]
    assert f"overall validation loss by a median {d['median_abs']:.4f} (at most {d['max_abs']:.4f}" in said()
    w = found["warmup_s"]
    assert f"{w['first']['sum']:.1f} s in all against {w['again']['sum']:.1f} s now" in said()
    again = {r["key"]: r for r in rows(GATE / "results.csv") if not r["reused_from"]}
    before = {r["key"]: r for r in rows(LR / "results.csv")}
    assert len(again) == 12
    for k, r in again.items():  # the same cells: same steps and tokens, the same seed
        assert (r["steps"], r["tokens"], r["seed"], r["lr"]) == tuple(
            before[k][c] for c in ("steps", "tokens", "seed", "lr")
        )
    for col, words in (
        ("loss", "overall validation loss"),
        ("loss_caption", "caption loss"),
        ("loss_text", "text loss"),
    ):
        d = [abs(float(again[k][col]) - float(before[k][col])) for k in again]
        assert f"the {words} by a median {statistics.median(d):.4f} (at most {max(d):.4f}" in said()
    d = [abs(float(again[k]["loss"]) - float(before[k]["loss"])) for k in again]
    assert statistics.median(d) > 0.0101  # "smaller than the median change of one cell between two runs"


def test_the_compile_gate_figures_are_its_run():
    from scaling.gputime import gpu_time, markdown

    for run in (LR, GATE):
        assert markdown(gpu_time(run, peak_tflops=989)).split("\n\n")[0] in DOC.read_text()
    again = {r["key"]: float(r["warmup_s"]) for r in rows(GATE / "results.csv") if not r["reused_from"]}
    before = {r["key"]: float(r["warmup_s"]) for r in rows(LR / "results.csv") if r["key"] in again}
    first, rest = sorted(again.values())[-3:], sorted(again.values())[:-3]
    assert min(first) > 4 * max(rest)  # one compile per shape, three shapes
    nine = f"the nine others in {rest[0]:.1f}-{rest[-1]:.1f} s"
    assert f"compiled in {first[0]:.1f}-{first[-1]:.1f} s, three at once; {nine}" in said()
    b = sorted(before.values())
    assert (
        f"took {b[0]:.1f}-{b[-1]:.1f} s each, {sum(b):.1f} s in all against {sum(again.values()):.1f} s now" in said()
    )
    allcheck = [float(r["warmup_s"]) for r in rows(LR / "results.csv") if not r["reused_from"]]
    assert f"none in less than {min(allcheck):.1f} s" in said()
    launched = [
        float(line.split()[0])
        for line in (GATE / "gate.log").read_text().splitlines()
        if line.strip() and line.split()[0].replace(".", "").isdigit() and len(line.split()) == 6
    ]
    assert len(launched) == 12 and launched.count(0.0) == 3
    assert f"five slots waited {sorted(launched)[3]:.1f} s for the first compiles" in said()
    t = gpu_time(GATE, peak_tflops=989)
    assert f"Start-up is now a median {t['startup_median_s']:.1f} s a cell" in said()


AGAIN = STUDY / "study5-again"


def test_the_second_run_is_the_same_cells_in_less_gpu_time():
    from scaling.gputime import gpu_time, markdown
    from scaling.repeats import repeats

    first, again = {r["key"]: r for r in rows()}, {r["key"]: r for r in rows(AGAIN / "results.csv")}
    assert set(again) == set(first) and len(again) == 40
    for k, r in again.items():  # the same cells: same steps, tokens, seed and LR
        assert tuple(r[c] for c in ("steps", "tokens", "seed", "lr")) == tuple(
            first[k][c] for c in ("steps", "tokens", "seed", "lr")
        )
    t, t1 = gpu_time(AGAIN, peak_tflops=989), gpu_time(RUN, peak_tflops=989)
    assert (t["runs"], t["runs_without_end"], t["cells"], t["cells_untimed"]) == (3, 0, 40, 0)
    assert markdown(t).split("\n\n")[0] in DOC.read_text()
    assert t["train_share"] >= 0.8
    assert (
        f"**The whole study took {t['wall_s'] / 60:.1f} minutes of driver wall time, and "
        f"{100 * t['train_share']:.1f}% of the GPU's cell slots went to training steps**, against "
        f"{t1['wall_s'] / 60:.1f} minutes and at most {100 * t1['train_share']:.1f}%" in said()
    )
    assert f"{t['tokens']:.3g} tokens, {t['tokens_per_s'] / 1e6:.2f}M tokens/s of wall time" in said()
    assert f"**aggregate MFU {100 * t['mfu']:.2f}%** (the first run: {100 * t1['mfu']:.2f}%)" in said()
    assert f"steps themselves took {t['steps_s']:.0f} s where the first run's took {t1['steps_s']:.0f} s" in said()
    log = (AGAIN / "data.log").read_text()
    built = log.split("training samples in ")[1].split(" s")[0], log.split("prepared in ")[1].split(" s")[0]
    minutes, seconds = log.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split()[0].split(":")
    assert f"1.8M training samples in {built[0]} s, the prepared copy in {built[1]} s, " in said()
    assert f"{60 * int(minutes) + float(seconds):.0f} s in all with the tokenizer" in said()
    busy, load, samples = studydoc.util_medians(AGAIN)
    assert f"busy a median {busy:.0f}% of {samples} five-second samples, load average a median {load:.1f}" in said()
    # start-up: on a warm worker a cell skips the interpreter and the imports; a fresh worker's first cell pays them
    cells = list(again.values())
    warm = [r for r in cells if float(r["startup_launch_s"]) < 1]
    cold = [r for r in cells if float(r["startup_launch_s"]) >= 1]
    assert min(float(r["startup_launch_s"]) for r in cold) > 10 * max(float(r["startup_launch_s"]) for r in warm)

    def span(rs, col, fmt):
        return f"{min(float(r[col]) for r in rs):{fmt}}-{max(float(r[col]) for r in rs):{fmt}}"

    assert (
        f"The {len(warm)} cells that started on a warm worker began training {span(warm, 'startup_s', '.2f')} s after "
        f"the driver handed them over** (launch {span(warm, 'startup_launch_s', '.2f')} s; the engine "
        f"{span(warm, 'startup_engine_s', '.2f')} s); the {len(cold)} that started a fresh worker" in said()
    )
    assert f"took {span(cold, 'startup_s', '.1f')} s, {span(cold, 'startup_launch_s', '.1f')} s of it" in said()
    assert f"The median over all forty, {statistics.median(float(r['startup_s']) for r in cells):.1f} s" in said()
    assert f"(a cell on one starts training {span(warm, 'startup_s', '.2f')} s after it is handed over)" in said()
    cold_s = [float(r["startup_s"]) for r in cold]
    assert f"still pays {min(cold_s):.0f}-{max(cold_s):.0f} s" in said()
    # one compile per shape: the eight first compiles are the eight (size, micro-batch) shapes, all bidirectional
    slow = [r for r in cells if float(r["warmup_s"]) > 40]
    assert len(slow) == 8 and len({(r["size"], r["micro_rows"]) for r in slow}) == 8
    assert {r["recipe"] for r in slow} == {"bidirectional"}
    assert f"**the eight first compiles ({span(slow, 'warmup_s', '.1f')} s) were the eight shapes**" in said()
    rest = [r for r in cells if float(r["warmup_s"]) <= 40]
    assert f"the other 32 cells took {span(rest, 'warmup_s', '.1f')} s of first steps" in said()
    found = repeats(RUN / "results.csv", AGAIN / "results.csv")
    w = found["warmup_s"]
    assert f"First steps {w['again']['sum']:.1f} s in all against {w['first']['sum']:.1f} s" in said()
    d = found["losses"]
    assert (
        f"the overall validation loss moved by a median {d['loss']['median_abs']:.4f} (at most "
        f"{d['loss']['max_abs']:.4f}, causal size 1 at 3e14), the caption loss by a median "
        f"{d['loss_caption']['median_abs']:.4f} (at most {d['loss_caption']['max_abs']:.4f}), the text loss by a "
        f"median {d['loss_text']['median_abs']:.4f} (at most {d['loss_text']['max_abs']:.4f})" in said()
    )


def test_the_second_runs_laws_and_verdict_are_its_fit(tmp_path):
    committed = {run: studydoc.committed_fit(STUDY / run) for run in ("study5", "study5-again")}
    refitted = studydoc.refit(AGAIN, tmp_path, ("loss",))
    for recipe in RECIPES:  # the committed fit is the CSV's
        for name in ("E", "A", "B", "alpha", "beta"):
            assert refitted["loss"][recipe]["approach3"][name] == pytest.approx(
                committed["study5-again"]["loss"][recipe]["approach3"][name], rel=6e-4
            )
    labels = {f"{col}, {recipe}" for col in REFIT for recipe in RECIPES}
    table = {k: v for k, v in table_rows(DOC, labels, 9).items() if k[1] in ("first", "again")}
    assert len(table) == 12
    for (label, run), cells in table.items():
        col, recipe = label.split(", ")
        fit = committed["study5" if run == "first" else "study5-again"][col][recipe]
        f3, interval = fit["approach3"], fit["approach3"]["interval"]
        optimal = next(v for k, v in fit["compute_optimal"].items() if k.startswith("3.2e+15"))
        assert cells == [
            *(f"{f3[k]:.3g} [{interval[k][0]:.3g}, {interval[k][1]:.3g}]" for k in ("E", "alpha", "beta")),
            "yes" if f3["converged"] else "no",
            f"{100 * fit['held_out']['mean_rel_error']:.1f}%",
            f"{optimal['N']:.3g}",
            f"{optimal['tokens_per_param']:.0f}",
        ], (label, run)
    for run in committed.values():
        assert all(run["loss"][r]["approach3"]["converged"] for r in RECIPES)
    m = committed["study5-again"]["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    assert m[0]["from_converged_fits"] and m[0]["interval"][0] < 1 < m[0]["interval"][1]  # the tie, again
    assert (
        f"bidirectional needs **{m[0]['multiplier']:.3g}x** less compute than causal for causal's loss at 3.2e15, "
        f"that is about twice as much (95% interval: at most {m[0]['interval'][1]:.3g}x; "
        f"{100 * m[0]['share_never']:.0f}% of resamples never reach it)" in said()
    )
    assert 1.8 < 1 / m[0]["multiplier"] < 2.2
    assert f"(bidirectional {m[0]['multiplier']:.3g}x, at most {m[0]['interval'][1]:.3g}x)" in said()  # the status
    far = f"at most {m[1]['interval'][1]:.3g}x, {100 * m[1]['share_never']:.0f}% never"
    assert m[1]["multiplier"] == 0 and far in said()
    data = read_runs(AGAIN / "results.csv", ["loss"], "recipe", flops="6n+attn")
    p = paired_difference(data, "loss", "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
    lo, hi = p["interval"]
    top = p["largest_budget"]
    assert lo < 0 < hi and abs(p["mean"]) < 0.0164
    assert (
        f"**{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]** over the 20 shared cells (causal lower in {p['lower_in']}), "
        f"{top['mean']:+.4f} at 3.2e15 (causal lower in {top['lower_in']} of 5)" in said()
    )


def test_the_rules_size_one_cell_twice_and_the_step_table():
    import json

    from scaling.lrcheck import lr_check, read_rows

    again = read_rows(AGAIN / "results.csv")
    rule = next(r for r in again if (r["recipe"], r["size"], r["budget"]) == ("bidirectional", "1", "flops=1e+14"))
    before = next(r for r in rows() if r["key"] == rule["key"])
    assert (
        f"loss {float(rule['loss']):.4f} and caption loss {float(rule['loss_caption']):.3f}, against "
        f"{float(before['loss']):.4f} and {float(before['loss_caption']):.3f} the first time" in said()
    )
    checks = lr_check(read_rows(LR / "results.csv") + read_rows(GATE / "results.csv") + again)
    assert all(c["rule_within"] for c in checks) and len(checks) == 6
    one = checks[0]
    assert one["size"] == 1 and set(one["runs"].values()) == {2}  # every 1e14 factor run twice now
    assert f"at size 1 the best x{one['best_scale']:g} and the rule {one['rule_excess']:.4f} behind" in said()
    repeats = [r for r in read_rows(GATE / "results.csv") if not r["reused_from"]] + again
    alone = lr_check(repeats)[0]
    assert (alone["best_scale"], alone["rule_within"]) == (4.0, False)
    assert f"size 1's best at x4 (the rule {alone['rule_excess']:.4f} behind, outside 2x)" in said()
    assert all(c["rule_within"] for c in lr_check(repeats, "loss_text"))
    steps = json.loads((REPO / "docs" / "perf" / "study_step3_h200.json").read_text())
    ratios = []
    for depth in (1, 3, 5, 8):
        ours = next(s for s in steps if s["depth"] == depth and s["variant"] != "reference")
        ref = next(s for s in steps if s["depth"] == depth and s["variant"] == "reference")
        assert ours["data"] == "loader" and ours["torchengine"] and ours["rows"] == ref["rows"]
        ratios.append(ours["tokens_per_s"] / ref["tokens_per_s"])
        assert row(DOC, f"{depth}, {ours['rows']}") == [
            f"{ours['step_ms']:.1f}",
            f"{ours['tokens_per_s']:,.0f}",
            f"{ref['tokens_per_s']:,.0f}",
            f"{ratios[-1]:.2f}x",
        ]
    assert max(ratios) < 1 and f"steps at {min(ratios):.2f}-{max(ratios):.2f}x the plain compiled GPT" in said()
    assert f"a study cell alone steps at {min(ratios):.2f}-{max(ratios):.2f}x a plain compiled GPT" in said()


def test_the_captured_step_table_and_the_trainer_runs():
    """The CUDA-graph section: each ratio is its variant's tokens/s over the plain GPT's of the same process
    (docs/perf/study_step4_h200.json), the claims follow from them, and the trainer figures are its logs'."""
    import json

    steps = json.loads((REPO / "docs" / "perf" / "study_step4_h200.json").read_text())
    kinds = ["torchengine:loader", "graph:loader", "graph:loader:@data.workers=6", "graph:cached"]
    ratios = {}
    for depth in (1, 3, 5, 8):
        mine = [s for s in steps if s["depth"] == depth]
        ref = next(s for s in mine if s["variant"] == "reference")
        got = []
        for kind in kinds:
            r = next(s for s in mine if s["variant"].removeprefix("flex:").startswith(kind + ":rows"))
            assert r["rows"] == ref["rows"] and r["graph"] == kind.startswith("graph")
            got.append(r["tokens_per_s"] / ref["tokens_per_s"])
        ratios[depth] = got
        cells = [f"{x:.2f}x" for x in got] + [f"{ref['tokens_per_s']:,.0f}"]
        line = f"| {depth}, {ref['rows']} | " + " | ".join(cells) + " |"
        assert line in DOC.read_text().splitlines(), line
    eager = next(s for s in steps if s["depth"] == 8 and not s.get("graph") and s["variant"] != "reference")["profile"]
    assert (
        f"launches {eager['kernels_per_step']:.0f} kernels, and the GPU is busy {eager['gpu_busy_ms_per_step']:.1f} ms "
        f"of a profiled step of {eager['wall_ms_per_step']:.1f} ms" in said()
    )
    waiting = [s for s in steps if s["depth"] in (1, 3) and s.get("graph") and s.get("data") == "loader"]
    fed = [round(s["tokens_per_s"] / 512, -2) for s in waiting]  # rows of 512 a second, to the hundred
    waits = [s["loader_wait_ms"] for s in waiting]
    assert f"waits {min(waits):.1f}-{max(waits):.1f} ms a step" in said()
    assert f"the loader delivers {min(fed):,.0f}-{max(fed):,.0f} rows of 512 a second" in said()
    assert all(ratios[d][3] > 1 for d in (1, 3, 5)) and ratios[8][3] < 1  # cached: the step itself
    cached = sorted(ratios[d][3] for d in (1, 3, 5))
    assert f"ran at {cached[0]:.2f}-{cached[-1]:.2f}x the plain GPT" in studydoc.flat(REPO / "docs" / "PERFORMANCE.md")
    assert f"and {ratios[8][3]:.2f}x at depth 8" in studydoc.flat(REPO / "docs" / "PERFORMANCE.md")
    eager_loader = sorted(ratios[d][0] for d in (1, 3, 5, 8))
    assert f"(eager, with the loader, {eager_loader[0]:.2f}-{eager_loader[-1]:.2f}x)" in studydoc.flat(
        REPO / "README.md"
    )
    # the pinning thread's walk, from the profile of the captured depth-1 step with the loader (its second cProfile)
    profile = (REPO / "docs" / "perf" / "study_step_profile_d1_h200.txt").read_text().split("function calls")[2]
    walk = next(line.split() for line in profile.splitlines() if "pin_memory.py:55(pin_memory)" in line)
    pinned = int(next(line.split()[0] for line in profile.splitlines() if "(do_one_step)" in line))
    calls, seconds = int(walk[0].split("/")[0]), float(walk[3])
    assert f"{calls:,} calls and {seconds:.3f} s over the {pinned} batches it pinned" in said()
    per_batch = f"{round(calls / pinned, -2):,.0f} Python objects a 64-row batch, {1000 * seconds / pinned:.0f} ms"
    assert f"about {per_batch} a batch under cProfile" in said()
    scaling = (REPO / "docs" / "perf" / "loader_scaling_study_h200.txt").read_text().splitlines()
    per_count = [f"{float(line.split()[2]):,.0f}" for line in scaling if "workers:" in line]
    assert f"gave {', '.join(per_count[:-1])} and {per_count[-1]} rows a second" in said()
    assert f"the loader's {min(fed) / 1000:.1f}-{max(fed) / 1000:.1f}k rows a second" in studydoc.flat(
        REPO / "docs" / "PERFORMANCE.md"
    )
    assert ratios[5][2] > 1 > max(ratios[1][2], ratios[3][2], ratios[8][2])  # with the loader: depth 5 only
    assert f"**With the loader, 1.0x is met at depth 5 only** ({ratios[5][2]:.2f}x with six workers" in said()
    tiles = json.loads((REPO / "docs" / "perf" / "study_step4_tiles_h200.json").read_text())
    ref = next(t for t in tiles if t["variant"] == "reference")["tokens_per_s"]
    default, *others = [t["tokens_per_s"] / ref for t in tiles if t["variant"] != "reference"]
    assert len(others) == 6 and max(others) < default
    tried = f"({min(others):.2f}-{max(others):.2f}x against torch's defaults' {default:.2f}x"
    assert f"slower, all six tried {tried}" in said()
    masks = json.loads((REPO / "docs" / "perf" / "study_step4_mask_h200.json").read_text())
    ref = next(t for t in masks if t["variant"] == "reference")["tokens_per_s"]
    coarse, same_tiles, fine = [
        (t["mask_block"], t["tokens_per_s"] / ref) for t in masks if t["variant"] != "reference"
    ]
    assert coarse[0] == same_tiles[0] == 128 and fine[0] == 64 and fine[1] > max(coarse[1], same_tiles[1])
    assert f"ran at **{fine[1]:.2f}x** where the same tiles at 128 ran at {same_tiles[1]:.2f}x" in said()
    assert "(0.93x on cached batches with the finer mask)" in said() and f"{fine[1]:.2f}" == "0.93"
    runs = REPO / "docs" / "perf" / "graph_trainer_h200"
    logged = {}
    for g in ("false", "true"):
        records = [json.loads(x) for x in (runs / f"g{g}-metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "loss" in r][-1]
        summary = json.loads((runs / f"g{g}-summary.json").read_text())
        logged[g] = (last["step"], last["loss"], last["tokens_per_s"] / 1e6, summary["first_steps_s"])
    assert logged["true"][0] == logged["false"][0] == 300
    assert abs(logged["true"][1] - logged["false"][1]) < 0.0164  # within the study's run-to-run median
    t, f = logged["true"], logged["false"]
    assert (
        f"final loss {t[1]:.4f} captured against {f[1]:.4f} eager, {t[2]:.2f}M against {f[2]:.2f}M tokens/s "
        f"in the last logging window, the first five steps {t[3]:.1f} s against {f[3]:.1f} s" in said()
    )


def test_the_rotary_step_table_and_the_hosts_cores():
    """The section after the rotary tables became one op: each ratio is its variant's tokens/s over the plain GPT's
    of the same process (docs/perf/study_step5_h200.json), the loader's rows/s its tokens/s over 512, and the host's
    throughput the independent processes' sums (docs/perf/host_cores_h200.json); the summaries agree."""
    import json

    steps = json.loads((REPO / "docs" / "perf" / "study_step5_h200.json").read_text())
    cached, loader = {}, {}
    for depth in (1, 3, 5, 8):
        mine = [s for s in steps if s["depth"] == depth]
        ref = next(s for s in mine if s["variant"] == "reference")
        c = next(s for s in mine if s["variant"].startswith("flex:graph:cached:"))
        f = next(s for s in mine if s["variant"].startswith("flex:graph:loader:@data.workers=6:"))
        assert c["rows"] == f["rows"] == ref["rows"] and c["graph"] and f["graph"]
        cached[depth], loader[depth] = c["tokens_per_s"] / ref["tokens_per_s"], f["tokens_per_s"] / ref["tokens_per_s"]
        cells = [f"{cached[depth]:.2f}x", f"{loader[depth]:.2f}x", f"{f['tokens_per_s'] / 512:,.0f}"]
        line = f"| {depth}, {ref['rows']} | " + " | ".join(cells) + f" | {ref['tokens_per_s']:,.0f} |"
        assert line in DOC.read_text().splitlines(), line
    assert min(round(x, 2) for x in cached.values()) >= 1.0 and max(loader.values()) < 1
    ordered = sorted(cached.values())
    assert f"reaches {ordered[0]:.2f}-{ordered[-1]:.2f}x" in said()
    fed = sorted(loader.values())
    assert f"fed by the real loader {fed[0]:.2f}-{fed[-1]:.2f}x" in said()
    assert f"at none of them ({fed[0]:.2f}-{fed[-1]:.2f}x)" in said()
    perf = studydoc.flat(REPO / "docs" / "PERFORMANCE.md")
    assert f"with the loader {fed[0]:.2f}-{fed[-1]:.2f}x" in perf
    by_depth = ", ".join(f"{cached[d]:.2f}x" for d in (1, 3, 5))
    assert f"on cached batches {by_depth} and {cached[8]:.2f}x the plain GPT at depths 1, 3, 5 and 8" in perf
    eight = [s for s in steps if s["depth"] == 8]
    a = next(s for s in eight if s["variant"].startswith("flex:graph:cached:"))
    b = next(s for s in eight if s["variant"] == "reference")
    assert f"takes {a['step_ms']:.2f} ms, the plain GPT's {b['step_ms']:.2f} ms" in said() and "graph" in a["variant"]
    assert f"({a['tokens_per_s']:,.0f} against {b['tokens_per_s']:,.0f} tokens/s)" in said()
    d1 = next(s for s in steps if s["depth"] == 1 and s["variant"] == "reference")
    eats = f"{round(d1['tokens_per_s'] / 512, -2):,.0f}"
    assert f"eats 64 rows in {d1['step_ms']:.2f} ms here ({eats} rows a second)" in said()
    host = json.loads((REPO / "docs" / "perf" / "host_cores_h200.json").read_text())
    sums = [f"{r['rows_per_s']:,.0f}" for r in host["independent"]]
    counts = [str(r["processes"]) for r in host["independent"]]
    assert (
        f"{', '.join(sums[:-1])} and {sums[-1]} rows a second for {', '.join(counts[:-1])} and {counts[-1]}" in said()
    )
    assert (
        f"({sums[-1]} rows a second from {counts[-1]} independent processes, where a plain depth-1 step eats {eats})"
        in (said())
    )
    assert f"give {sums[-1]} rows a second on that 16-core machine, 4 give {sums[2]}" in perf and counts[2] == "4"
    # the second look: the CPU time a row by process count, the allocator variant, and pure arithmetic
    again = json.loads((REPO / "docs" / "perf" / "host_cores2_h200.json").read_text())
    rows = again["default"]
    assert [r["processes"] for r in rows] == [1, 4, 8, 16]
    assert "gave " + ", ".join(
        f"{r['rows_per_s']:,.0f}" for r in rows[:-1]
    ) + f" and {rows[-1]['rows_per_s']:,.0f}" in (said())
    user = [f"{r['user_ms_per_row']:.3f}" for r in rows[1:]]
    assert f"**{user[0]} ms of user CPU a row with 4 processes, {user[1]} with 8 and {user[2]} with 16**" in said()
    assert rows[1]["user_ms_per_row"] * 2 < rows[3]["user_ms_per_row"]  # two to three times
    system = sorted(r["sys_ms_per_row"] for r in rows)
    faults = sorted(r["minor_faults_per_row"] for r in rows)
    assert f"(system time {system[0]:.3f}-{system[-1]:.3f} ms, {faults[0]:.1f}-{faults[-1]:.1f} page faults a row)" in (
        said()
    )
    tuned = again["malloc_env"]["rows"]
    tuned_faults = sorted(r["minor_faults_per_row"] for r in tuned)
    assert f"cut the page faults to {tuned_faults[0]:.1f}-{tuned_faults[-1]:.1f} a row" in said()
    assert f"did not help ({tuned[-1]['rows_per_s']:,.0f} rows a second at 16)" in said()
    assert tuned[-1]["rows_per_s"] < rows[-1]["rows_per_s"]
    spin = {int(x.split()[0]): float(x.split()[2].replace(",", "")) for x in again["spin"]["lines"]}
    assert f"ran {spin[16] / spin[1]:.1f}x one process's rate" in said()


def test_both_runs_fitted_together_are_their_fit(tmp_path):
    """The pooled fit reads both CSVs; its table, verdict and cell-by-cell difference (each cell at the mean of its
    two runs) are what the committed fit.json and the CSVs give."""
    import json

    both = studydoc.committed_fit(STUDY / "study5-both")
    fit = json.loads((STUDY / "study5-both" / "fit" / "fit.json").read_text())
    assert fit["runs"] == 80 and fit["csv"] == [
        str(RUN / "results.csv").removeprefix(str(REPO) + "/"),
        str(AGAIN / "results.csv").removeprefix(str(REPO) + "/"),
    ]
    labels = {f"{col}, {r}" for col in LOSSES for r in RECIPES}
    table = {k: v for k, v in table_rows(DOC, labels, 9).items() if "[" in k[1]}  # the pooled table: E second
    assert len(table) == 10
    for (label, e_cell), cells in table.items():
        col, recipe = label.split(", ")
        assert [e_cell, *cells] == studydoc.pooled_cells(both[col][recipe]), label
        assert both[col][recipe]["approach3"]["converged"]
    assert "**Every law converged**, all ten" in said()
    m = both["loss"]["bidirectional"]["compute_multiplier_vs_causal"]
    lo, hi = m[0]["interval"]
    assert lo < 1 < hi
    assert (
        f"**bidirectional needs {m[0]['multiplier']:.3g}x less compute than causal for causal's loss at 3.2e15** "
        f"(95% interval [{lo:.3g}, {hi:.3g}], {100 * m[0]['share_never']:.0f}% of resamples never reach it)" in said()
    )
    assert (
        f"{m[1]['multiplier']:.3g}x at 3.2e16 extrapolated (at most {m[1]['interval'][1]:.3g}x; "
        f"{100 * m[1]['share_never']:.0f}% never reach)" in said()
    )
    assert f"causal is at most {1 / lo:.1f}x cheaper and bidirectional at most {hi:.2f}x cheaper" in said()
    data = read_runs([RUN / "results.csv", AGAIN / "results.csv"], ["loss"], "recipe", flops="6n+attn")
    p = paired_difference(data, "loss", "bidirectional", "causal", bootstrap=300, seed=0, level=0.95)
    assert p["cells"] == 20
    text = f"{p['mean']:+.4f} [{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}]"
    assert f"**{text}** over the 20 cells (causal lower in {p['lower_in']})" in said()
    status = f"bidirectional {m[0]['multiplier']:.3g}x [{lo:.3g}, {hi:.3g}] at 3.2e15, causal minus bidirectional "
    status += text
    assert status in said()
    # the refit reads both CSVs and gives the committed points
    refitted = studydoc.refit_csvs([RUN / "results.csv", AGAIN / "results.csv"], tmp_path, ("loss",))
    for recipe in RECIPES:
        for name in ("E", "alpha", "beta"):
            assert refitted["loss"][recipe]["approach3"][name] == pytest.approx(
                both["loss"][recipe]["approach3"][name], rel=6e-4
            )
