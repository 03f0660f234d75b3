"""recsys-slm eval system on the tiny encoder + tiny LM + tiny data: the system metrics equal a naive per-user
recomputation over all users (missed targets at 0), the oracle row equals the retriever's hit rate, a dim above
the encoder's width is skipped with a note, finished cells are reused on a rerun, and bad input fails with a message naming the key or directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from recsys_slm.cli import main
from recsys_slm.config import ConfigError
from recsys_slm.evaluation.two_stage import TwoStageConfig, evaluate_two_stage

KS = [1, 3, 10]


@pytest.fixture(scope="module")
def system_dir(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("two_stage") / "system"
    code = main(["eval", "system", "--retriever", str(tiny_encoder_dir), "--ranker", str(tiny_lm_dir),
                 "--out", str(out), "--data-dir", str(tiny_data_dir), "k=4", "dims=[null,8,128]", "ks=[1,3,10]",
                 "device=cpu", "batch_size=8"])  # fmt: skip
    assert code == 0
    return out


def _naive_system(pred: pd.DataFrame, score_col: str, users: list[str], k: int) -> dict[str, float]:
    """NDCG@k / Recall@k / MRR@k per user from the re-ranked candidates, 0 for users not in ``pred``."""
    out = {"ndcg": 0.0, "recall": 0.0, "mrr": 0.0}
    for user in users:
        rows = pred[pred["user_id"] == user]
        if rows.empty:
            continue  # the retriever missed this user's target: 0 at every cut-off
        order = sorted(zip(rows[score_col], rows["item_id"], rows["label"], strict=True), key=lambda t: (-t[0], t[1]))
        rank = 1 + [lab for _, _, lab in order].index(1)
        if rank <= k:
            out["ndcg"] += 1.0 / math.log2(rank + 1)
            out["recall"] += 1.0
            out["mrr"] += 1.0 / rank
    return {name: v / len(users) for name, v in out.items()}


def test_report_and_files(system_dir):
    report = json.loads((system_dir / "report.json").read_text())
    assert {"report.json", "summary.md", "two_stage.png"} <= {p.name for p in system_dir.iterdir()}
    assert [r["tag"] for r in report["retrievers"]] == ["model", "model@8"]
    assert report["notes"] == ["model: dim 128 skipped (the model's embedding dimension is 64)"]
    kinds = {(g["retriever"], g["ranker"]): g["kind"] for g in report["grid"]}
    for tag in ("model", "model@8"):
        assert kinds[(tag, "retriever_order")] == "retriever_order" and kinds[(tag, "oracle")] == "oracle"
        assert kinds[(tag, "model")] == "ranker" and kinds[(tag, "popularity")] == "baseline"
    summary = (system_dir / "summary.md").read_text()
    assert "system ndcg@10" in summary and "model@8" in summary
    assert not (system_dir.parent / ".system.cells").exists()  # the work dir became OUT/cells


def test_system_metrics_equal_a_naive_recomputation(system_dir, tiny_data_dir):
    report = json.loads((system_dir / "report.json").read_text())
    all_users = pd.read_parquet(tiny_data_dir / "tasks" / "candidates" / "test.parquet")["user_id"].astype(str)
    for r in report["retrievers"]:
        assert r["users"] == len(all_users) == 10
        cells = {g["ranker"]: g for g in report["grid"] if g["retriever"] == r["tag"]}
        ranker = cells["model"]
        pred = pd.read_parquet(system_dir / ranker["cell"] / "predictions.parquet")
        assert pred["user_id"].nunique() == r["retrieved"] == ranker["ranked_users"]
        for k in KS:
            naive = _naive_system(pred, "score", all_users.tolist(), k)
            for name in ("ndcg", "recall", "mrr"):
                assert ranker["system"][f"{name}@{k}"] == pytest.approx(naive[name], abs=1e-12)
        # the retriever's own order, from the candidate file's retriever scores
        cand = pd.read_parquet(system_dir / r["cell"] / "test.parquet")
        rows = [(u, i, lab, s) for u, ids, labs, ss in zip(cand["user_id"], cand["candidate_item_ids"],
                cand["candidate_labels"], cand["retriever_scores"], strict=True)
                for i, lab, s in zip(ids, labs, ss, strict=True)]  # fmt: skip
        flat = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "score"])
        naive = _naive_system(flat, "score", all_users.tolist(), 3)
        assert cells["retriever_order"]["system"]["ndcg@3"] == pytest.approx(naive["ndcg"], abs=1e-12)
        # the oracle's system recall@k is the retriever's hit rate at k (k = 4 <= 10)
        assert cells["oracle"]["system"]["recall@10"] == pytest.approx(r["hit_rate"])
        assert r["system_metric_factor"] == pytest.approx(r["retrieved"] / r["users"])
        assert np.isclose(cells["oracle"]["system"]["ndcg@1"], r["hit_rate"])


def test_intervals_are_over_all_asked_users(system_dir):
    """ci.mean = the system NDCG@10 (missed users at 0), vs_primary pairs each row with the first ranker row."""
    report = json.loads((system_dir / "report.json").read_text())
    grid = report["grid"]
    primary = next(g for g in grid if g["kind"] == "ranker")
    assert (primary["retriever"], primary["ranker"]) == ("model", "model")
    for g in grid:
        assert g["ci"]["users"] == 10 and g["ci"]["mean"] == pytest.approx(g["system"]["ndcg@10"], abs=1e-12)
        vs = g["vs_primary"]
        assert (vs["retriever"], vs["ranker"]) == ("model", "model") and vs["users"] == 10
        assert vs["diff"] == pytest.approx(g["system"]["ndcg@10"] - primary["system"]["ndcg@10"], abs=1e-12)
    assert primary["vs_primary"]["diff_low"] == primary["vs_primary"]["diff_high"] == 0
    assert "## system ndcg@10: 95% intervals" in (system_dir / "summary.md").read_text()


def test_rerun_reuses_every_cell(system_dir, tiny_encoder_dir, tiny_lm_dir, tiny_data_dir, monkeypatch):
    import recsys_slm.evaluation.ranker_eval as ranker_eval
    import recsys_slm.retriever.evaluate as retriever_eval

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(ranker_eval, "evaluate_ranker", fail)
    monkeypatch.setattr(retriever_eval, "retrieve_candidates", fail)
    monkeypatch.setattr(retriever_eval, "encode_candidate_source", fail)
    monkeypatch.setattr(retriever_eval, "write_candidates", fail)
    before = json.loads((system_dir / "report.json").read_text())
    cfg = TwoStageConfig(retrievers=[str(tiny_encoder_dir)], rankers=[str(tiny_lm_dir)], out=system_dir,
                         data_dir=tiny_data_dir, k=4, dims=[None, 8, 128], ks=KS, device="cpu", batch_size=8)  # fmt: skip
    after = evaluate_two_stage(cfg)
    assert [g["system"] for g in after["grid"]] == [g["system"] for g in before["grid"]]


def test_bad_input(tmp_path, tiny_encoder_dir, tiny_data_dir, capsys):
    with pytest.raises(ConfigError, match="retrievers"):
        evaluate_two_stage(TwoStageConfig(out=tmp_path / "o", data_dir=tiny_data_dir))
    with pytest.raises(ConfigError, match="ks"):
        TwoStageConfig(ks=[10, 10])
    with pytest.raises(ConfigError, match="dims"):
        TwoStageConfig(dims=[0])
    with pytest.raises(ConfigError, match="k"):
        TwoStageConfig(k=0)
    with pytest.raises(ConfigError, match="bootstrap_resamples"):
        TwoStageConfig(bootstrap_resamples=10)
    with pytest.raises(ConfigError, match="ci_level"):
        TwoStageConfig(ci_level=1.0)
    with pytest.raises(FileNotFoundError, match="tasks/candidates"):
        evaluate_two_stage(TwoStageConfig(retrievers=[str(tiny_encoder_dir)], out=tmp_path / "o",
                                          data_dir=tmp_path))  # fmt: skip
    code = main(["eval", "system", "--retriever", str(tiny_encoder_dir), "--out", str(tmp_path / "o2"),
                 "--data-dir", str(tiny_data_dir), "nope=1"])  # fmt: skip
    assert code != 0 and "nope" in capsys.readouterr().err


def test_each_retriever_is_encoded_once_for_all_its_dims(tmp_path, tiny_encoder_dir, tiny_data_dir, monkeypatch):
    import recsys_slm.retriever.evaluate as retriever_eval

    calls = []
    real = retriever_eval.encode_candidate_source

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(retriever_eval, "encode_candidate_source", counted)
    report = evaluate_two_stage(TwoStageConfig(retrievers=[str(tiny_encoder_dir)], out=tmp_path / "o",
                                               data_dir=tiny_data_dir, k=4, dims=[None, 8], ks=KS, device="cpu",
                                               baselines=False))  # fmt: skip
    assert calls == [str(tiny_encoder_dir)] and [r["tag"] for r in report["retrievers"]] == ["model", "model@8"]
