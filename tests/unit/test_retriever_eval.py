"""recsys-slm eval retrieval end to end on the tiny encoder + tiny data: output files, metrics equal to a naive
recomputation (own encode, full score matrix, candidate_ranks, ranking_metrics), TREC files re-scored by ranx,
baselines, and the two-stage candidate file accepted by the ranker eval."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from recsys_slm.cli import main
from recsys_slm.data.schema import InteractionLog
from recsys_slm.metrics.ranking import ranking_metrics
from recsys_slm.retriever.texts import RetrieverTextConfig, RetrieverTexts, eval_queries

KS = [1, 3, 5, 10]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_encoder_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("retrieval") / "eval"
    code = main(["eval", "retrieval", "--model", str(tiny_encoder_dir), "--out", str(out), "--data-dir",
                 str(tiny_data_dir), "indexes=[Flat,HNSW32,SQ8]", "dims=[64,32,8,128]", "ks=[1,3,5,10]", "layers=[1,5]",
                 "device=cpu", "latency_queries=5"])  # fmt: skip
    assert code == 0
    return out


def _naive(encoder_dir, data_dir, dim):
    """Everything from scratch: plain SentenceTransformer, numpy scores, recsys_slm.metrics on allowed items."""
    from sentence_transformers import SentenceTransformer

    log = InteractionLog.load(data_dir)
    texts = RetrieverTexts(log, RetrieverTextConfig(like_threshold=3.0), 3.0)
    q = eval_queries(log, texts, data_dir)
    model = SentenceTransformer(str(encoder_dir), device="cpu", truncate_dim=dim)
    ids = log.items["item_id"].tolist()
    items = model.encode(texts.item_texts(ids)).astype(np.float64)
    users = model.encode(q.frame["text"].tolist()).astype(np.float64)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    scores, labels, cands = [], [], []
    for row, excluded, u in zip(q.frame.itertuples(), q.exclude, users, strict=True):
        keep = [j for j, i in enumerate(ids) if i not in excluded]
        cands.append([ids[j] for j in keep])
        scores.append((items[keep] @ u).astype(np.float32))  # float32 scores, as the index returns
        labels.append([int(ids[j] == row.target_item_id) for j in keep])
    return ranking_metrics(scores, labels, cands, KS, q.frame["user_id"].tolist())


def test_outputs_and_report(report_dir):
    files = {p.relative_to(report_dir).as_posix() for p in report_dir.rglob("*") if p.is_file()}
    assert {"report.json", "summary.md", "pareto.png", "run.trec", "qrels.trec"} <= files
    report = json.loads((report_dir / "report.json").read_text())
    assert report["queries"]["count"] == 10 and report["data"]["catalogue"] == 16
    spec = report["models"][0]["spec"]
    grid = [(d, f) for d in (64, 32, 8) for f in ("Flat", "HNSW32", "SQ8")]
    assert [(r["model"], r["dim"], r["index"]) for r in report["results"]] == [
        (m, d, f) for m in (spec, f"{spec}@1L") for d, f in grid
    ]
    assert [m["layers"] for m in report["models"]] == [None, 1] and report["models"][1]["full_layers"] == 2
    reasons = [(s["model"], s["dim"], s["reason"]) for s in report["skipped"]]
    assert (spec, 128, "model dim is 64") in reasons and (f"{spec}@1L", 128, "model dim is 64") in reasons
    assert any(
        r.startswith("layers 5: layers=[5] exceeds the model's 2 transformer layers") for _, _, r in reasons
    )
    assert report["primary"]["dim"] == 64 and report["primary"]["index"] == "Flat"
    r = report["results"][0]
    assert r["ann_recall@10"] == 1.0 and r["code_bytes_per_vector"] == 256 and r["latency_ms"]["queries"] == 5
    assert report["models"][0]["encode"]["queries_per_s"] > 0 and report["models"][0]["embedding_dim"] == 64
    assert set(report["baselines"]) == {"popularity", "cooccurrence"}
    assert {"runs/model__d64__Flat.trec", "runs/model__d8__Flat.trec"} <= files  # trec_runs=flat
    summary = (report_dir / "summary.md").read_text()
    assert f"- {spec} dim 128: model dim is 64" in summary and "None" not in summary


@pytest.mark.parametrize("dim", [64, 8])
def test_metrics_equal_a_naive_recomputation(report_dir, tiny_encoder_dir, tiny_data_dir, dim):
    report = json.loads((report_dir / "report.json").read_text())
    got = next(r["metrics"] for r in report["results"] if r["dim"] == dim and r["index"] == "Flat")
    want = _naive(tiny_encoder_dir, tiny_data_dir, dim)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    for k in KS:
        assert got[f"hit_rate@{k}"] == got[f"recall@{k}"]


def test_trec_files_rescored_by_ranx(report_dir):
    ranx = pytest.importorskip("ranx")
    report = json.loads((report_dir / "report.json").read_text())
    qrels = ranx.Qrels.from_file(str(report_dir / "qrels.trec"), kind="trec")
    run = ranx.Run.from_file(str(report_dir / "run.trec"), kind="trec")
    theirs = ranx.evaluate(qrels, run, ["ndcg@10", "recall@5", "mrr@10"], make_comparable=True)
    primary = report["results"][0]["metrics"]
    for key, value in theirs.items():
        assert primary[key] == pytest.approx(float(value), abs=1e-6), key


def test_popularity_baseline_naive(report_dir, tiny_data_dir):
    """Popularity = interactions before each user's first held-out target, ranked over the allowed items."""
    report = json.loads((report_dir / "report.json").read_text())
    log = InteractionLog.load(tiny_data_dir)
    inter = log.interactions.sort_values("timestamp", kind="stable")
    held = pd.concat(
        [pd.read_parquet(tiny_data_dir / "tasks" / "candidates" / f"{s}.parquet") for s in ("val", "test")]
    )
    first = held.groupby("user_id")["timestamp"].min()
    fit = inter[inter["timestamp"] < inter["user_id"].map(first).fillna(np.inf)]
    counts = fit["item_id"].value_counts()
    texts = RetrieverTexts(log, RetrieverTextConfig(), 3.0)
    q = eval_queries(log, texts, tiny_data_dir)
    ids = log.items["item_id"].tolist()
    scores, labels, cands = [], [], []
    for row, excluded in zip(q.frame.itertuples(), q.exclude, strict=True):
        keep = [i for i in ids if i not in excluded]
        cands.append(keep)
        scores.append([float(counts.get(i, 0)) for i in keep])
        labels.append([int(i == row.target_item_id) for i in keep])
    want = ranking_metrics(scores, labels, cands, KS, q.frame["user_id"].tolist())
    for key, value in want.items():
        assert report["baselines"]["popularity"][key] == pytest.approx(value, abs=1e-12), key


