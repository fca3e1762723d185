"""The cells file of an array job: one JSON array of strings per line, `["CONFIG", "key=value", ...]`, the
arguments of one `train.py --config CONFIG key=value ...` run. JSON, not words split on spaces: a value with a space,
a bracket or a quote (`optim.betas=[0.9, 0.99]`) reaches the task whole. `slurm/train.sbatch` reads its line with
`python -m scaling.cellfile FILE INDEX`, which prints the arguments NUL-separated."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class CellFileError(ValueError):
    """A cells file that cannot be read as one JSON array of strings per line."""


def write_cells(path: str | Path, cells: list[list[str]]) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps([str(a) for a in args]) + "\n" for args in cells))
    tmp.replace(path)
    return path


def read_cells(path: str | Path) -> list[list[str]]:
    """Every line parsed and checked; the first bad one is named with what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CellFileError(f"cells file {path} not found")
    cells = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            args = json.loads(line)
        except json.JSONDecodeError as e:
            raise CellFileError(f"{path}:{n}: not a JSON array ({e.msg}): {line[:80]}") from e
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise CellFileError(f"{path}:{n}: must be a non-empty JSON array of strings: {line[:80]}")
        cells.append(args)
    if not cells:
        raise CellFileError(f"{path} lists no cells")
    return cells


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m scaling.cellfile CELLS INDEX   (0-based; prints the arguments NUL-separated)")
        return 2
    try:
        cells = read_cells(argv[0])
    except CellFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = int(argv[1])
    if index >= len(cells):
        print(f"error: {argv[0]} has {len(cells)} cells; there is no cell {index}", file=sys.stderr)
        return 2
    sys.stdout.write("\0".join(cells[index]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
