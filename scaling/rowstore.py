"""The row stores a sweep reads (`data.rows` in its cells' data sections): checked before cells launch, built once.

    python -m scaling store SPEC    # builds (or rebuilds, when too small or made from other data) each store

Why: every cell of a study reads the same packed rows, so they are packed once before the sweep (`data.rows`); a
cell started on a missing or short store would only fail at its first step, one slot at a time. A store's size is
its largest cell's need: a cell's batches go round the store's streams, `micro_rows` rows each
(`scaling.plan.store_rows`). One store serves cells of one data section; recipes that change the data name
stores of their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data.pipeline import DataConfig, DataError
from data.rows import STREAMS, RowStore, build, recipe
from data.tokenizer import Tokenizer
from scaling.plan import Plan, store_rows


def _data(p: Plan, path: str) -> DataConfig:
    """The data section the cells reading `path` share; an error when they do not share one."""
    sections, tokenizers = {}, {}  # each tokenizer read once, not once a cell
    for c in p.cells:
        if c.config.get("data", {}).get("rows") == path:
            cfg = DataConfig(**c.config["data"])
            if cfg.tokenizer not in tokenizers:
                tokenizers[cfg.tokenizer] = Tokenizer(cfg.tokenizer).model_bytes
            sections.setdefault(json.dumps(recipe(cfg, tokenizers[cfg.tokenizer]), sort_keys=True), cfg)
    if len(sections) > 1:
        raise DataError(
            f"the sweep's cells read the row store {path} with {len(sections)} different data sections; a store "
            "serves one: give each its own data.rows"
        )
    return next(iter(sections.values()))


def problem(p: Plan, nproc: int) -> str | None:
    """Why the plan's stores cannot serve its cells (missing, too small, other data), or None when they can."""
    for path in store_rows(p, nproc):
        if not (Path(path) / "rows.json").is_file():
            return f"the sweep's cells read the row store {path}, which is not built"
        try:
            store = RowStore(path)
            store.check(_data(p, path))
        except DataError as e:
            return str(e)
        need = store_rows(p, nproc, store.streams)[path]
        if store.rows_per_stream < need:
            return f"the row store {path} holds {store.rows_per_stream} rows a stream; the sweep's cells need {need}"
    return None


def ensure(p: Plan, nproc: int, workers: int | None = None) -> str:
    """Builds each store unless it already serves the plan; a short or mismatched one is replaced (it is derived
    data: the shards it was made from stay)."""
    needs = store_rows(p, nproc)
    if not needs:
        return "the sweep reads no row store"
    said = []
    for path, rows in needs.items():
        single = Plan([c for c in p.cells if c.config.get("data", {}).get("rows") == path])
        why = problem(single, nproc)
        if why is None:
            said.append(f"{path} serves the sweep")
            continue
        data = _data(p, path)  # before anything is removed: cells that cannot share a store stop here
        if Path(path).exists():
            print(f"{why}: building it again")
            shutil.rmtree(path)
        meta = build(data, path, rows, STREAMS, workers or os.cpu_count() or 1)
        docs, seconds = meta["table"]["documents"], meta["build_seconds"]
        said.append(f"built {path}: {STREAMS} streams x {rows:,} rows over {docs:,} documents, {seconds} s")
    return "\n".join(said)
