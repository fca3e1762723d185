"""What the study tests read from a STUDY.md and a results CSV: the prose as read (whatever its line breaks) and
the rows of its tables, so a test can hold each figure against what the data give."""

from __future__ import annotations

import csv
from pathlib import Path


def flat(doc: Path) -> str:
    return " ".join(doc.read_text().split())


def table_rows(doc: Path, first: set[str], width: int) -> dict:
    """{(first cell, second cell): the other cells} of every table row `width` cells wide whose first is in `first`."""
    rows = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == width and cells[0] in first:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def row(doc: Path, label: str) -> list[str]:
    """The cells after `label` of the table row that starts with it."""
    line = next(line for line in doc.read_text().splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
