"""Scaling-law sweeps from a spec, and fits of any CSV of runs.

    python -m scaling plan   SPEC     # the cells: N, D, FLOPs (both conventions), batch split, LR, time; warnings
    python -m scaling store  SPEC     # a spec whose cells read a row store (data.rows): build it, sized for them
    python -m scaling run    SPEC     # locally (CPU, or spread over this host's GPUs) or as SLURM arrays
                                     [--launch-for SECONDS]  # local: start no cell after that; rerun to go on
                                     [--reuse OTHER/results.csv]  # its rows of this spec's cells count as run
    python -m scaling fit    SPEC     # fit OUT/results.csv: OUT/fit/fit.json and the plots
    python -m scaling report SPEC     # fit, then OUT/fit/report.md
    python -m scaling lrcheck SPEC    # a spec with lr_scales: is the rule's LR within 2x of the best tried?
    python -m scaling time   SPEC|DIR # where the device time went: training, start-up, the rest; aggregate MFU
                                     [--peak-tflops 989]
    python -m scaling calibrate SPEC [RESULTS.csv]  # the plan's throughput constants fitted to measured cells
    python -m scaling repeats FIRST.csv AGAIN.csv  # the same cells trained twice: how far their losses move
    python -m scaling fit RUNS.csv [MORE.csv ...] --out DIR [--loss loss ...] [--recipe-col recipe] [--baseline R]
                                     [--params-col params] [--flops 6n+attn] [--bootstrap 1000] [--seed 0]
                                     [--target-flops 1e18]
    --out DIR with a spec (plan, run, fit, report): the sweep's directory instead of the spec's `out`

`run` is idempotent and restartable: finished cells are skipped, interrupted ones resume from their checkpoints,
and each finished cell appends one row to OUT/results.csv. Fitting a CSV imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling.runs import FitError


def _fit_csv(args) -> dict:
    from scaling.report import fit_csv

    if not args.out:
        raise SystemExit("error: fitting a CSV needs --out DIR")
    return fit_csv(
        [args.target, *args.more] if args.more else args.target,
        args.out,
        args.loss or ["loss"],
        args.recipe_col,
        1000 if args.bootstrap is None else args.bootstrap,
        args.seed,
        args.target_flops,
        args.params_col or "params",
        args.flops,
        baseline=args.baseline,
    )


def _fit_spec(spec, args) -> dict:
    from scaling.report import fit_csv
    from scaling.results import loss_columns

    path = Path(spec.out) / "results.csv"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist yet: `python -m scaling run` first")
    return fit_csv(
        path,
        Path(spec.out) / "fit",
        args.loss or loss_columns(spec.out),
        "recipe" if len(spec.recipes) > 1 else None,
        spec.bootstrap if args.bootstrap is None else args.bootstrap,
        args.seed,
        args.target_flops,
        args.params_col or spec.params_convention,
        args.flops or spec.flops_convention,
        baseline=args.baseline,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "command", choices=["plan", "store", "run", "fit", "report", "lrcheck", "time", "calibrate", "repeats"]
    )
    ap.add_argument("target", help="a sweep spec (YAML), or for `fit` a CSV of runs")
    ap.add_argument(
        "more",
        nargs="*",
        help="lrcheck and fit: more results CSVs read with the target's; calibrate: the results CSV; repeats: the "
        "second run's CSV",
    )
    ap.add_argument(
        "--reuse",
        action="append",
        default=[],
        help="run: another sweep's results.csv whose rows of this spec's cells (same key) count as finished",
    )
    ap.add_argument(
        "--out", help="fit a CSV: the directory for fit.json and the plots; with a spec: instead of its `out`"
    )
    ap.add_argument("--loss", action="append", help="loss column(s) to fit, each separately")
    ap.add_argument("--recipe-col", help="fit a CSV: the column naming recipes; multipliers are against the first")
    ap.add_argument("--baseline", help="fit: the recipe the others are compared with (default: the CSV's first)")
    ap.add_argument("--params-col", help="N: params (6N's), params_total, params_non_embedding or any column")
    ap.add_argument("--flops", help="C: 6n, 6n+attn, or a column (default: the spec's, or the CSV's 'flops')")
    ap.add_argument("--bootstrap", type=int, help="resamples for the intervals (default: the spec's, or 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--launch-for",
        type=float,
        help="run, local: start no cell after this many seconds and exit when the running ones finish (a time-boxed "
        "allocation ends on a cell boundary; rerun to continue)",
    )
    ap.add_argument("--target-flops", type=float, help="compute for the allocations and multipliers (default: max)")
    ap.add_argument("--peak-tflops", type=float, help="time: one device's peak, for the aggregate MFU (H200 bf16: 989)")
    args = ap.parse_args(argv)
    joins_csvs = args.command == "fit" and args.target.endswith(".csv")  # several runs' CSVs fitted as one set
    if (
        args.more
        and args.command not in ("lrcheck", "calibrate", "repeats")
        and not joins_csvs
        or (args.command in ("calibrate", "repeats") and len(args.more) > 1)
    ):
        ap.error(
            f"`{args.command}` takes one target; more CSVs only join an lrcheck or a fit of CSVs (or name calibrate's "
            "results)"
        )
    if joins_csvs and not all(m.endswith(".csv") for m in args.more):
        ap.error("fit: every further target is a CSV to read with the first")
    if args.command == "repeats":
        from scaling.repeats import describe, repeats

        if len(args.more) != 1:
            ap.error("repeats takes two results CSVs: FIRST.csv AGAIN.csv")
        try:
            found = repeats(args.target, args.more[0], args.loss or ("loss", "loss_caption", "loss_text"))
            print(describe(found, args.target, args.more[0]))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from e
        return 0
    from scaling.report import summarize, write_markdown

    try:
        if args.command == "time":
            from scaling.gputime import gpu_time, markdown
            from scaling.spec import load_spec

            # a spec, or a sweep's directory as committed (results.csv, driver.jsonl)
            out = Path(args.target) if Path(args.target).is_dir() else Path(load_spec(args.target).out)
            if not (out / "results.csv").exists():
                raise SystemExit(f"error: {out / 'results.csv'} does not exist yet: `python -m scaling run` first")
            print(markdown(gpu_time(out, args.peak_tflops)))
            return 0
        if args.command == "calibrate":
            from scaling.spec import load_spec
            from scaling.throughput import describe, measured

            spec = load_spec(args.target)
            if spec.schedule == "wsd":
                raise SystemExit("error: calibrate from a cosine sweep (a WSD branch trains only its cooldown)")
            path = Path(args.more[0]) if args.more else Path(spec.out) / "results.csv"
            if not path.exists():
                raise SystemExit(f"error: {path} does not exist yet: `python -m scaling run` first")
            try:
                print(describe(measured(path), spec.throughput, spec.launcher.nproc))
            except ValueError as e:
                raise SystemExit(f"error: {e}") from e
            return 0
        if args.command == "lrcheck":
            from scaling.lrcheck import describe, lr_check, read_rows

            path = Path(args.target) if args.target.endswith(".csv") else None
            if path is None:
                from scaling.spec import load_spec

                path = Path(load_spec(args.target).out) / "results.csv"
            if not path.exists():
                raise SystemExit(f"error: {path} does not exist yet: `python -m scaling run` first")
            rows = read_rows(path)
            for extra in args.more:
                if not Path(extra).exists():
                    raise SystemExit(f"error: {extra} does not exist")
                rows += read_rows(extra)
            print(describe(lr_check(rows, (args.loss or ["loss"])[0])))
            return 0
        if args.target.endswith(".csv"):
            if args.command != "fit":
                raise SystemExit(f"error: `{args.command}` takes a sweep spec; a CSV can only be fitted")
            report = _fit_csv(args)
            summarize(report)
            title = "Fit of " + " + ".join([args.target, *args.more])
            print(f"wrote {write_markdown(report, Path(args.out) / 'report.md', title)}")
            return 0
        from scaling.plan import plan, print_plan
        from scaling.spec import load_spec
        from train.config import ConfigError

        try:
            spec = load_spec(args.target)
            if args.out:  # the same design into another directory: a second run of it, say
                spec.out = args.out
            cells = plan(spec)
            slots = {}
            if args.command == "run" and spec.launcher.kind == "local":
                from scaling.local import device_slots

                slots = device_slots(spec)  # a GPU that does not exist stops the sweep here
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from e
        if args.command == "plan":
            print_plan(spec, cells)
        elif args.command == "store":
            from data.pipeline import DataError
            from scaling.rowstore import ensure

            try:
                print(ensure(cells, spec.launcher.nproc))
            except DataError as e:
                raise SystemExit(f"error: {e}") from e
        elif args.command == "run":
            for w in cells.warnings:
                print(f"warning: {w}")
            from scaling.rowstore import problem

            why = problem(cells, spec.launcher.nproc)
            if why:  # before any cell takes a slot
                raise SystemExit(f"error: {why}; build it with `python -m scaling store {args.target}`")
            for source in args.reuse:
                from scaling.results import adopt

                if not Path(source).exists():
                    raise SystemExit(f"error: --reuse {source}: no such file")
                print(f"reused {adopt(spec.out, cells.cells, source)} cell(s) from {source}")
            if spec.launcher.kind == "slurm":
                from scaling.slurm import run_slurm

                run_slurm(spec, cells)
            else:
                from scaling.local import run_local

                run_local(spec, cells, slots, launch_for=args.launch_for)
        else:
            report = _fit_spec(spec, args)
            summarize(report)
            if args.command == "report":
                path = write_markdown(report, Path(spec.out) / "fit" / "report.md", f"Sweep `{spec.name}`")
                print(f"wrote {path}")
    except FitError as e:
        raise SystemExit(f"error: {e}") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
