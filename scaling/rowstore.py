"""The row store a sweep reads (`data.rows` in its cells' data section): checked before cells launch, built once.

    python -m scaling store SPEC    # builds (or rebuilds, when too small or made from other data) the store

Why: every cell of a study reads the same packed rows, so they are packed once before the sweep (`data.rows`); a
cell started on a missing or short store would only fail at its first step, one slot at a time. The size is the
largest cell's need: its batches go round the store's streams, `micro_rows` rows each (`scaling.plan.store_rows`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from data.pipeline import DataConfig, DataError
from data.rows import RowStore, build
from scaling.plan import STORE_STREAMS, Plan, store_rows


def _data(p: Plan) -> DataConfig:
    cell = next(c for c in p.cells if c.config.get("data", {}).get("rows"))
    return DataConfig(**cell.config["data"])


def problem(p: Plan, nproc: int) -> str | None:
    """Why the plan's store cannot serve its cells (missing, too small, other data), or None when it can."""
    need = store_rows(p, nproc)
    if need is None:
        return None
    path, rows = need
    if not (Path(path) / "rows.json").is_file():
        return f"the sweep's cells read the row store {path}, which is not built"
    try:
        store = RowStore(path)
        store.check(_data(p))
    except DataError as e:
        return str(e)
    need_here = store_rows(p, nproc, store.streams)[1]
    if store.rows_per_stream < need_here:
        return f"the row store {path} holds {store.rows_per_stream} rows a stream; the sweep's cells need {need_here}"
    return None


def ensure(p: Plan, nproc: int, workers: int | None = None) -> str:
    """Builds the store unless it already serves the plan; a short or mismatched one is replaced (it is derived
    data: the shards it was made from stay)."""
    need = store_rows(p, nproc)
    if need is None:
        return "the sweep reads no row store"
    why = problem(p, nproc)
    if why is None:
        return f"{need[0]} serves the sweep"
    path, rows = need
    if Path(path).exists():
        print(f"{why}: building it again")
        shutil.rmtree(path)
    meta = build(_data(p), path, rows, STORE_STREAMS, workers or os.cpu_count() or 1)
    docs, seconds = meta["table"]["documents"], meta["build_seconds"]
    return f"built {path}: {STORE_STREAMS} streams x {rows:,} rows over {docs:,} documents, {seconds} s"
