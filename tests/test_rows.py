"""Row stores (`data.rows`): the rows the streaming pipeline packs, stored once and gathered bit for bit; the same
bytes from any number of build processes; a loader that resumes exactly; clear errors for the wrong data and for
running out of rows; and a training run that reads one and resumes on the same rows after a kill."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mixture
from test_train import launch, losses_by_step, samples_by_step

from data.pipeline import DataError, StreamWorker
from data.rows import RowLoader, RowStore, build, data_config, open_loader
from data.tokenizer import Tokenizer

STREAMS, ROWS, BATCH = 3, 24, 4


@pytest.fixture(scope="module")
def cfg(embedded):
    """The embedded mixture (JPEG scenes, MNIST digits, questions, Shakespeare), rows of 128."""
    return mixture(embedded, seq_len=128, batch_size=BATCH, workers=2)


@pytest.fixture(scope="module")
def store(cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rows") / "store"
    build(cfg, str(out), rows=ROWS, streams=STREAMS, workers=2)
    return out


def test_stored_rows_are_the_streaming_pipelines_rows(cfg, store):
    """Every batch gathered from the store equals, tensor for tensor, the batch the stream's own worker packs."""
    rows = RowStore(store)
    tok = Tokenizer(cfg.tokenizer)
    patches = 0
    for s in range(STREAMS):
        batches = StreamWorker(cfg, tok, s, STREAMS, None).batches(0)
        for b in range(ROWS // BATCH):
            want = next(batches)
            pieces = want.pop("_meta")["pieces"]
            got = rows.rows(s, b * BATCH, BATCH)
            assert want.keys() == got.keys()
            for k in want:
                assert want[k].dtype == torch.from_numpy(got[k]).dtype and torch.equal(
                    want[k], torch.from_numpy(got[k])
                )
            assert rows.pieces(s, b * BATCH, BATCH) == pieces
            patches += len(got["patches"])
    assert patches > 0  # images were there to gather


def test_a_build_is_the_same_bytes_with_any_number_of_processes(cfg, store, tmp_path):
    build(cfg, str(tmp_path / "one"), rows=ROWS, streams=STREAMS, workers=1)
    names = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert all(filecmp.cmp(store / n, tmp_path / "one" / n, shallow=False) for n in names)
    with pytest.raises(FileExistsError):  # never half-replaced
        build(cfg, str(tmp_path / "one"), rows=ROWS, streams=STREAMS, workers=1)


def test_the_loader_resumes_exactly_and_counts_what_it_read(cfg, store):
    """Rank 1 of 2, two gathering threads: a loader restored from the state after 3 batches hands the same next
    batches, with the same sample counts, as the loader that went on; batches go round the streams."""
    from dataclasses import replace

    run = replace(cfg, rows=str(store))
    a = RowLoader(run, rank=1, world=2)
    first = [next(a) for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint stores it
    on = [next(a) for _ in range(2)]
    b = open_loader(run, rank=1, world=2, state=state)
    again = [next(b) for _ in range(2)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(on, again, strict=True) for k in x)
    assert a.skip_counts() == b.skip_counts() and a.skip_counts()["samples"] > 0
    store_rows = RowStore(store)
    # rank 1's batch c is the run's batch 2c + 1: stream (2c + 1) mod 3, rows from ((2c + 1) // 3) * BATCH
    for c, batch in enumerate(first):
        j = 2 * c + 1
        assert torch.equal(batch["tokens"], torch.from_numpy(store_rows.rows(j % 3, (j // 3) * BATCH, BATCH)["tokens"]))
    assert a.capacity() == 9  # 6 batches a stream x 3 streams = the run's batches 0-17; rank 1 takes 1, 3, ..., 17
    with pytest.raises(DataError, match="other rows"):
        RowLoader(run, rank=1, world=2, state={**state, "batch_size": 2 * BATCH})
    with pytest.raises(DataError, match="streaming loader"):
        RowLoader(run, rank=1, world=2, state={k: v for k, v in state.items() if k != "kind"})
    a.close()
    b.close()


def test_wrong_data_and_running_out_are_clear_errors(cfg, store, tmp_path):
    from dataclasses import replace

    with pytest.raises(DataError, match="seed: store 0, run 1"):
        RowLoader(replace(cfg, rows=str(store), seed=1))
    with pytest.raises(DataError, match="seq_len"):
        RowLoader(replace(cfg, rows=str(store), seq_len=256))
    with pytest.raises(DataError, match="larger --rows"):
        RowStore(store).rows(0, ROWS - BATCH + 1, BATCH)
    loader = RowLoader(replace(cfg, rows=str(store)))
    for _ in range(loader.capacity()):
        next(loader)
    with pytest.raises(DataError, match="larger --rows"):
        next(loader)
    loader.close()
    with pytest.raises(DataError, match="skipped"):  # nothing to read: the build fails and leaves nothing behind
        build(replace(cfg, kinds=["chat"]), str(tmp_path / "none"), rows=4, streams=2, workers=1)
    assert not list(tmp_path.glob("none*"))
    with pytest.raises(ValueError, match="at least one row"):
        build(cfg, str(tmp_path / "zero"), rows=0, streams=2, workers=1)
    damaged = tmp_path / "damaged"  # a copy with one stream's pieces cut short
    shutil.copytree(store, damaged)
    pieces = damaged / "s001" / "pieces.bin"
    pieces.write_bytes(pieces.read_bytes()[:-8])
    with pytest.raises(DataError, match="pieces.bin is .* bytes where the build wrote"):
        RowStore(damaged).rows(1, 0, BATCH)
    half = tmp_path / "half"  # what a build killed before its rename leaves under the final name: nothing
    (half / "s000").mkdir(parents=True)
    with pytest.raises(DataError, match="not a row store"):
        RowStore(half)


def test_a_training_run_reads_a_store_and_resumes_on_its_rows(micro_config, tmp_path):
    """Two ranks train from a store; killed inside the step-8 save and resumed, the run logs the same loss at every
    step on the same samples as the uninterrupted one. A store too small for the run stops it before any step."""
    store = tmp_path / "store"
    data = data_config(str(micro_config))
    # 12 steps x 2 ranks x 1 micro-batch = 24 batches of 2 rows over 4 streams: 6 batches, 12 rows a stream
    build(data, str(store), rows=12, streams=4, workers=2)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = launch(micro_config, whole, f"data.rows={store}")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["data_epochs"]["caption"] > 0
    result = launch(micro_config, killed, f"data.rows={store}", env={"FUSION_TEST_KILL_DURING_SAVE": "8"})
    assert result.returncode != 0
    result = launch(micro_config, killed, f"data.rows={store}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert losses_by_step(killed) == losses_by_step(whole)
    assert samples_by_step(killed) == samples_by_step(whole)
    result = launch(micro_config, tmp_path / "long", f"data.rows={store}", "steps=13")
    assert result.returncode != 0 and "--rows 14 or more" in result.stdout + result.stderr
    assert (
        not (tmp_path / "long" / "metrics.jsonl").exists()
        or "loss" not in (tmp_path / "long" / "metrics.jsonl").read_text()
    )


def test_the_cli_reads_a_configs_data_section(micro_config, tmp_path):
    sets = ["seq_len=32", "data.seed=3"]
    cfg = data_config(str(micro_config), sets)
    assert (cfg.seq_len, cfg.seed) == (32, 3)
    assert cfg.sources == data_config(str(micro_config)).sources
    with pytest.raises(SystemExit, match="no field"):
        data_config(str(micro_config), ["seqlen=32"])
    (tmp_path / "model.yaml").write_text("model: {depth: 2}\n")  # a config without a data section
    with pytest.raises(SystemExit, match="not DataConfig fields"):
        data_config(str(tmp_path / "model.yaml"))
    assert yaml.safe_load(Path(micro_config).read_text())["data"]["seq_len"] == 64
