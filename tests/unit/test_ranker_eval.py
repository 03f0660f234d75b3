"""evaluate_ranker end to end on a synthetic data directory: outputs, row counts, and an outside recomputation of
the reported ranking metrics from run.trec / qrels.trec with ranx."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys_slm.config import ConfigError, config_to_dict
from recsys_slm.data.schema import validate_log
from recsys_slm.data.tasks import (
    CandidateTaskConfig,
    PointwiseTaskConfig,
    build_candidate_task,
    build_pointwise_task,
    save_task,
)
from recsys_slm.evaluation.ranker_eval import (
    RankerEvalConfig,
    detect_task_kind,
    evaluate_ranker,
    resolve_data_dir,
)
from recsys_slm.metrics import auc

TITLES = [
    "Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Twelve Monkeys", "Babe", "Star Wars",
    "Pulp Fiction", "Fargo", "Contact", "Titanic", "Scream", "Liar Liar", "Casablanca", "Alien", "Heat",
    "Braveheart", "Forrest Gump", "Jurassic Park",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 users x 10 interactions over 20 items, with pointwise (history 3) and 4-negative candidate tasks."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(6):
        items = rng.choice(len(TITLES), size=10, replace=False)
        for pos, item in enumerate(items):
            rows.append((f"u{u}", str(item), 1000 + 10 * pos + u, float(rng.integers(1, 6))))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(len(TITLES))],
            "title": TITLES,
            "year": pd.array([1990 + i for i in range(len(TITLES))], dtype="Int64"),
            "genres": [["Drama"] if i % 2 else ["Comedy"] for i in range(len(TITLES))],
        }
    )
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(6)], "age": [20 + u for u in range(6)]})
    log = validate_log(interactions, items, users)
    root = tmp_path_factory.mktemp("eval_data") / "data"
    log.save(root)
    pointwise, _ = build_pointwise_task(log, PointwiseTaskConfig(history_len=3))
    save_task(pointwise, root / "tasks" / "pointwise")
    candidates, _ = build_candidate_task(log, CandidateTaskConfig(num_negatives=4, history_len=3))
    save_task(candidates, root / "tasks" / "candidates")
    return root


def _ranx_metrics(out: Path, run_file: str = "run.trec") -> dict[str, float]:
    ranx = pytest.importorskip("ranx")
    qrels = ranx.Qrels.from_file(str(out / "qrels.trec"), kind="trec")
    run = ranx.Run.from_file(str(out / run_file), kind="trec")
    metrics = ["ndcg@10", "mrr@10", "recall@10", "ndcg@5", "recall@1"]
    return {k: float(v) for k, v in ranx.evaluate(qrels, run, metrics, make_comparable=True).items()}


def _assert_trec_matches(out: Path, report: dict, method: str, run_file: str) -> None:
    theirs = _ranx_metrics(out, run_file)
    for key, value in theirs.items():
        assert report["metrics"][method][key] == pytest.approx(value, abs=1e-6), (method, key)


def _check_common_outputs(out: Path, report: dict) -> None:
    for name in ("report.json", "summary.md", "predictions.parquet"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"] == report["metrics"]
    assert set(report["files"]) <= {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    summary = (out / "summary.md").read_text()
    for method in report["metrics"]:
        assert f"| {method} |" in summary


# ------------------------------------------------------------------------------------------- baselines only


def test_candidates_baselines_only(data_dir, tmp_path):
    task = data_dir / "tasks" / "candidates" / "test.parquet"
    out = tmp_path / "out"
    report = evaluate_ranker(RankerEvalConfig(model="none", task=task, out=out))
    frame = pd.read_parquet(task)
    _check_common_outputs(out, report)
    for name in ("run.trec", "qrels.trec", "ranking.png"):
        assert (out / name).is_file()
    assert report["model"] is None and report["primary_method"] == "logreg"
    assert set(report["metrics"]) == {"logreg", "popularity", "item_mean_rating", "user_like_rate"}
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == sum(len(c) for c in frame["candidate_item_ids"]) == report["task"]["candidates"]
    assert {
        "qid",
        "user_id",
        "item_id",
        "label",
        "score",
        "rank",
        "score_popularity",
        "rank_popularity",
    } <= set(preds)
    # Each query's ranks are a permutation of 1..N and the label column marks exactly one target.
    for _, group in preds.groupby("qid"):
        assert sorted(group["rank"]) == list(range(1, len(group) + 1))
        assert group["label"].sum() == 1
    for method in report["metrics"]:
        _assert_trec_matches(out, report, method, f"runs/{method}.trec")
    _assert_trec_matches(out, report, "logreg", "run.trec")


def test_pointwise_baselines_only(data_dir, tmp_path):
    task = data_dir / "tasks" / "pointwise" / "test.parquet"
    out = tmp_path / "out"
    report = evaluate_ranker(RankerEvalConfig(task=task, out=out))
    _check_common_outputs(out, report)
    frame = pd.read_parquet(task)
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == len(frame)
    assert report["task"]["kind"] == "pointwise" and report["primary_metric"] == "auc"
    assert set(report["metrics"]["logreg"]) >= {"auc", "log_loss", "accuracy"}
    assert report["metrics"]["popularity"]["log_loss"] is None  # not a probability
    assert report["baselines_fit"]["cutoff_timestamp"] == int(
        pd.read_parquet(data_dir / "tasks/pointwise/train.parquet")["timestamp"].max()
    )
    assert len(set(frame["label"])) == 2, "fixture must hold both labels for the AUC cross-check"
    assert (out / "roc.png").is_file()
    assert auc(preds["label"], preds["score_popularity"]) == pytest.approx(
        report["metrics"]["popularity"]["auc"], abs=1e-12
    )


def test_max_records_takes_the_first_rows(data_dir, tmp_path):
    task = data_dir / "tasks" / "candidates" / "test.parquet"
    report = evaluate_ranker(RankerEvalConfig(task=task, out=tmp_path / "o", max_records=2))
    assert report["task"]["records"] == 2 and report["task"]["records_in_file"] == 6
    preds = pd.read_parquet(tmp_path / "o" / "predictions.parquet")
    assert preds["user_id"].unique().tolist() == pd.read_parquet(task)["user_id"].head(2).tolist()


# ------------------------------------------------------------------------------------------- with the tiny LM


def test_candidates_with_tiny_model(data_dir, tmp_path, tiny_lm_dir):
    task = data_dir / "tasks" / "candidates" / "val.parquet"
    out = tmp_path / "out"
    cfg = RankerEvalConfig(model=str(tiny_lm_dir), task=task, out=out, batch_size=4, device="cpu")
    report = evaluate_ranker(cfg)
    _check_common_outputs(out, report)
    frame = pd.read_parquet(task)
    assert report["primary_method"] == "model"
    assert report["model"]["params"] > 0 and report["model"]["device"] == "cpu"
    thr = report["throughput"]
    assert thr["prompts"] == report["task"]["candidates"] == sum(len(c) for c in frame["candidate_item_ids"])
    assert thr["prompts_per_s"] > 0 and thr["batch_latency_ms"]["p99"] >= thr["batch_latency_ms"]["p50"] > 0
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == thr["prompts"]
    assert "score_logreg" in preds and "rank_logreg" in preds
    _assert_trec_matches(out, report, "model", "run.trec")
    # run.trec scores are N + 1 - rank: strictly decreasing within a query, so no tool can re-break ties.
    run = pd.read_csv(
        out / "run.trec",
        sep=" ",
        header=None,
        names=["qid", "q0", "doc", "rank", "score", "tag"],
        dtype={"qid": str, "doc": str},
    )
    assert (run.groupby("qid")["score"].diff().dropna() < 0).all()
    assert (run["rank"] + run["score"] == run.groupby("qid")["rank"].transform("size") + 1).all()


def test_pointwise_with_tiny_model(data_dir, tmp_path, tiny_lm_dir):
    task = data_dir / "tasks" / "pointwise" / "test.parquet"
    out = tmp_path / "out"
    report = evaluate_ranker(
        RankerEvalConfig(model=str(tiny_lm_dir), task=task, out=out, device="cpu", baselines=False)
    )
    _check_common_outputs(out, report)
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == len(pd.read_parquet(task)) == report["throughput"]["prompts"]
    assert list(report["metrics"]) == ["model"]
    assert preds["p_yes"].between(0, 1).all()
    # p_yes = sigmoid(score): the score column is the logit difference.
    assert np.allclose(preds["p_yes"], 1 / (1 + np.exp(-preds["score"])), atol=1e-6)
    assert preds["label"].nunique() == 2, "fixture must hold both labels for the AUC cross-check"
    assert auc(preds["label"], preds["score"]) == pytest.approx(report["metrics"]["model"]["auc"], abs=1e-12)


# ------------------------------------------------------------------------------------------- inputs and CLI


def test_detect_task_kind():
    assert (
        detect_task_kind(["user_id", "item_id", "label", "history_item_ids", "history_labels", "x"])
        == "pointwise"
    )
    assert (
        detect_task_kind(
            ["user_id", "history_item_ids", "history_labels", "candidate_item_ids", "candidate_labels"]
        )
        == "candidates"
    )
    with pytest.raises(ValueError, match="cannot tell the task kind"):
        detect_task_kind(["user_id", "item_id"])


def test_data_dir_resolution(tmp_path):
    assert (
        resolve_data_dir(tmp_path / "D" / "tasks" / "pointwise" / "test.parquet", None)
        == (tmp_path / "D").resolve()
    )
    assert resolve_data_dir(tmp_path / "t.parquet", tmp_path / "X") == tmp_path / "X"
    with pytest.raises(ConfigError, match="data_dir"):
        resolve_data_dir(tmp_path / "t.parquet", None)


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        RankerEvalConfig(model="none", baselines=False)
    with pytest.raises(ConfigError, match="max_records"):
        RankerEvalConfig(max_records=0)
    with pytest.raises(ConfigError, match="task"):
        evaluate_ranker(RankerEvalConfig(out=tmp_path / "o"))
    assert RankerEvalConfig(model="None").model is None


def test_cli_eval_ranker(data_dir, tmp_path, capsys):
    from recsys_slm.cli import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli_out"
    args = parser.parse_args(
        ["eval", "ranker", "--model", "none", "--task", str(data_dir / "tasks/candidates/test.parquet"),
         "--out", str(out), "ks=[1, 10]"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "logreg" in printed and "recall@1" in printed
    assert json.loads((out / "report.json").read_text())["config"]["ks"] == [1, 10]


def test_candidate_list_without_target_fails_before_scoring(data_dir, tmp_path):
    frame = pd.read_parquet(data_dir / "tasks" / "candidates" / "test.parquet")
    frame.at[0, "candidate_labels"] = [0] * len(frame.at[0, "candidate_labels"])
    task = tmp_path / "bad.parquet"
    frame.to_parquet(task)
    with pytest.raises(ValueError, match="no relevant candidate"):
        evaluate_ranker(
            RankerEvalConfig(model="/does/not/exist", task=task, out=tmp_path / "o", data_dir=data_dir)
        )
    assert not (tmp_path / "o").exists()


def test_eval_uses_the_prompt_recorded_in_the_model_manifest():
    """A teacher trained with a custom prompt must be evaluated with it, not with the default."""
    from recsys_slm.data.prompts import PromptConfig
    from recsys_slm.evaluation.ranker_eval import resolve_prompt

    trained = PromptConfig(instruction="Custom wording.", candidate_template="{title}")
    manifest = {"config": {"prompt": config_to_dict(trained)}}
    prompt, source = resolve_prompt(PromptConfig(), manifest)
    assert prompt == trained and source == "model manifest"
    explicit = PromptConfig(instruction="Explicit.")
    assert resolve_prompt(explicit, manifest) == (explicit, "config")  # an explicit prompt wins
    assert resolve_prompt(PromptConfig(), None) == (PromptConfig(), "config")
