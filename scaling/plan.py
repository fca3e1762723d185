"""From a spec to cells: a cell is (recipe, size, budget, seed) with its resolved training config.

Budgets are FLOPs in the spec's convention (an IsoFLOP grid: D = C / FLOPs-per-token(N), the model's own count)
or tokens per parameter. Hyperparameters follow `scaling.hparams`. With `schedule: wsd`, one stable-phase run per
(recipe, size, seed), the trunk, saves a checkpoint where each budget's cooldown begins, and every budget branches
from it (Hägele et al. 2024).

Keys: a cell's directory is OUT/cells/<key>, its key a hash of what changes the trained weights (the resolved
config without run directory, resume policy, logging, checkpoint cadence or eval cadence; a branch's trunk by its
key): editing the base config or a recipe gives new cells, changing how often a cell logs does not. A trunk's key
hashes its resolved config the same way, with the steps it must save at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data.rows import STREAMS, rows_needed
from model import flops_per_token, matmul_params, param_count
from scaling.conventions import CostModel
from scaling.hparams import split_rows
from scaling.law import Law
from scaling.spec import SweepSpec
from train.config import RLConfig, TrainConfig, build, load_config, to_dict

NOT_WEIGHTS = ("run_dir", "resume", "init_from", "resume_allow", "logging", "checkpoint", "export")


def _dotted(d: dict, prefix: str = "") -> list[str]:
    """Nested spec overrides as `a.b=value` strings for load_config; values as YAML, which it parses back."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


# Config fields added after sweeps had keyed their cells: left out of the key while at their defaults, so that a new
# field does not re-key (and rerun) every finished cell. A field added later joins this list.
ADDED_SINCE_KEYED = {
    ("init_weights",): "",
    ("objective",): "lm",
    ("data", "kinds"): [],
    ("rl",): dataclasses.asdict(RLConfig()),  # objective rl's section (train/rl.py)
    ("deepspeed", "compile_scope"): "blocks",
    ("model", "mrope_interleaved"): False,
    ("deepspeed", "cuda_graph"): False,
    ("data", "rows"): "",
}


