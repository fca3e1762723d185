"""A sweep spec (`configs/sweeps/*.yaml`): what to train (base config, sizes, budgets, recipes, seeds), by which
rules (hyperparameters, FLOP and N conventions, where sizes sit around each budget's optimum) and how to launch.
Every key is checked when the spec is loaded, before any cell starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.conventions import FLOPS, PARAMS
from scaling.hparams import HparamRule
from train.config import ConfigError, build


@dataclass
class Launcher:
    kind: str = "local"  # local | slurm
    nproc: int = 1  # processes (GPUs) per cell
    # local, on a GPU host: the devices cells may use (default: every visible one: CUDA_VISIBLE_DEVICES when set,
    # else all that torch sees); each cell gets `nproc` of them and its own rendezvous port, cells start as devices
    # free up, and up to `cells_per_gpu` tiny cells share one device. [] forces CPU.
    gpus: list[int] | None = None
    cells_per_gpu: int = 1
    parallel: int = 1  # local without GPUs: cells at once
    # local: a cell waits while another cell of its compiled shape is in its first steps, then loads that compile
    # from inductor's cache rather than building the same graphs beside it (scaling.local.CompileGate)
    stagger_compiles: bool = True
    # local, one process a cell: warm workers, one a slot, train cell after cell in one process (scaling.worker), so
    # a cell pays no interpreter start and no imports; false: a fresh `train.py` process a cell
    warm_workers: bool = True
    max_micro_rows: int = 0  # micro-batch rows per rank at most (memory); 0: the whole per-rank batch at once
    max_concurrent: int = 8  # slurm: array tasks at once
    sbatch_args: list[str] = field(default_factory=list)
    time_limit_min: float = 0.0  # a cell's time limit; 0: from sbatch_args' --time, else none

    def __post_init__(self):
        if self.kind not in ("local", "slurm"):
            raise ConfigError(f"launcher.kind='{self.kind}' is not local or slurm")
        if min(self.nproc, self.cells_per_gpu, self.parallel) < 1:
            raise ConfigError("launcher.nproc, cells_per_gpu and parallel must be >= 1")
        if self.gpus is not None and len(set(self.gpus)) != len(self.gpus):
            raise ConfigError(f"launcher.gpus={self.gpus} names a device twice")
        if not self.time_limit_min:
            self.time_limit_min = next(
                (_minutes(a.split("=", 1)[1]) for a in self.sbatch_args if a.startswith(("--time=", "-t="))), 0.0
            )


def _minutes(value: str) -> float:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"launcher: cannot read the time limit '{value}'")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    if c is not None:  # H:M:S
        return a * 60 + b + c / 60
    return a + (b or 0) / 60  # M[:S]


@dataclass
class Grid:
    """Where each budget's sizes sit. sizes_per_budget = 0: every size at every budget. Otherwise that many
    consecutive sizes from the spec's list, centred on the size closest to the expected optimum: the size whose
    tokens per parameter is closest to `tokens_per_param`, or, given `prior` (E, A, B, alpha, beta of an earlier
    fit), the law's N*(C). `min_steps`: a cell too short to take that many steps at the batch rule's rows takes
    fewer rows per step (down to `hparams.rows_multiple`): a loss after a few dozen steps measures the warmup, not
    N and D (the first GPU study's cells of 34 to 166 steps never learnt the text their budget paid for)."""

    sizes_per_budget: int = 0
    tokens_per_param: float = 20.0
    prior: dict = field(default_factory=dict)
    sane_tokens_per_param: list[float] = field(default_factory=lambda: [1.0, 1000.0])  # warn outside
    min_steps: int = 0

    def __post_init__(self):
        if self.prior and set(self.prior) != {"E", "A", "B", "alpha", "beta"}:
            raise ConfigError(f"grid.prior needs exactly E, A, B, alpha, beta; got {sorted(self.prior)}")
        if self.min_steps < 0:
            raise ConfigError(f"grid.min_steps must be >= 0; got {self.min_steps}")


@dataclass
class Throughput:
    """For the time estimates in `plan` (and the driver's longest-first order): model FLOPs per second per process
    (in the spec's convention), a cell's start-up, and the host's floor per optimizer step. A tiny cell is bound by
    its steps, not its FLOPs: on an H200 a study cell of 36K parameters took 10-13 ms a step with the GPU busy 1.8 ms
    of it (docs/study/STUDY.md), so its time is the larger of the two."""

    flops_per_s: float = 1e10
    startup_s: float = 20.0
    step_s: float = 0.0


@dataclass
class SweepSpec:
    name: str
    base: str  # the base training config
    out: str
    sizes: list[int]  # depth-dial values
    tokens_per_param: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # IsoFLOP budgets, in `flops_convention`
    flops_convention: str = "6n+attn"  # 6n | 6n+attn: budgets, results.csv's flops and every fit use it
    params_convention: str = "params"  # the N the fits use: params | params_total | params_non_embedding
    seeds: list[int] = field(default_factory=lambda: [0])
    schedule: str = "cosine"  # cosine: independent runs | wsd: cooldowns branch from stable-phase checkpoints
    cooldown_fraction: float = 0.2
    recipes: dict[str, dict] = field(default_factory=lambda: {"base": {}})
    overrides: dict = field(default_factory=dict)  # applied to every cell (nested keys)
    hparams: HparamRule = field(default_factory=HparamRule)
    grid: Grid = field(default_factory=Grid)
    launcher: Launcher = field(default_factory=Launcher)
    throughput: Throughput = field(default_factory=Throughput)
    bootstrap: int = 1000  # resamples for the fits' intervals
    # the rule's LR times each of these (an LR check: `python -m scaling lrcheck SPEC`); with more than one, a
    # cell's recipe reads "RECIPE@lrX" so that nothing fits across learning rates
    lr_scales: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self):
        if bool(self.tokens_per_param) == bool(self.flops):
            raise ConfigError("a sweep spec gives exactly one of tokens_per_param or flops")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule '{self.schedule}' is not cosine or wsd")
        if not self.sizes:
            raise ConfigError("a sweep spec lists at least one size")
        if self.flops_convention not in FLOPS:
            raise ConfigError(f"flops_convention '{self.flops_convention}' is not one of {sorted(FLOPS)}")
        if self.params_convention not in PARAMS:
            raise ConfigError(f"params_convention '{self.params_convention}' is not one of {sorted(PARAMS)}")
        if self.grid.sizes_per_budget > len(self.sizes):
            raise ConfigError(f"grid.sizes_per_budget={self.grid.sizes_per_budget} exceeds the {len(self.sizes)} sizes")
        if not self.lr_scales or min(self.lr_scales) <= 0:
            raise ConfigError(f"lr_scales={self.lr_scales}: give one or more positive factors")
        if self.grid.sizes_per_budget and not self.flops:
            raise ConfigError("grid.sizes_per_budget places sizes around IsoFLOP budgets: give `flops`")


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} not found")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a mapping")
    return build(SweepSpec, values)
