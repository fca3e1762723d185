"""Submit many training runs as SLURM job arrays: one cell (a config and its overrides) per array task.

    python -m train.slurm_array CELLS.txt [--max-concurrent 8] [--sbatch-arg=--gpus-per-node=1 ...]

CELLS.txt holds one line per run: `CONFIG key=value ...`. The cluster's MaxArraySize (from `scontrol show
config`) caps the indices of one array, so a longer list goes in chunks: each chunk is one array whose tasks read
line (SLURM_ARRAY_TASK_ID + ARRAY_OFFSET) of the file. `%N` caps how many tasks of each chunk run at once.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

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
) -> list[str]:
    """Submit every line of `cells_file`; returns the job ids, one per chunk."""
    cells_file = Path(cells_file).resolve()
    n = sum(1 for line in cells_file.read_text().splitlines() if line.strip())
    if n == 0:
        raise ValueError(f"{cells_file} lists no cells")
    ids = []
    for offset, count in chunks(n, max_array_size()):
        spec = f"0-{count - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
        cmd = ["sbatch", "--parsable", f"--array={spec}", f"--export=ALL,CELLS={cells_file},ARRAY_OFFSET={offset}"]
        if dependency:
            cmd.append(f"--dependency={dependency}")
        cmd += [*sbatch_args, str(SCRIPT)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"sbatch refused the array ({' '.join(cmd)}): {out.stderr.strip()}")
        ids.append(out.stdout.strip().split(";")[0])
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells")
    ap.add_argument("--max-concurrent", type=int, default=0)
    ap.add_argument(
        "--sbatch-arg", action="append", default=[], help="passed to sbatch, e.g. --sbatch-arg=--time=1:00:00"
    )
    args = ap.parse_args(argv)
    for job in submit_array(args.cells, args.max_concurrent, args.sbatch_arg):
        print(job)


if __name__ == "__main__":
    main()