def weights_key(config: dict, extra: dict | None = None) -> str:
    config = json.loads(json.dumps(config))  # a copy to prune
    for path, default in ADDED_SINCE_KEYED.items():
        *parents, leaf = path
        node = config
        for p in parents:
            node = node.get(p, {})
        if leaf in node and node[leaf] == default:
            del node[leaf]
    d = {k: v for k, v in config.items() if k not in NOT_WEIGHTS}
    d["eval"] = {k: v for k, v in config["eval"].items() if k != "every"}
    d.update(extra or {})
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Cell:
    recipe: str
    size: int
    budget: str  # "tpp=4", "flops=1e+13", or "stable" for a trunk
    seed: int
    config: dict  # the resolved training config, written to OUT/cells/<key>/cell.yaml
    key: str = ""
    params: int = 0  # N in 6N (matmul parameters)
    params_total: int = 0
    params_non_embedding: int = 0
    tokens: int = 0
    flops: float = 0.0  # in the spec's convention
    flops_6n: float = 0.0
    flops_6n_attn: float = 0.0
    steps: int = 0
    tokens_per_step: int = 0
    rows: int = 0  # global rows per optimizer step
    micro_rows: int = 0
    grad_accum: int = 0
    lr: float = 0.0
    lr_scale: float = 1.0  # the rule's LR times this (spec.lr_scales)
    beta2: float = 0.0
    warmup_steps: int = 0
    trunk: str = ""  # wsd: key of the stable-phase run this cell branches from
    branch_step: int = 0
    minutes: float = 0.0  # estimated

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def config_path(self) -> Path:
        return self.run_dir / "cell.yaml"

    @property
    def is_trunk(self) -> bool:
        return self.key.startswith("trunk-")

    def write_config(self) -> None:
        """The file the cell trains from, locally and on SLURM."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))


@dataclass
class Plan:
    cells: list[Cell]
    warnings: list[str] = field(default_factory=list)


def _sizes_for(spec: SweepSpec, C: float, shapes: dict, warnings: list[str]) -> list[int]:
    """The sizes trained at budget C: all, or `grid.sizes_per_budget` of them around the expected optimum."""
    g = spec.grid
    if not g.sizes_per_budget:
        return list(spec.sizes)
    sizes = sorted(spec.sizes, key=lambda s: shapes[s][0])
    N = np.array([shapes[s][0] for s in sizes], dtype=float)
    fpt = np.array([shapes[s][1] for s in sizes], dtype=float)
    if g.prior:
        n_star = float(Law(**g.prior).optimal(C, CostModel.fit(N, fpt))[0])
        centre = int(np.argmin(np.abs(np.log(N / n_star))))
    else:
        tpp = C / fpt / N
        centre = int(np.argmin(np.abs(np.log(tpp / g.tokens_per_param))))
    if centre in (0, len(sizes) - 1):
        side = "smallest" if centre == 0 else "largest"
        warnings.append(
            f"budget {C:.3g}: the expected optimum is at the {side} size ({sizes[centre]}): it may lie outside the "
            f"grid; add sizes beyond it"
        )
    k = g.sizes_per_budget
    start = min(max(0, centre - k // 2), len(sizes) - k)
    return sizes[start : start + k]


def plan(spec: SweepSpec) -> Plan:
    h, launcher = spec.hparams, spec.launcher
    attention = spec.flops_convention == "6n+attn"
    out = Path(spec.out)
    cells: list[Cell] = []
    warnings: list[str] = []
    trunks: dict = {}
    common = _dotted(spec.overrides)
    for recipe, recipe_overrides in spec.recipes.items():
        sized = {
            s: load_config(spec.base, common + [f"model.depth={s}"] + _dotted(recipe_overrides)) for s in spec.sizes
        }
        shapes = {
            s: (matmul_params(c.model), flops_per_token(c.model, c.data.seq_len, attention=attention))
            for s, c in sized.items()
        }
        budgets = [(f"tpp={t:g}", t, None) for t in spec.tokens_per_param] + [
            (f"flops={c:.3g}", None, c) for c in spec.flops
        ]
        for (label, tpp, C), lr_scale in itertools.product(budgets, spec.lr_scales):
            name = recipe if len(spec.lr_scales) == 1 else f"{recipe}@lr{lr_scale:g}"
            for size in _sizes_for(spec, C, shapes, warnings) if C else spec.sizes:
                mc, seq = sized[size].model, sized[size].data.seq_len
                N, fpt = shapes[size]
                D = tpp * N if tpp else C / fpt
                rows = h.rows_per_step(N, seq)
                fewer = max(1, int(D / (max(1, spec.grid.min_steps) * seq)) // h.rows_multiple) * h.rows_multiple
                if spec.grid.min_steps and fewer < rows:
                    warnings.append(
                        f"{name}, size {size}, {label}: {rows} rows per step would give fewer than "
                        f"grid.min_steps={spec.grid.min_steps} steps; {fewer} rows instead"
                    )
                    rows = fewer
                micro, accum = split_rows(rows, launcher.nproc, launcher.max_micro_rows)
                tokens_per_step = rows * seq
                steps = max(1, math.ceil(D / tokens_per_step))
                lr, beta2 = h.lr(N, seq) * lr_scale, h.beta2(tokens_per_step)
                values = {
                    "steps": steps,
                    "resume": "auto",
                    "model.depth": size,
                    "data.batch_size": micro,
                    "deepspeed.grad_accum": accum,
                    "optim.lr": lr,
                    "optim.betas": [0.9, beta2],
                    "schedule.warmup_steps": h.warmup_steps(N, tokens_per_step, steps),
                    "schedule.kind": spec.schedule,
                    "schedule.cooldown_fraction": spec.cooldown_fraction,
                }
                for seed in spec.seeds:
                    overrides = common + _dotted({**values, "seed": seed}) + _dotted(recipe_overrides)
                    config = to_dict(load_config(spec.base, overrides))  # every key checked here, before any run
                    cell = Cell(name, size, label, seed, config, lr_scale=lr_scale)
                    cell.params, cell.params_total = N, param_count(mc)
                    cell.params_non_embedding = param_count(mc, embeddings=False)
                    cell.steps, cell.tokens_per_step, cell.tokens = steps, tokens_per_step, steps * tokens_per_step
                    cell.flops_6n = flops_per_token(mc, seq, attention=False) * cell.tokens
                    cell.flops_6n_attn = flops_per_token(mc, seq) * cell.tokens
                    cell.flops = fpt * cell.tokens
                    cell.rows, cell.micro_rows, cell.grad_accum = rows, micro, accum
                    cell.lr, cell.beta2, cell.warmup_steps = lr, beta2, config["schedule"]["warmup_steps"]
                    if spec.schedule == "wsd":
                        cell.branch_step = steps - max(1, round(spec.cooldown_fraction * steps))
                        trunks.setdefault((name, size, seed), []).append(cell)
                    cells.append(cell)
    for group in trunks.values():
        cells.insert(0, _trunk(group, out))
    for cell in cells:
        if not cell.key:
            extra = {"trunk": cell.trunk, "branch_step": cell.branch_step} if cell.trunk else None
            cell.key = weights_key(cell.config, extra)
            cell.config["run_dir"] = str(out / "cells" / cell.key)
            build(TrainConfig, cell.config)
        _estimate(spec, cell, warnings)
    return Plan(cells, list(dict.fromkeys(warnings)))  # a budget's grid warning comes once, not once per recipe


def _trunk(group: list[Cell], out: Path) -> Cell:
    """One stable-phase run for a (recipe, size, seed), saving at every branch point of its budgets."""
    longest = max(group, key=lambda c: c.branch_step)
    at = sorted({c.branch_step for c in group})
    config = json.loads(json.dumps(longest.config))
    config["steps"] = at[-1]
    config["schedule"]["kind"] = "constant"
    config["checkpoint"].update(at_steps=at, keep=len(at) + 1)
    config["eval"]["every"] = 0
    key = "trunk-" + weights_key(config, {"at_steps": at})
    config["run_dir"] = str(out / "cells" / key)
    build(TrainConfig, config)
    trunk = Cell(longest.recipe, longest.size, "stable", longest.seed, config, key=key, steps=at[-1])
    for name in ("params", "params_total", "params_non_embedding", "tokens_per_step", "rows", "micro_rows"):
        setattr(trunk, name, getattr(longest, name))
    trunk.grad_accum, trunk.lr, trunk.beta2 = longest.grad_accum, longest.lr, longest.beta2
    trunk.tokens = at[-1] * trunk.tokens_per_step
    per_token = longest.flops / longest.tokens
    trunk.flops = per_token * trunk.tokens
    for c in group:
        c.trunk = key
        c.config["init_from"] = str(Path(config["run_dir"]) / "checkpoints" / f"step_{c.branch_step:08d}")
    return trunk


def _estimate(spec: SweepSpec, cell: Cell, warnings: list[str]) -> None:
    t = spec.throughput
    seconds = max(cell.flops / (t.flops_per_s * spec.launcher.nproc), cell.steps * t.step_s) + t.startup_s
    if cell.trunk:
        seconds = (1 - cell.branch_step / cell.steps) * (seconds - t.startup_s) + t.startup_s
    cell.minutes = seconds / 60
    name = f"{cell.key} ({cell.recipe}, size {cell.size}, {cell.budget})"
    limit = spec.launcher.time_limit_min
    if limit and cell.minutes > limit:
        warnings.append(f"{name}: estimated {cell.minutes:.0f} min exceeds the launcher's limit of {limit:.0f} min")
    lo, hi = spec.grid.sane_tokens_per_param
    tpp = cell.tokens / cell.params
    if not cell.is_trunk and not lo <= tpp <= hi:
        warnings.append(f"{name}: {tpp:.3g} tokens per parameter is outside [{lo:g}, {hi:g}]")


def slot_wall(cells: list[Cell], slots: int) -> float:
    """Minutes of wall time for `cells` started the way scaling.local starts them (trunks first, then the longest),
    each on the first of `slots` slots to free up: what a sweep of many small cells takes on one GPU that holds
    `slots` at once. A branch's wait for its trunk is not modelled."""
    free = [0.0] * max(1, slots)
    for c in sorted(cells, key=lambda c: (not c.is_trunk, -c.minutes)):
        heapq.heappush(free, heapq.heappop(free) + c.minutes)
    return max(free)


