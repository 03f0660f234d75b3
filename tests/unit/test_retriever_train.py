"""Retriever training and distillation on the tiny encoder: a few steps through the CLI, outputs that plain
sentence-transformers loads with truncate_dim, manifests, config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from recsys_slm.cli import main
from recsys_slm.config import ConfigError, load_config
from recsys_slm.model_dir import read_manifest
from recsys_slm.retriever.losses import LogQCorrectedMNRLoss
from recsys_slm.retriever.train import MatryoshkaConfig, RetrieverTrainConfig, build_train_loss, item_log_q

COMMON = ["batch_size=8", "lr=1e-3", "device=cpu", "log_every=1", "max_seq_length=64"]

LOAD = """
import json, sys
from sentence_transformers import SentenceTransformer
shapes = {}
for dim in map(int, sys.argv[2:]):
    m = SentenceTransformer(sys.argv[1], device="cpu", truncate_dim=dim)
    shapes[dim] = list(m.encode(["Liked: Toy Story. Disliked: none.", "Heat (1995), Action"]).shape)
print(json.dumps({"shapes": shapes, "recsys_slm_imported": any(k.startswith("recsys_slm") for k in sys.modules)}))
"""


def _load_outside(path, *dims):
    """Load with plain sentence-transformers in a fresh interpreter that never imports recsys_slm."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), *map(str, dims)], capture_output=True, text=True, timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("retriever") / "teacher"
    code = main(["retriever", "train", "--model", str(tiny_encoder_dir), "--data-dir", str(tiny_data_dir),
                 "--out", str(out), "max_steps=3", "matryoshka.dims=[768,64,32,16]", "logq_correction=true", *COMMON])  # fmt: skip
    assert code == 0
    return out


def test_train_writes_a_loadable_matryoshka_model(trained, capsys):
    manifest = read_manifest(trained)
    assert manifest["stage"] == "retriever_train"
    r = manifest["retriever"]
    assert r["embedding_dim"] == 64 and r["matryoshka_dims"] == [64, 32, 16]  # 768 clipped to the model's 64
    assert r["texts"]["like_threshold"] == 3.0 and r["texts"]["item_template"] == "{text}"
    m = manifest["metrics"]
    assert m["steps"] == 3 and m["pairs"] > 10 and m["s_per_step"] > 0
    assert set(m["val"]) == {"queries", "d64", "d32", "d16"} and 0 <= m["val"]["d16"]["recall@10"] <= 1
    assert manifest["config"]["max_steps"] == 3 and manifest["config"]["logq_correction"] is True
    got = _load_outside(trained, 16, 64)
    assert got == {"shapes": {"16": [2, 16], "64": [2, 64]}, "recsys_slm_imported": False}


def test_distill_student_with_projection(trained, tmp_path, tiny_data_dir):
    from recsys_slm.models.tiny import build_tiny_encoder

    student = build_tiny_encoder(tmp_path / "student", seed=1, hidden_size=32)
    out = tmp_path / "distilled"
    code = main(["retriever", "distill", "--model", str(student), "--teacher", str(trained), "--data-dir",
                 str(tiny_data_dir), "--out", str(out), "max_steps=2", "matryoshka.dims=[32,16]",
                 "distill.label_weight=0.5", *COMMON])  # fmt: skip
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["stage"] == "retriever_distill" and manifest["parent"] == str(student)
    r = manifest["retriever"]
    assert r["teacher_dim"] == 64 and r["embedding_dim"] == 32 and r["matryoshka_dims"] == [32, 16]
    assert r["projection"] == {"file": "distill_projection.safetensors", "in": 32, "out": 64}
    assert r["texts_source"] == "model manifest"  # the student reads the teacher's texts
    assert (out / "distill_projection.safetensors").is_file()
    m = manifest["metrics"]
    assert (
        m["steps"] == 2
        and set(m["teacher_val"]) == {"queries", "d64"}
        and set(m["val"]) == {"queries", "d32", "d16"}
    )
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out), device="cpu", truncate_dim=16).encode(["Heat (1995)"]).shape == (
        1,
        16,
    )


def test_distill_needs_a_teacher(tmp_path, tiny_encoder_dir, tiny_data_dir, capsys):
    code = main(["retriever", "distill", "--model", str(tiny_encoder_dir), "--data-dir", str(tiny_data_dir),
                 "--out", str(tmp_path / "o"), "max_steps=1"])  # fmt: skip
    assert code == 2
    assert "config key 'distill.teacher': required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_validation_names_keys(tmp_path):
    with pytest.raises(ConfigError, match="config key 'batch_size': must be >= 2"):
        RetrieverTrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="config key 'matryoshka.weights': needs one weight per dim"):
        load_config(RetrieverTrainConfig, None, ["matryoshka.dims=[64,32]", "matryoshka.weights=[1.0]"])
    with pytest.raises(ConfigError, match="unknown config key 'distill.temprature'"):
        load_config(RetrieverTrainConfig, None, ["distill.temprature=0.1"])
    with pytest.raises(ConfigError, match="config key 'distill.score_loss': got 'kl'"):
        load_config(RetrieverTrainConfig, None, ["distill.score_loss=kl"])
    with pytest.raises(ConfigError, match="config key 'out': required"):
        from recsys_slm.retriever.train import train_retriever

        train_retriever(RetrieverTrainConfig(model="x"))


def test_ladder_and_loss_choice(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    ladder = MatryoshkaConfig(dims=[768, 512, 256, 128, 64, 32], weights=[1, 1, 1, 1, 2, 2])
    assert ladder.ladder(384) == ([384, 256, 128, 64, 32], [1.0, 1.0, 1.0, 2.0, 2.0])
    assert MatryoshkaConfig().ladder(384) == ([], [])
    model = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    kinds = {
        (): losses.MultipleNegativesRankingLoss,
        ((), True): losses.AdaptiveLayerLoss,
        ((64, 32), False): losses.MatryoshkaLoss,
        ((64, 32), True): losses.Matryoshka2dLoss,
    }
    for key, cls in kinds.items():
        dims, adaptive = key if key else ((), False)
        cfg = RetrieverTrainConfig(
            logq_correction=False, matryoshka={"dims": list(dims), "adaptive_layers": adaptive}
        )
        loss, got = build_train_loss(model, cfg)
        assert isinstance(loss, cls) and got == list(dims)
    loss, _ = build_train_loss(model, RetrieverTrainConfig(matryoshka={"dims": [64, 32]}))  # logQ by default
    assert isinstance(loss, losses.MatryoshkaLoss) and isinstance(loss.loss, LogQCorrectedMNRLoss)
    # 2D Matryoshka around the logQ loss: one forward gives a finite loss with gradients
    loss, _ = build_train_loss(model, RetrieverTrainConfig(matryoshka={"dims": [64, 32], "adaptive_layers": True}))
    texts = (["liked heat", "liked alien", "liked babe"], ["heat (1995)", "alien (1979)", "babe (1995)"])
    feats = [dict(model.preprocess(list(t))) for t in texts]
    value = loss(feats, torch.log(torch.tensor([0.5, 0.3, 0.2])))
    assert torch.isfinite(value) and value.requires_grad
    assert item_log_q(["a", "b", "a", "c"]) == pytest.approx(np.log([0.5, 0.25, 0.5, 0.25]))
