"""Running cells as SLURM job arrays: one cell per array task, its arguments one line of a cells file
(`scaling.cellfile`: a JSON array per line).

    python -m scaling.slurm CELLS [--max-concurrent 8] [--sbatch-arg=--gpus-per-node=1 ...]

The cluster's MaxArraySize (from `scontrol show config`) caps the indices of one array, so a longer list goes in
chunks: each chunk is one array whose tasks read line (SLURM_ARRAY_TASK_ID + ARRAY_OFFSET) of the file. `%N` caps
how many tasks of each chunk run at once.

A sweep's `run` records which array task holds each cell (OUT/slurm/jobs.json) and asks squeue, on every `run`,
which of them are still queued or running: those are not submitted again; a cell whose task ended without a
summary (failed, cancelled, timed out) is submitted anew; finished cells get their rows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from scaling.cellfile import read_cells, write_cells
from scaling.plan import Plan
from scaling.results import finished, has_summary, record, recorded_keys
from scaling.spec import SweepSpec

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


def max_array_size() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 1001  # SLURM's default


def chunks(n: int, limit: int) -> list[tuple[int, int]]:
    """(offset, count) pieces of n cells, each an array with indices 0..count-1 < limit."""
    return [(start, min(limit, n - start)) for start in range(0, n, limit)]


def submit_array(
    cells_file: str | Path, max_concurrent: int = 0, sbatch_args: list[str] = (), dependency: str | None = None
) -> list[tuple[str, int, int]]:
    """Submit every line of `cells_file` (each checked first); returns (job id, offset, count) per chunk."""
    cells_file = Path(cells_file).resolve()
    n = len(read_cells(cells_file))
    submitted = []
    for offset, count in chunks(n, max_array_size()):
        spec = f"0-{count - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
        cmd = ["sbatch", "--parsable", f"--array={spec}", f"--export=ALL,CELLS={cells_file},ARRAY_OFFSET={offset}"]
        if dependency:
            cmd.append(f"--dependency={dependency}")
        cmd += [*sbatch_args, str(SCRIPT)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=SCRIPT.parents[1])  # the tasks run from there
        if out.returncode:
            raise RuntimeError(f"sbatch refused the array ({' '.join(cmd)}): {out.stderr.strip()}")
        submitted.append((out.stdout.strip().split(";")[0], offset, count))
    return submitted


def alive_tasks() -> set[str]:
    """`JOB_TASK` of every array task that is queued or running (squeue lists only jobs not yet ended)."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def run_slurm(spec: SweepSpec, p: Plan) -> None:
    out = Path(spec.out)
    state_dir = out / "slurm"
    state_dir.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    jobs_path = state_dir / "jobs.json"
    jobs: dict[str, str] = json.loads(jobs_path.read_text()) if jobs_path.exists() else {}
    alive = alive_tasks()
    recorded = sum(record(out, c, spec.flops_convention) for c in p.cells if has_summary(c) and not c.is_trunk)
    in_csv = recorded_keys(out)
    args = [f"--ntasks-per-node={spec.launcher.nproc}", f"--output={out}/logs/%A_%a.out", *spec.launcher.sbatch_args]
    waiting = {c.key for c in p.cells if not finished(c, in_csv) and jobs.get(c.key) in alive}
    trunk_jobs = {jobs[c.key].split("_")[0] for c in p.cells if c.is_trunk and c.key in waiting}
    submitted = 0
    needed = {c.trunk for c in p.cells if c.trunk and not finished(c, in_csv)}  # trunks of branches still to train
    for stage, group in (
        ("trunks", [c for c in p.cells if c.is_trunk and c.key in needed]),
        ("cells", [c for c in p.cells if not c.is_trunk]),
    ):
        group = [c for c in group if not finished(c, in_csv) and c.key not in waiting]
        if not group:
            continue
        for c in group:
            c.write_config()
        path = write_cells(state_dir / f"{stage}.txt", [[str(c.config_path)] for c in group])
        dependency = "afterok:" + ":".join(sorted(trunk_jobs)) if stage == "cells" and trunk_jobs else None
        for job, offset, count in submit_array(path, spec.launcher.max_concurrent, args, dependency):
            for task in range(count):
                jobs[group[offset + task].key] = f"{job}_{task}"
            if stage == "trunks":
                trunk_jobs.add(job)
            print(f"submitted {count} {stage} as array {job}")
        submitted += len(group)
        tmp = jobs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(jobs, indent=1))
        tmp.replace(jobs_path)
    done = sum(finished(c, in_csv) or (c.is_trunk and c.key not in needed) for c in p.cells)
    print(
        f"{done} of {len(p.cells)} cells finished ({recorded} rows recorded now), {len(waiting)} queued or running, "
        f"{submitted} submitted; run again to record the rest"
        if done < len(p.cells)
        else f"all {len(p.cells)} cells finished ({recorded} rows recorded now)"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells")
    ap.add_argument("--max-concurrent", type=int, default=0)
    ap.add_argument(
        "--sbatch-arg", action="append", default=[], help="passed to sbatch, e.g. --sbatch-arg=--time=1:00:00"
    )
    args = ap.parse_args(argv)
    for job, offset, count in submit_array(args.cells, args.max_concurrent, args.sbatch_arg):
        print(f"{job} (cells {offset}-{offset + count - 1})")


if __name__ == "__main__":
    main()
