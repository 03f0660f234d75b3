"""Teacher fine-tuning on the tiny model: loss = the full-vocabulary reference, freezing and LoRA honoured,
best-checkpoint output, manifest and metrics, resume after a kill equals an uninterrupted run, config errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_slm.config import ConfigError, from_dict, load_config
from recsys_slm.data.prompts import PromptConfig, PromptRenderer
from recsys_slm.ranker.batching import collate, epoch_batches, padding_fraction
from recsys_slm.ranker.checkpoint import read_checkpoint_info
from recsys_slm.ranker.train import (
    TeacherTrainConfig,
    pointwise_loss,
    prepare_trainable,
    train_teacher,
    work_dir,
)
from recsys_slm.ranker.verbalizer import VerbalizerScorer

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "pipelines" / "configs" / "teacher" / "tiny_smoke.yaml"
PROMPT = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir) -> Path:
    return tiny_data_dir


def _cfg(tiny_lm_dir, data_dir, out, **overrides) -> TeacherTrainConfig:
    values = dict(
        model=str(tiny_lm_dir),
        data_dir=data_dir,
        out=out,
        prompt=PROMPT,
        freeze_layers=1,
        batch_size=2,
        max_steps=3,
        eval_every=0,
        checkpoint_every=0,
        lr=1e-3,
        warmup_ratio=0.0,
        device="cpu",
        progress=False,
    )
    values.update(overrides)
    return from_dict(TeacherTrainConfig, values)


def _load(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------- loss


def test_loss_equals_full_vocab_reference(tiny_lm_dir, data_dir):
    """BCE on logit_yes − logit_no = −log softmax(full logits)[label token] restricted to {yes, no}."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    from recsys_slm.data.schema import InteractionLog

    log = InteractionLog.load(data_dir)
    renderer = PromptRenderer(PromptConfig(**PROMPT), tokenizer, log.items, log.users)
    frame = pd.read_parquet(data_dir / "tasks" / "pointwise" / "train.parquet").head(4)
    seqs = [
        tokenizer(renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id).text,
                  add_special_tokens=False)["input_ids"]
        for r in frame.itertuples()
    ]  # fmt: skip
    assert len({len(s) for s in seqs}) > 1  # padding is exercised
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    scorer = VerbalizerScorer(model, tokenizer)
    ids, mask = collate(seqs, scorer.pad_id)
    loss, scores = pointwise_loss(scorer, ids, mask, labels)

    reference = torch.zeros(())
    for seq, y in zip(seqs, labels, strict=True):
        with torch.no_grad():
            full = model(input_ids=torch.tensor([seq])).logits[0, -1]  # (V,) naive: every vocabulary logit
        logp = torch.log_softmax(full[[scorer.yes_id, scorer.no_id]], dim=-1)  # (2,) over {yes, no}
        reference = reference - logp[0 if y == 1 else 1]
    torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)
    assert scores.shape == (4,)
    # Gradients flow into the model through the two verbalizer rows only (no full-vocab logits were built).
    loss.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None


# --------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("freeze_layers", [0, 1, 2])
def test_freeze_layers_honoured(tiny_lm_dir, data_dir, tmp_path, freeze_layers):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    prepare_trainable(model, _cfg(tiny_lm_dir, data_dir, tmp_path / "o", freeze_layers=freeze_layers))
    for i, layer in enumerate(model.model.layers):
        assert all(p.requires_grad == (i >= freeze_layers) for p in layer.parameters()), i
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad


