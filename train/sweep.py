"""Scaling-law sweeps: many small runs from one spec, their results in one CSV, and the fitted laws.

    python -m train.sweep plan   configs/sweeps/cpu.yaml    # the cells: N, D, FLOPs, hyperparameters, time
    python -m train.sweep run    configs/sweeps/cpu.yaml    # locally (sequential or parallel) or as SLURM arrays
    python -m train.sweep fit    configs/sweeps/cpu.yaml    # train.scaling on the results CSV
    python -m train.sweep report configs/sweeps/cpu.yaml    # fit + OUT/report.md with the plots

A cell is (recipe, size, budget, seed). Its run directory is OUT/cells/<hash of its resolved config>, so `run`
is idempotent and restartable: finished cells (summary.json present) are skipped, interrupted ones resume from
their checkpoints (resume=auto), and each finished cell appends one row to OUT/results.csv.

Sizes come from the model's depth dial. Budgets are tokens per parameter or FLOPs (an IsoFLOP grid: D = C/6N).
Per-size hyperparameters follow a rule, not one LR for all (a fixed LR is what biased Kaplan et al.'s
exponents, Porian et al. 2024): LR and batch size are power laws in N, warmup is about one token per parameter,
and AdamW's beta2 is 0.99 at small batches (0.95 above `small_batch_tokens`), the factors Porian et al. found
decisive. The constants below are this codebase's defaults for tiny models, not values fitted in that paper;
each can be overridden in the spec. With `schedule: wsd`, one stable-phase run per (recipe, size, seed) saves a
checkpoint where each budget's cooldown begins, and every budget's run branches from it (Hägele et al. 2024).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model import flops_per_token, matmul_params, param_count
from train.config import ConfigError, build, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


@dataclass
class HparamRule:
    lr_ref: float = 3e-3  # the LR at n_ref parameters...
    n_ref: float = 1e6
    lr_exponent: float = 0.3  # ...scaled by (N / n_ref) ** -lr_exponent
    batch_tokens_ref: int = 8192  # tokens per step at n_ref...
    batch_exponent: float = 0.5  # ...scaled by (N / n_ref) ** batch_exponent
    warmup_tokens_per_param: float = 1.0
    max_warmup_fraction: float = 0.25  # tiny budgets: warmup at most this fraction of the run
    small_batch_tokens: int = 262144
    beta2_small_batch: float = 0.99
    beta2_large_batch: float = 0.95


@dataclass
class Launcher:
    kind: str = "local"  # local | slurm
    parallel: int = 1  # local: cells run at once
    nproc: int = 1  # processes (GPUs) per cell
    max_concurrent: int = 8  # slurm: array tasks at once
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class SweepSpec:
    name: str
    base: str  # the base training config
    out: str
    sizes: list[int]  # depth-dial values
    tokens_per_param: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # IsoFLOP budgets (6ND)
    seeds: list[int] = field(default_factory=lambda: [0])
    schedule: str = "cosine"  # cosine: independent runs | wsd: cooldowns branch from stable-phase checkpoints
    cooldown_fraction: float = 0.2
    recipes: dict[str, dict] = field(default_factory=lambda: {"base": {}})
    overrides: dict = field(default_factory=dict)  # applied to every cell (dotted keys)
    hparams: HparamRule = field(default_factory=HparamRule)
    launcher: Launcher = field(default_factory=Launcher)
    tokens_per_s: float = 5000.0  # per process, for the time estimate in `plan`
    bootstrap: int = 1000  # resamples for the fits' intervals

    def __post_init__(self):
        if bool(self.tokens_per_param) == bool(self.flops):
            raise ConfigError("a sweep spec gives exactly one of tokens_per_param or flops")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule '{self.schedule}' is not cosine or wsd")
        if not self.sizes:
            raise ConfigError("a sweep spec lists at least one size")


def load_spec(path: str | Path) -> SweepSpec:
    return build(SweepSpec, yaml.safe_load(Path(path).read_text()))


def _dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list | bool) else v}")
    return out


@dataclass
class Cell:
    recipe: str
    size: int
    budget: str  # "tpp=4" or "flops=1e+13"
    seed: int
    overrides: list[str]
    key: str = ""
    params: int = 0  # N in 6N (matmul parameters)
    params_total: int = 0
    params_non_embedding: int = 0
    tokens: int = 0
    flops_6n: float = 0.0
    flops_attn: float = 0.0
    steps: int = 0
    lr: float = 0.0
    batch_rows: int = 0
    trunk: str = ""  # wsd: key of the stable-phase run this cell branches from
    branch_step: int = 0

    @property
    def run_dir(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if o.startswith("run_dir="))


def plan(spec: SweepSpec) -> list[Cell]:
    world = spec.launcher.nproc
    h = spec.hparams
    cells, trunks = [], {}
    for recipe, recipe_overrides in spec.recipes.items():
        for size in spec.sizes:
            model_overrides = _dotted(spec.overrides) + [f"model.depth={size}"] + _dotted(recipe_overrides)
            sized = load_config(spec.base, model_overrides)  # the spec's overrides decide the sizes and seq_len
            mc, seq = sized.model, sized.data.seq_len
            N = matmul_params(mc)
            rows = max(1, round(h.batch_tokens_ref * (N / h.n_ref) ** h.batch_exponent / seq))
            tokens_per_step = rows * seq * world
            lr = h.lr_ref * (N / h.n_ref) ** -h.lr_exponent
            beta2 = h.beta2_small_batch if tokens_per_step < h.small_batch_tokens else h.beta2_large_batch
            budgets = [(f"tpp={t:g}", t * N) for t in spec.tokens_per_param] or [
                (f"flops={c:.3g}", c / (6 * N)) for c in spec.flops
            ]
            for seed in spec.seeds:
                for label, D in budgets:
                    steps = max(1, math.ceil(D / tokens_per_step))
                    warmup = min(
                        math.ceil(h.warmup_tokens_per_param * N / tokens_per_step), int(h.max_warmup_fraction * steps)
                    )
                    values = {
                        "seed": seed,
                        "steps": steps,
                        "resume": "auto",
                        "model.depth": size,
                        "data.batch_size": rows,
                        "optim.lr": lr,
                        "optim.betas": [0.9, beta2],
                        "schedule.warmup_steps": warmup,
                        "schedule.kind": spec.schedule,
                        "schedule.cooldown_fraction": spec.cooldown_fraction,
                    }
                    overrides = _dotted(spec.overrides) + _dotted(values) + _dotted(recipe_overrides)
                    cell = Cell(recipe, size, label, seed, overrides)
                    resolved = load_config(spec.base, overrides)  # every key checked here, before any run
                    cell.key = hashlib.sha1(json.dumps(to_dict(resolved), sort_keys=True).encode()).hexdigest()[:12]
                    cell.overrides.append(f"run_dir={Path(spec.out) / 'cells' / cell.key}")
                    cell.params, cell.params_total = N, param_count(mc)
                    cell.params_non_embedding = param_count(mc, embeddings=False)
                    cell.steps, cell.tokens = steps, steps * tokens_per_step
                    cell.flops_6n = flops_per_token(mc, seq, attention=False) * cell.tokens
                    cell.flops_attn = flops_per_token(mc, seq) * cell.tokens
                    cell.lr, cell.batch_rows = lr, rows
                    if spec.schedule == "wsd":
                        cell.branch_step = steps - max(1, round(spec.cooldown_fraction * steps))
                        trunks.setdefault((recipe, size, seed), []).append(cell)
                    cells.append(cell)
    for group in trunks.values():  # one stable-phase run per (recipe, size, seed), saving at every branch point
        longest = max(group, key=lambda c: c.branch_step)
        at = sorted({c.branch_step for c in group})
        trunk_overrides = [o for o in longest.overrides if not o.startswith(("run_dir=", "steps=", "schedule.kind="))]
        trunk_overrides += [
            "schedule.kind=constant",
            f"steps={at[-1]}",
            f"checkpoint.at_steps={json.dumps(at)}",
            f"checkpoint.keep={len(at) + 1}",
            "eval.every=0",
        ]
        key = "trunk-" + hashlib.sha1(" ".join(sorted(trunk_overrides)).encode()).hexdigest()[:12]
        trunk_dir = Path(spec.out) / "cells" / key
        trunk_overrides.append(f"run_dir={trunk_dir}")
        trunk = Cell(longest.recipe, longest.size, "stable", longest.seed, trunk_overrides, key=key, steps=at[-1])
        cells.insert(0, trunk)
        for c in group:
            c.trunk = key
            c.overrides.append(f"init_from={trunk_dir / 'checkpoints' / f'step_{c.branch_step:08d}'}")
    return cells


# ----------------------------------------------------------------------------------------------------- run
RESULT_FIELDS = [
    "key",
    "recipe",
    "size",
    "budget",
    "seed",
    "params",
    "params_total",
    "params_non_embedding",
    "tokens",
    "flops",
    "flops_attn",
    "steps",
    "lr",
    "batch_rows",
    "loss",
    "wall_s",
]


def finished(cell: Cell) -> bool:
    return (Path(cell.run_dir) / "summary.json").exists()


def record(spec: SweepSpec, cell: Cell) -> None:
    """Append the cell's row to OUT/results.csv unless it is there already (append-only, one row per cell)."""
    path = Path(spec.out) / "results.csv"
    summary = json.loads((Path(cell.run_dir) / "summary.json").read_text())
    val = summary.get("final_val", {})
    row = {
        "key": cell.key,
        "recipe": cell.recipe,
        "size": cell.size,
        "budget": cell.budget,
        "seed": cell.seed,
        "params": cell.params,
        "params_total": cell.params_total,
        "params_non_embedding": cell.params_non_embedding,
        "tokens": summary["tokens"],
        "flops": 6 * cell.params * summary["tokens"],
        "flops_attn": summary["flops"],
        "steps": summary["steps"],
        "lr": cell.lr,
        "batch_rows": cell.batch_rows,
        "loss": val.get("text_loss"),
        "wall_s": summary["wall_s"],
    }
    for k, v in val.items():
        if k.endswith("/text_loss"):
            row["loss_" + k.split("/")[0]] = v
    existing, header = [], []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            existing, header = list(reader), list(reader.fieldnames or [])
        if any(r["key"] == cell.key for r in existing):
            return
    new_columns = [k for k in RESULT_FIELDS + sorted(k for k in row if k not in RESULT_FIELDS) if k not in header]
    fields = header + new_columns
    if header and new_columns:  # a new loss column: rewrite once with the wider header
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(existing)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if not header:
            w.writeheader()
        w.writerow(row)


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _command(spec: SweepSpec, cell: Cell) -> list[str]:
    nproc = spec.launcher.nproc
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc == 1:  # one process: no launcher, a free port for the (single-member) process group
        launch = [sys.executable]
    return [*launch, str(REPO / "train.py"), "--config", spec.base, *cell.overrides]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_driver() -> None:
    """Runs in a cell's process before it starts (Linux): the kernel kills the cell when the driver dies. Otherwise
    a killed driver leaves its cells training unsupervised, and the resumed sweep starts the same cell again in the
    same directory. A torchrun cell's workers outlive their torchrun all the same: kill a multi-process sweep's
    process group, not only the driver."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def run_local(spec: SweepSpec, cells: list[Cell]) -> None:
    todo = [c for c in cells if not finished(c)]
    for c in cells:
        if finished(c) and not c.key.startswith("trunk-"):
            record(spec, c)
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already finished; running {len(todo)}")
    running: dict = {}
    log_dir = Path(spec.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while todo or running:
        for key, (proc, cell, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[key]
                if proc.returncode:
                    raise RuntimeError(f"cell {key} failed ({proc.returncode}); see {log_dir / key}.log")
                if not key.startswith("trunk-"):
                    record(spec, cell)
                print(f"finished {key} ({cell.recipe}, size {cell.size}, {cell.budget})", flush=True)
        ready = [c for c in todo if not c.trunk or (Path(spec.out) / "cells" / c.trunk / "summary.json").exists()]
        while ready and len(running) < spec.launcher.parallel:
            cell = ready.pop(0)
            todo.remove(cell)
            log = open(log_dir / f"{cell.key}.log", "a")  # noqa: SIM115 - closed when the process ends
            cell_env = {**env, "MASTER_PORT": str(_free_port())}  # cells running side by side must not share one
            running[cell.key] = (
                subprocess.Popen(
                    _command(spec, cell),
                    cwd=REPO,
                    env=cell_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_driver if sys.platform == "linux" else None,
                ),
                cell,
                log,
            )
        time.sleep(0.5)


def run_slurm(spec: SweepSpec, cells: list[Cell]) -> None:
    from train.slurm_array import submit_array

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    args = [f"--ntasks-per-node={spec.launcher.nproc}", f"--output={out}/logs/%A_%a.out", *spec.launcher.sbatch_args]
    (out / "logs").mkdir(exist_ok=True)
    dependency = None
    for stage, group in (
        ("trunks", [c for c in cells if c.key.startswith("trunk-")]),
        ("cells", [c for c in cells if not c.key.startswith("trunk-")]),
    ):
        group = [c for c in group if not finished(c)]
        if not group:
            continue
        path = out / f"{stage}.txt"
        path.write_text("".join(f"{spec.base} {' '.join(c.overrides)}\n" for c in group))
        ids = submit_array(path, spec.launcher.max_concurrent, args, dependency)
        dependency = "afterok:" + ":".join(ids)
        print(f"submitted {len(group)} {stage} as {', '.join(ids)}")
    print("when the arrays have finished, `python -m train.sweep run SPEC` again records their rows")


# ----------------------------------------------------------------------------------------------------- CLI
def print_plan(spec: SweepSpec, cells: list[Cell]) -> None:
    print(
        f"{'cell':<20} {'recipe':<14} {'size':>4} {'budget':<12} {'N (6N)':>9} {'N total':>9} {'N no-emb':>9} "
        f"{'tokens':>9} {'6ND':>9} {'6ND+attn':>9} {'steps':>6} {'lr':>8} {'est. min':>8}"
    )
    total = 0.0
    for c in cells:
        minutes = c.tokens / (spec.tokens_per_s * spec.launcher.nproc) / 60 + 0.3
        if c.trunk:
            minutes *= 1 - c.branch_step / c.steps
        total += minutes
        print(
            f"{c.key:<20} {c.recipe:<14} {c.size:>4} {c.budget:<12} {c.params:>9.3g} {c.params_total:>9.3g} "
            f"{c.params_non_embedding:>9.3g} {c.tokens:>9.3g} {c.flops_6n:>9.3g} {c.flops_attn:>9.3g} "
            f"{c.steps:>6} {c.lr:>8.2e} {minutes:>8.1f}"
        )
    at_once = spec.launcher.max_concurrent if spec.launcher.kind == "slurm" else spec.launcher.parallel
    print(
        f"{len(cells)} runs, about {total / max(1, at_once):.0f} minutes at {spec.tokens_per_s:g} tokens/s per "
        f"process with {at_once} at once"
    )


def fit(spec: SweepSpec, bootstrap: int | None = None) -> dict:
    from train.scaling import fit_csv, summarize

    path = Path(spec.out) / "results.csv"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist yet: `python -m train.sweep run` first")
    losses = [h for h in _header(path) if h == "loss" or h.startswith("loss_")]
    recipe_col = "recipe" if len(spec.recipes) > 1 else None
    report = fit_csv(
        path, Path(spec.out) / "fit", losses, recipe_col, spec.bootstrap if bootstrap is None else bootstrap
    )
    summarize(report)
    return report


def write_report(spec: SweepSpec, report: dict) -> Path:
    from train.scaling import LAW_PARAMS, format_interval, with_interval

    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"{report['runs']} runs from `{Path(spec.out) / 'results.csv'}`; fits in `fit/fit.json`.",
        "",
    ]
    for col, fits in report["losses"].items():
        lines += [
            f"## {col}",
            "",
            "| recipe | E | A | B | alpha | beta | converged | held-out error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, e in fits.items():
            f3, ho = e["approach3"], e.get("held_out", {})
            if "E" in f3:
                err = f"{ho['mean_rel_error']:.1%}" if "mean_rel_error" in ho else ho.get("error", "")
                values = " | ".join(with_interval(f3, k) for k in LAW_PARAMS)
                lines.append(f"| {name} | {values} | {f3['converged']} | {err} |")
            else:
                lines.append(f"| {name} | {f3['error']} |")
            for k, v in e.items():
                if k.startswith("compute_multiplier"):
                    base = k.split("_vs_")[1]
                    trusted = f3.get("converged") and fits[base]["approach3"].get("converged")
                    caveat = "" if trusted else " (from fits that did not converge: do not quote)"
                    lines.append(
                        f"\n{name}: **{v['multiplier']:.3g}x** less compute than {base} for the same loss "
                        f"at {v['target_flops']:.3g} FLOPs (95% interval {format_interval(v['interval'])}){caveat}\n"
                    )
        lines += [""] + [f"![{p}](fit/{p})" for p in report["plots"] if p.endswith(f"_{col}.png")] + [""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    path = Path(spec.out) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "fit", "report"])
    ap.add_argument("spec")
    ap.add_argument("--bootstrap", type=int, help="resamples for the intervals (default: the spec's)")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        cells = plan(spec)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e
    if args.command == "plan":
        print_plan(spec, cells)
    elif args.command == "run":
        (run_slurm if spec.launcher.kind == "slurm" else run_local)(spec, cells)
    else:
        report = fit(spec, args.bootstrap)
        if args.command == "report":
            print(f"wrote {write_report(spec, report)}")


if __name__ == "__main__":
    main()