def test_intervals_pair_each_configuration_with_its_references(report_dir):
    """ci / retained / vs_primary: point values from the per-configuration metrics, the references as documented."""
    report = json.loads((report_dir / "report.json").read_text())
    by_tag = {r["tag"]: r for r in report["results"]}
    primary = report["primary"]["tag"]
    for r in report["results"]:
        metric = r["metrics"]["recall@1"]
        assert r["ci"]["mean"] == pytest.approx(metric) and r["ci"]["users"] == 10
        assert r["ci"]["low"] <= metric <= r["ci"]["high"]
        ref = by_tag[r["retained"]["reference"]]  # the same model's full-dim Flat configuration
        assert ref["model"] == r["model"] and ref["dim"] == r["full_dim"] and ref["index"] == "Flat"
        base = ref["metrics"]["recall@1"]
        if base > 0:
            assert r["retained"]["ratio"] == pytest.approx(metric / base)
        assert r["retained"]["diff"] == pytest.approx(metric - base)
        assert r["vs_primary"]["reference"] == primary
        assert r["vs_primary"]["diff"] == pytest.approx(metric - by_tag[primary]["metrics"]["recall@1"])
    own = by_tag[primary]["retained"]
    assert own["reference"] == primary and own["diff"] == 0 and own["diff_low"] == own["diff_high"] == 0
    assert "## recall@1: 95% intervals (bootstrap over users)" in (report_dir / "summary.md").read_text()