def print_plan(spec: SweepSpec, p: Plan) -> None:
    print(
        f"{'cell':<20} {'recipe':<14} {'size':>4} {'budget':<12} {'N (6N)':>9} {'N total':>9} {'tokens':>9} "
        f"{'tok/N':>7} {'6ND':>9} {'6ND+attn':>9} {'steps':>6} {'rows':>5} {'mb x acc':>8} {'lr':>8} {'est.min':>7}"
    )
    for c in p.cells:
        print(
            f"{c.key:<20} {c.recipe:<14} {c.size:>4} {c.budget:<12} {c.params:>9.3g} {c.params_total:>9.3g} "
            f"{c.tokens:>9.3g} {c.tokens / c.params:>7.3g} {c.flops_6n:>9.3g} {c.flops_6n_attn:>9.3g} {c.steps:>6} "
            f"{c.rows:>5} {f'{c.micro_rows}x{c.grad_accum}':>8} {c.lr:>8.2e} {c.minutes:>7.1f}"
        )
    launcher = spec.launcher
    at_once = launcher.max_concurrent if launcher.kind == "slurm" else None
    total = sum(c.minutes for c in p.cells)
    print(
        f"{len(p.cells)} runs, {total:.0f} process-minutes in all (at {spec.throughput.flops_per_s:.3g} model "
        f"FLOP/s per process, at least {spec.throughput.step_s:g} s a step, {spec.throughput.startup_s:g} s "
        "start-up); budgets in FLOPs as "
        f"{spec.flops_convention}" + (f"; up to {at_once} at once on SLURM" if at_once else "")
    )
    if launcher.kind == "local" and launcher.nproc == 1:
        print(
            "wall time, cells started longest first as slots free up, at the throughput above: about "
            f"{slot_wall(p.cells, launcher.cells_per_gpu):.0f} minutes on one GPU holding {launcher.cells_per_gpu} at "
            f"once (launcher.cells_per_gpu), {slot_wall(p.cells, launcher.parallel):.0f} on a CPU host running "
            f"{launcher.parallel} at once (launcher.parallel)"
        )
    for store, rows in store_rows(p, spec.launcher.nproc).items():
        print(
            f"row store {store}: each of its {STREAMS} streams must hold {rows} rows (`python -m scaling store "
            "SPEC` builds it)"
        )
    for w in p.warnings:
        print(f"warning: {w}")


def store_rows(p: Plan, nproc: int, streams: int = STREAMS) -> dict[str, int]:
    """Rows a stream that each row store the plan's cells read (`data.rows`) must hold: the largest of its cells'
    `steps x grad_accum x nproc` batches of `micro_rows` (data.rows.rows_needed); {} when no cell reads one."""
    need: dict[str, int] = {}
    for c in p.cells:
        path = c.config.get("data", {}).get("rows")
        if path:
            rows = rows_needed(c.steps * c.grad_accum * nproc, streams, c.micro_rows)
            need[path] = max(need.get(path, 0), rows)
    return need