def test_freeze_layers_too_large_names_the_key(tiny_lm_dir, data_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(ConfigError, match="freeze_layers"):
        prepare_trainable(model, _cfg(tiny_lm_dir, data_dir, tmp_path / "o", freeze_layers=3))


def test_full_finetune_changes_exactly_the_trainable_params(tiny_lm_dir, data_dir, tmp_path):
    out = tmp_path / "teacher"
    summary = train_teacher(_cfg(tiny_lm_dir, data_dir, out, max_steps=2))
    before, after = _load(tiny_lm_dir), _load(out)
    assert set(before) == set(after)
    for name, w in before.items():
        changed = not torch.equal(w, after[name])
        trainable = name.startswith("model.layers.1.") or name == "model.norm.weight"
        assert changed == trainable, name
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    # A plain from_pretrained directory with the tokenizer; the work dir is gone after success.
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert not work_dir(out).exists()


# ----------------------------------------------------------------------------------- best model, manifest


def test_output_holds_best_checkpoint_and_manifest(tiny_lm_dir, data_dir, tmp_path):
    out = tmp_path / "teacher"
    cfg = _cfg(tiny_lm_dir, data_dir, out, max_steps=4, eval_every=1, keep_checkpoints=True, lr=5e-3)
    summary = train_teacher(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert set(lines[0]) >= {"step", "loss", "lr", "val_auc", "val_logloss", "elapsed_s"}
    aucs = [x["val_auc"] for x in lines]
    best_step = int(np.argmax(aucs)) + 1  # the first maximum wins (strict improvement)
    manifest = json.loads((out / "recsys_slm.json").read_text())
    assert manifest["stage"] == "teacher_train"
    assert manifest["parent"] == str(tiny_lm_dir)
    assert (
        manifest["config"]["freeze_layers"] == 1 and manifest["config"]["prompt"]["system"] == "Recommender."
    )
    metrics = manifest["metrics"]
    assert metrics["best_step"] == best_step == summary["best_step"]
    assert metrics["best_val_auc"] == pytest.approx(max(aucs))
    assert metrics["steps"] == 4 and metrics["train_time_s"] > 0 and metrics["val_records"] == 18
    best = load_file(str(work_dir(out) / f"best-step{best_step:07d}" / "trainable.safetensors"))
    weights = _load(out)
    for name, w in best.items():
        torch.testing.assert_close(weights[name], w, atol=0, rtol=0)
    # Scoring the output with the same prompt config reproduces the best validation AUC.
    from sklearn.metrics import roc_auc_score

    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    log = InteractionLog.load(data_dir)
    ranker = Ranker.load(
        out, RankerConfig(batch_size=4, prompt=PromptConfig(**PROMPT)), log.items, log.users, "cpu"
    )
    val = pd.read_parquet(data_dir / "tasks" / "pointwise" / "val.parquet")
    auc = roc_auc_score(val["label"], ranker.score_pointwise(val)["logit_diff"])
    assert auc == pytest.approx(max(aucs), abs=1e-6)


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_and_merged_output_is_plain(tiny_lm_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = _cfg(tiny_lm_dir, data_dir, out, lora={"enabled": True, "r": 4, "alpha": 8}, lr=1e-2)
    summary = train_teacher(cfg)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    assert not any("lora" in k for k in _load(out))
    assert not (out / "adapter_config.json").exists()
    before, after = _load(tiny_lm_dir), _load(out)
    for name, w in before.items():
        adapted = name.startswith("model.layers.1.self_attn.") and name.split(".")[-2] in ("q_proj", "v_proj")
        assert (not torch.equal(w, after[name])) == adapted, name
    # 2 adapted modules × (A: r×64 + B: out×r) in layer 1 only
    assert summary["trainable_params"] == 4 * 64 + 64 * 4 + 4 * 64 + 32 * 4


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_kill_equals_uninterrupted(tiny_lm_dir, data_dir, tmp_path, lora):
    common = dict(
        max_steps=6, grad_accum=2, checkpoint_every=2, eval_every=2, max_train_records=10, bucket_batches=2,
        lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.1}, warmup_ratio=0.2,
    )  # fmt: skip
    # 6 steps × 2 micro-batches × 2 records = 24 records > 10: the run crosses two epoch boundaries.
    full = tmp_path / "full"
    train_teacher(_cfg(tiny_lm_dir, data_dir, full, **common))

    killed = tmp_path / "killed"
    cfg = _cfg(tiny_lm_dir, data_dir, killed, **common)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, stop_after_step=3)  # step 3 is lost: the last checkpoint is at step 2
    assert not killed.exists()
    info = read_checkpoint_info(work_dir(killed) / "checkpoint-last")
    assert info["state"]["step"] == 2 and info["state"]["micro"] == 4
    summary = train_teacher(cfg)
    assert summary["steps"] == 6

    a, b = _load(full), _load(killed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    lines_a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines_b] == [x["step"] for x in lines_a]  # no duplicated step 3 line
    for x, y in zip(lines_a, lines_b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["val_auc"] == pytest.approx(y["val_auc"], abs=1e-6) if x["val_auc"] is not None else True
    ma = json.loads((full / "recsys_slm.json").read_text())["metrics"]
    mb = json.loads((killed / "recsys_slm.json").read_text())["metrics"]
    assert ma["best_step"] == mb["best_step"]


def test_resume_refuses_a_changed_config(tiny_lm_dir, data_dir, tmp_path):
    out = tmp_path / "t"
    base = dict(max_steps=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(_cfg(tiny_lm_dir, data_dir, out, **base), stop_after_step=2)
    with pytest.raises(ValueError, match="lr"):
        train_teacher(_cfg(tiny_lm_dir, data_dir, out, lr=5e-4, **base))
    # resume=false starts afresh; a changed cadence (eval_every) is allowed when resuming
    summary = train_teacher(_cfg(tiny_lm_dir, data_dir, out, lr=5e-4, resume=False, **base))
    assert summary["steps"] == 4


# ------------------------------------------------------------------------------------------- batching


def test_epoch_batches_cover_each_record_once_and_bucket_lengths():
    lengths = np.random.default_rng(0).integers(20, 200, size=103)
    a = epoch_batches(lengths, 8, seed=1, epoch=0, bucket_batches=4)
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    assert all(len(b) <= 8 for b in a)
    again = epoch_batches(lengths, 8, seed=1, epoch=0, bucket_batches=4)
    # a pure function of (seed, epoch)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    other = epoch_batches(lengths, 8, seed=1, epoch=1, bucket_batches=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=False))
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, bucket_batches=0)
    assert padding_fraction(lengths, a) < padding_fraction(lengths, plain) / 2


# --------------------------------------------------------------------------------------- config, CLI


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lr=0", "lr"),
        ("batch_size=0", "batch_size"),
        ("grad_accum=-1", "grad_accum"),
        ("warmup_ratio=1.5", "warmup_ratio"),
        ("freeze_layers=-1", "freeze_layers"),
        ("eval_max_records=0", "eval_max_records"),
        ("max_train_records=0", "max_train_records"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("device=tpu", "device"),
        ("precision=fp8", "precision"),
        ("batch_size=two", "batch_size"),
        ("learning_rate=1e-4", "learning_rate"),
    ],
)
def test_bad_config_values_are_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_config(TeacherTrainConfig, None, [override])


def test_early_stopping_needs_validation():
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config(TeacherTrainConfig, None, ["eval_every=0", "early_stopping_patience=2"])


def test_cli_runs_the_smoke_config(tiny_lm_dir, data_dir, tmp_path, capsys):
    from recsys_slm.cli import teacher

    parser = argparse.ArgumentParser()
    teacher.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "smoke"
    args = parser.parse_args(
        ["teacher", "train", "--config", str(SMOKE), "--out", str(out), f"model={tiny_lm_dir}",
         f"data_dir={data_dir}", "device=cpu", "progress=false", "eval_max_records=18"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert "best val AUC" in capsys.readouterr().out
    manifest = json.loads((out / "recsys_slm.json").read_text())
    assert manifest["metrics"]["steps"] == 4 and manifest["config"]["out"] == str(out)


def test_shipped_configs_load():
    for name in ("smollm2_movielens", "tiny_smoke"):
        path = ROOT / "pipelines" / "configs" / "teacher" / f"{name}.yaml"
        cfg = load_config(TeacherTrainConfig, path)
        assert path.read_text().startswith("# recsys-slm teacher train --config")
        quick = (ROOT / "pipelines" / "configs" / "quickstart" / "smollm2_movielens.yaml").read_text()
        assert path.read_text().split("\nprompt:\n")[1] == quick.split("\nprompt:\n")[1]  # same prompt block
    assert cfg.freeze_layers == 1
