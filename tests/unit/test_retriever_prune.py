"""recsys-slm retriever prune on the tiny encoder + tiny data: the output loads with stock sentence-transformers,
has the planned shape, its calibration texts are the retriever's training texts, the source's texts travel in the
manifest (and eval retrieval uses them), and bad keys fail with the key named."""

from __future__ import annotations

import json
import shutil

import pytest

from recsys_slm.cli import main


@pytest.fixture(scope="module")
def retriever_dir(tmp_path_factory, tiny_encoder_dir):
    """The tiny encoder with a retriever manifest recording non-default texts (3 history titles)."""
    out = tmp_path_factory.mktemp("retriever") / "model"
    shutil.copytree(tiny_encoder_dir, out)
    texts = {"max_history": 3, "like_threshold": 3.0}
    manifest = {"manifest_version": 1, "stage": "retriever_train", "config": {}, "metrics": {},
                "retriever": {"embedding_dim": 64, "matryoshka_dims": [64, 32], "similarity": "cosine",
                              "split": "leave_one_out", "texts": texts, "adaptive_layers": True}}  # fmt: skip
    (out / "recsys_slm.json").write_text(json.dumps(manifest))
    return out


def test_prune_writes_a_stock_encoder_that_keeps_the_texts(tmp_path, retriever_dir, tiny_data_dir, monkeypatch):
    from sentence_transformers import SentenceTransformer

    import recsys_slm.prune.encoder as encoder_mod
    from recsys_slm.retriever.texts import RetrieverTextConfig, RetrieverTexts

    seen = {}
    original = encoder_mod.prune_encoder

    def spy(model, *args, **kwargs):
        seen["texts"] = list(args[4] if len(args) > 4 else kwargs["calibration_texts"])
        return original(model, *args, **kwargs)

    monkeypatch.setattr(encoder_mod, "prune_encoder", spy)
    out = tmp_path / "pruned"
    code = main(["retriever", "prune", "--model", str(retriever_dir), "--out", str(out), "--data-dir",
                 str(tiny_data_dir), "neurons_keep=0.5", "layers_keep=0.5", "calibration_pairs=6", "device=cpu"])  # fmt: skip
    assert code == 0
    model = SentenceTransformer(str(out), device="cpu", truncate_dim=32)  # stock loading, Matryoshka dim
    bert = model[0].auto_model
    assert bert.config.num_hidden_layers == 1 and bert.config.intermediate_size == 64
    assert model.encode(["a film"]).shape == (1, 32)
    manifest = json.loads((out / "recsys_slm.json").read_text())
    assert manifest["stage"] == "prune" and manifest["parent"] == str(retriever_dir)
    r = manifest["retriever"]
    assert r["texts"]["max_history"] == 3 and r["matryoshka_dims"] == [64, 32] and r["adaptive_layers"] is False
    assert manifest["config"]["retriever_prune"]["calibration_pairs"] == 6
    # the calibration texts are user texts built with the source's texts (3 titles at most) + item texts
    from recsys_slm.data.schema import InteractionLog

    log = InteractionLog.load(tiny_data_dir)
    items = set(RetrieverTexts(log, RetrieverTextConfig(), 3.0).item_texts(log.items["item_id"].tolist()))
    users = [t for t in seen["texts"] if t not in items]
    assert users and len(seen["texts"]) > len(users)
    assert all(t.split("Liked: ")[1].split(". Disliked")[0].count("; ") <= 2 for t in users)
    # eval retrieval reads the carried texts
    ev = tmp_path / "eval"
    assert main(["eval", "retrieval", "--model", str(out), "--out", str(ev), "--data-dir", str(tiny_data_dir),
                 "indexes=[Flat]", "device=cpu", "latency_queries=2", "bootstrap_resamples=0"]) == 0  # fmt: skip
    info = json.loads((ev / "report.json").read_text())["models"][0]
    assert info["texts_source"] == "model manifest" and info["texts"]["max_history"] == 3


@pytest.mark.parametrize(
    ("flag", "key"),
    [("neurons_keep=0", "neurons_keep"), ("layers_keep=1.5", "layers_keep"),
     ("calibration_pairs=0", "calibration_pairs"), ("heads_keep=0.5", "heads_keep")],
)  # fmt: skip
def test_bad_keys_are_named(tmp_path, retriever_dir, flag, key, capsys):
    code = main(["retriever", "prune", "--model", str(retriever_dir), "--out", str(tmp_path / "o"), flag])
    assert code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nothing_to_prune_is_refused(tmp_path, retriever_dir, capsys):
    code = main(["retriever", "prune", "--model", str(retriever_dir), "--out", str(tmp_path / "o"),
                 "neurons_keep=1.0", "layers_keep=1.0"])  # fmt: skip
    assert code == 2 and "nothing would be pruned" in capsys.readouterr().err
