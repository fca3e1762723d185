"""Tasks score what they claim (and fail where they must), baselines are computed from the items, and the harness
runs a model through the batched engine on the embedded data's held-out scenes, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

from evals import TASKS, get_task
from evals.task import Item


def test_caption_scores_punish_a_hallucinated_object():
    task = get_task("captioning")
    item = Item(b"", "a", "a small red circle at the top left, a large blue square at the bottom right.")
    exact = task.score("small red circle at the top left, a large blue square at the bottom right.", item)
    assert exact == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    extra = task.score("a small red circle at the top left, a large green cross at the top right.", item)
    assert extra["precision"] == 0.5 and extra["recall"] == 0.5 and task.reward("", item) == 0.0
    everything = task.score(", ".join(f"a small {c} circle at the top left" for c in ("red", "blue", "green")), item)
    assert everything["precision"] < 0.5  # listing many objects buys recall only by paying precision


def test_vqa_exact_match_and_its_majority_baseline():
    task = get_task("vqa")
    items = [
        Item(b"", "question: how many shapes are there? answer:", "two", "count"),
        Item(b"", "question: how many shapes are there? answer:", "two", "count"),
        Item(b"", "question: how many shapes are there? answer:", "three", "count"),
        Item(b"", "question: what is left of the red circle? answer:", "nothing", "spatial"),
    ]
    assert task.score("two.", items[0])["exact"] == 1.0 and task.score("three", items[0])["exact"] == 0.0
    assert task.baselines(items) == {"majority per type": ["two", "two", "two", "nothing"]}
    assert set(TASKS) == {"captioning", "vqa", "digits"}
    digits = get_task("digits")
    seven = Item(b"", "a handwritten", "seven")
    assert digits.score(" seven.", seven)["exact"] == 1.0 and digits.score("one", seven)["exact"] == 0.0


def test_harness_runs_tasks_with_their_baselines(random_export, embedded, tmp_path):
    """A random model's export through `python -m evals`: every task reports the model's score, the model without
    the image, and its blind baseline, on the same items."""
    export = random_export / "export"
    out = tmp_path / "evals.json"
    cmd = [
        sys.executable,
        "-m",
        "evals",
        str(export),
        "--data",
        str(embedded),
        "--n",
        "12",
        "--max-new-tokens",
        "8",
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    results = {r["task"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"captioning", "vqa", "digits"}
    for r in results.values():
        assert r["items"] == 12 and 0.0 <= r["model"][r["metric"]] <= 1.0
        assert "model without the image" in r["baselines"] and len(r["baselines"]) == 2
    assert set(results["vqa"]["by_kind"]) <= {"count", "color", "spatial"}
    majority = results["vqa"]["baselines"]["majority per type"]["exact"]
    # computed from the items: each type's majority answer is right on at least one item of that type
    assert majority * 12 >= len(results["vqa"]["by_kind"]) >= 1
    assert "majority per type" in result.stdout and "model without the image" in result.stdout


def test_tasks_run_during_training_with_their_baselines(micro_config, tmp_path):
    """eval.tasks: at each evaluation and at the end, the tasks' scores and baselines are logged, and the summary
    carries the final ones (what a sweep's results.csv takes as task_<name>_<metric>)."""
    from test_train import launch, metrics

    run = tmp_path / "run"
    result = launch(
        micro_config, run, "eval.tasks=[vqa,captioning]", "eval.task_items=4", "eval.task_max_new_tokens=4", nproc=1
    )
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [m for m in metrics(run) if "task/vqa/exact" in m]
    assert [m["step"] for m in logged] == [6, 12]
    for m in logged:
        assert 0.0 <= m["task/captioning/f1"] <= 1.0 and "task/vqa/baseline/majority per type" in m
        assert "task/captioning/baseline/model without the image" in m and m["task/vqa/seconds"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_tasks"]["task/vqa/exact"] == logged[-1]["task/vqa/exact"]
    bad = launch(micro_config, tmp_path / "bad", "eval.tasks=[vqq]", nproc=1)
    assert bad.returncode != 0 and "unknown task(s) ['vqq']" in bad.stdout + bad.stderr  # at config load
