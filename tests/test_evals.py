"""Tasks score what they claim (and fail where they must), baselines are computed from the items, and the harness
runs a model through the batched engine on the embedded data's held-out scenes, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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


# --------------------------------------------------------------------------------------------- lm-eval bridge
LOCAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {items}}}}}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
LOCAL_MC = """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}]
"""
LOCAL_GEN = """output_type: generate_until
doc_to_target: "{{target}}"
generation_kwargs: {until: ["."], max_gen_toks: 12, do_sample: false}
metric_list: [{metric: exact_match}]
"""
ITEMS = [
    {
        "question": "how many shapes are there? answer:",
        "choices": ["two", "three", "seven"],
        "answer": 1,
        "target": "a",
    },
    {"question": "what color is the circle?", "choices": ["red", "blue"], "answer": 0, "target": "red"},
    {"question": "the large green", "choices": ["square", "cross", "circle", "diamond"], "answer": 3, "target": "x"},
]


def test_lm_eval_bridge_scores_what_the_model_gives_and_runs_local_tasks(random_export, tmp_path):
    """Packed log-likelihoods equal one plain forward per request; lm-eval's own CLI runs a multiple-choice and a
    generate-until task from local files through the bridge, and its accuracy is the argmax of those scores."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    from data.layout import layout_document
    from data.packing import document_batch
    from evals.lmeval import FusionLM

    lm = FusionLM(pretrained=str(random_export), batch_size=3)
    pairs = [(it["question"], " " + c) for it in ITEMS for c in it["choices"]]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs])
    cfg, special = lm.model.cfg, lm.tok.special
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c, k = lm._split(ctx, cont)
        batch = document_batch(layout_document([c + k], special, cfg.patch_size, cfg.position_scheme, eos=False))
        with torch.no_grad():
            logp = F.log_softmax(lm.model(**batch, return_logits=True).logits[0].float(), -1)
        assert ll == pytest.approx(sum(float(logp[len(c) + j, t]) for j, t in enumerate(k)), abs=1e-4)
    text = "how many shapes are there? two."  # shorter than the context: one window, scored from <bos>
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])[0][0], abs=1e-4)
    right, at = 0, 0
    for it in ITEMS:  # lm-eval's acc: the choice of highest log-likelihood is the answer
        scores = [ll for ll, _ in got[at : at + len(it["choices"])]]
        right += scores.index(max(scores)) == it["answer"]
        at += len(it["choices"])
    expected_acc = right / len(ITEMS)

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in (("fusion_local_mc", LOCAL_MC), ("fusion_local_gen", LOCAL_GEN)):
        (tasks / f"{name}.yaml").write_text(LOCAL_TASK.format(name=name, items=items) + body)
    args = ["--model", "fusion", "--model_args", f"pretrained={random_export}", "--batch_size", "4", "--tasks"]
    args += ["fusion_local_mc,fusion_local_gen", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "evals.lmeval", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result.read_text())
    assert results["results"]["fusion_local_mc"]["acc,none"] == pytest.approx(expected_acc)
    assert 0.0 <= results["results"]["fusion_local_gen"]["exact_match,none"] <= 1.0
    assert results["n-samples"]["fusion_local_gen"]["effective"] == len(ITEMS)