def test_bootstrap_keys_are_validated(tmp_path, tiny_encoder_dir, tiny_data_dir, capsys):
    for bad, key in (("bootstrap_resamples=5", "bootstrap_resamples"), ("ci_level=95", "ci_level")):
        code = main(["eval", "retrieval", "--model", str(tiny_encoder_dir), "--out", str(tmp_path / "o"), bad])
        assert code == 2
        assert f"config key '{key}'" in capsys.readouterr().err


def test_bad_index_list_is_a_config_error(tmp_path, tiny_encoder_dir, tiny_data_dir, capsys):
    code = main(["eval", "retrieval", "--model", str(tiny_encoder_dir), "--out", str(tmp_path / "o"),
                 "--data-dir", str(tiny_data_dir), "indexes=[Flat,IVF4,PQ8]"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "config key 'indexes'" in err and "quote it inside the list" in err and "Traceback" not in err


def test_retrieve_candidates_feed_the_ranker_eval(tmp_path, tiny_encoder_dir, tiny_data_dir, capsys):
    from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, detect_task_kind, evaluate_ranker

    out = tmp_path / "cands"
    code = main(["retriever", "candidates", "--model", str(tiny_encoder_dir), "--out", str(out), "--data-dir",
                 str(tiny_data_dir), "k=3", "device=cpu", "missing_target=append"])  # fmt: skip
    assert code == 0
    stats = json.loads((out / "retrieval.json").read_text())
    frame = pd.read_parquet(out / "test.parquet")
    assert detect_task_kind(frame.columns) == "candidates"
    assert len(frame) == stats["records"] == 10 and stats["appended"] == 10 - stats["target_retrieved"]
    source = pd.read_parquet(tiny_data_dir / "tasks" / "candidates" / "test.parquet").set_index("user_id")
    log = InteractionLog.load(tiny_data_dir)
    seen = log.interactions.groupby("user_id")["item_id"].agg(set)
    for row in frame.itertuples():
        assert sum(row.candidate_labels) == 1 and len(row.candidate_item_ids) <= 4
        assert row.candidate_item_ids[list(row.candidate_labels).index(1)] == row.target_item_id
        assert list(row.history_item_ids) == list(source.loc[row.user_id, "history_item_ids"])
        others = set(row.candidate_item_ids) - {row.target_item_id}
        assert not others & seen[row.user_id]  # never an item the user already interacted with
    report = evaluate_ranker(
        RankerEvalConfig(task=out / "test.parquet", data_dir=tiny_data_dir, out=tmp_path / "rk")
    )
    assert report["task"]["records"] == 10 and "popularity" in report["metrics"]

    dropped = main(["retriever", "candidates", "--model", str(tiny_encoder_dir), "--out", str(tmp_path / "d"),
                    "--data-dir", str(tiny_data_dir), "k=3", "device=cpu"])  # fmt: skip
    assert dropped == 0
    d = json.loads((tmp_path / "d" / "retrieval.json").read_text())
    assert d["written"] == d["target_retrieved"] and d["system_metric_factor"] == pytest.approx(
        d["written"] / 10
    )


def test_cut_layers_equals_the_intermediate_hidden_state(tiny_encoder_dir):
    """A model cut to N layers embeds like mean pooling of hidden_states[N] (what AdaptiveLayerLoss trains)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from recsys_slm.retriever.evaluate import cut_layers

    texts = ["Liked: Toy Story; Heat. Disliked: none.", "Alien (1979), Horror"]
    full = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    feats = full.preprocess(texts)
    with torch.no_grad():
        out = full[0].auto_model(
            **{k: feats[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
        )
    mask = feats["attention_mask"].unsqueeze(-1).float()
    pooled = (out.hidden_states[1] * mask).sum(1) / mask.sum(1)
    want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    cut = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    assert cut_layers(cut, 1) == 2
    np.testing.assert_allclose(cut.encode(texts), want, atol=1e-5)
