"""The distillation objective (pinned against naive references) and the trainer end to end on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from recsys_slm.cli import main
from recsys_slm.config import ConfigError, from_dict
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.distill.losses import topk_distill_loss
from recsys_slm.distill.objective import ObjectiveConfig, RankerObjective, dense_teacher_logprobs
from recsys_slm.distill.teacher_cache import TeacherScoreConfig, score_task
from recsys_slm.distill.trainer import DistillConfig, distill
from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set
from recsys_slm.model_dir import read_manifest
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.training.loop import work_dir

PROMPT = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}


# ------------------------------------------------------------------------------------------------ objective
def _batch(seed=0, n=6, v=11):
    g = torch.Generator().manual_seed(seed)
    verbal = torch.randn(n, 2, generator=g, requires_grad=True)
    full = torch.randn(n, v, generator=g, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, float("nan"), 1.0, float("nan"), 0.0])[:n]
    t_score = torch.randn(n, generator=g) * 2
    return verbal, full, labels, t_score


def test_sft_is_summed_bce_on_labelled_rows_only():
    verbal, _, labels, t_score = _batch()
    loss, parts = RankerObjective(ObjectiveConfig(loss="sft"))(verbal, None, labels, t_score)
    s = (verbal[:, 0] - verbal[:, 1]).detach()
    ref = sum(-(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
              for x, y in zip(s.tolist(), labels.tolist(), strict=True) if not math.isnan(y))  # fmt: skip
    assert loss.item() == pytest.approx(ref, rel=1e-5) and parts["ce"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_binary_kl_sum_matches_bernoulli_kl(temperature):
    verbal, _, labels, t_score = _batch(1)
    loss, _ = RankerObjective(ObjectiveConfig(loss="binary_kl", temperature=temperature))(verbal, None, labels, t_score)
    s = ((verbal[:, 0] - verbal[:, 1]) / temperature).detach().double()
    p = torch.sigmoid(t_score.double() / temperature)
    q = torch.sigmoid(s)
    ref = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum() * temperature**2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_weight_mixes_ce_and_kd():
    verbal, _, labels, t_score = _batch(2)
    ce, _ = RankerObjective(ObjectiveConfig(loss="sft"))(verbal, None, labels, t_score)
    kd, _ = RankerObjective(ObjectiveConfig(loss="binary_kl"))(verbal, None, labels, t_score)
    mixed, parts = RankerObjective(ObjectiveConfig(loss="binary_kl", kd_weight=0.3))(verbal, None, labels, t_score)
    assert mixed.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)
    assert parts["ce"] == pytest.approx(ce.item()) and parts["kd"] == pytest.approx(kd.item())


def test_token_kd_is_topk_loss_times_rows():
    verbal, full, labels, t_score = _batch(3)
    teacher = torch.log_softmax(torch.randn(6, 11), -1)
    lp, ids = teacher.topk(4, -1)
    loss, _ = RankerObjective(ObjectiveConfig(loss="token_kd", divergence="jsd", beta=0.3, temperature=2.0))(
        verbal, full, labels, t_score, ids, lp
    )
    ref = topk_distill_loss(full, ids, lp, kind="jsd", temperature=2.0, beta=0.3) * 6
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_dense_teacher_logprobs_keeps_topk_and_spreads_the_tail():
    teacher = torch.log_softmax(torch.randn(3, 10), -1)
    lp, ids = teacher.topk(3, -1)
    dense = dense_teacher_logprobs(ids, lp, 12, ignore_ids=[10, 11])
    assert dense.shape == (3, 12)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(dense.gather(1, ids), lp)
    assert torch.isinf(dense[:, 10:]).all()
    tail = 1 - lp.exp().sum(-1)
    rest = dense.exp().clone()
    rest.scatter_(1, ids, 0.0)
    torch.testing.assert_close(rest[:, :10].sum(-1), tail)
    torch.testing.assert_close(rest[:, :10].max(-1).values, tail / 7)  # 10 − 3 top-k = 7 ids share the tail


def test_objective_config_validation():
    with pytest.raises(ConfigError, match="kd_weight"):
        from_dict(ObjectiveConfig, {"kd_weight": 1.5})
    with pytest.raises(ConfigError, match="loss"):
        from_dict(ObjectiveConfig, {"loss": "mse"})


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("t") / "teacher", seed=5, num_layers=4)


@pytest.fixture(scope="module")
def other_tok_teacher_dir(tmp_path_factory) -> Path:
    """A teacher whose tokenizer differs from the student's (300-token BPE vs 512)."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("x") / "teacher", seed=6, num_layers=2, vocab_size=300)


def _cache(teacher, data_dir, tmp, name="cache.parquet") -> Path:
    frame, _ = build_transfer_set(TransferSetConfig(data_dir=data_dir, extra_pairs=12, seed=0))
    frame.to_parquet(tmp / "ts.parquet", index=False)
    out = tmp / name
    score_task(TeacherScoreConfig(model=str(teacher), task=tmp / "ts.parquet", out=out, data_dir=data_dir,
                                  prompt=PromptConfig(**PROMPT), top_k=8, batch_size=8, device="cpu"),
               progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def cache(teacher_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return _cache(teacher_dir, tiny_data_dir, tmp_path_factory.mktemp("cache"))


def _cfg(teacher, cache_path, data_dir, out, **kw) -> DistillConfig:
    values = dict(
        teacher=str(teacher), teacher_cache=cache_path, data_dir=data_dir, out=out, prompt=PROMPT,
        student={"num_layers": 2}, batch_size=4, max_steps=6, eval_every=3, eval_max_records=18, checkpoint_every=2,
        lr=1e-3, warmup_ratio=0.0, device="cpu", progress=False,
    )  # fmt: skip
    values.update(kw)
    return from_dict(DistillConfig, values)


def test_distill_writes_a_stock_model_with_lineage(teacher_dir, cache, tiny_data_dir, tmp_path):
    out = tmp_path / "student"
    summary = distill(_cfg(teacher_dir, cache, tiny_data_dir, out))
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no recsys_slm code
    assert model.config.num_hidden_layers == 2
    manifest = read_manifest(out)
    assert manifest["stage"] == "distill" and manifest["parent"] == str(teacher_dir)
    lineage = manifest["lineage"]
    assert lineage["student"]["kept_layers"] == [0, 3] and lineage["teacher_cache"] == str(cache)
    assert lineage["teacher_cache_meta"]["top_k"] == 8
    m = manifest["metrics"]
    assert m["train_records_by_source"] == {"labelled": 48, "teacher_labelled": 12}
    assert 0.0 <= m["test_auc"] <= 1.0 and m["test_records"] == 18 and m["steps"] == 6
    assert summary["best_val_auc"] == m["best_val_auc"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kd", "ce", "val_auc", "lr"} <= set(lines[-1])
    assert not work_dir(out).exists()


def test_manifest_records_the_prompt_taken_from_the_cache(teacher_dir, cache, tiny_data_dir, tmp_path):
    """No prompt configured: the student trains with the cache's prompt, and its manifest says so (so a later
    eval of the student directory uses the same prompt, not the default)."""
    out = tmp_path / "student"
    distill(_cfg(teacher_dir, cache, tiny_data_dir, out, prompt={}, max_steps=1, eval_every=1, checkpoint_every=1))
    manifest = read_manifest(out)
    assert manifest["config"]["prompt"] == {**PromptConfig().__dict__, **PROMPT}
    assert manifest["metrics"]["prompt_source"] == "teacher cache"


def test_sft_uses_labels_only_and_differs_from_kd(teacher_dir, cache, tiny_data_dir, tmp_path):
    sft = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "sft", objective={"loss": "sft"},
                       sources=["labelled"], test_eval=False))  # fmt: skip
    assert sft["train_records_by_source"] == {"labelled": 48}
    a = load_file(str(tmp_path / "sft" / "model.safetensors"))
    distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "kd", sources=["labelled"], test_eval=False))
    b = load_file(str(tmp_path / "kd" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="sft needs human labels"):
        _cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "x", objective={"loss": "sft"}, sources=["teacher_labelled"])


def test_killed_and_resumed_run_equals_uninterrupted(teacher_dir, cache, tiny_data_dir, tmp_path):
    full = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "full"))
    cfg = _cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, stop_after_step=5)  # last checkpoint at step 4: steps 5–6 are redone
    assert (work_dir(tmp_path / "killed") / "checkpoint-last").is_dir()
    resumed = distill(cfg)
    for key in ("best_val_auc", "final_val_auc", "test_auc", "test_logloss"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-3)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_online_teacher_equals_cached_teacher(teacher_dir, cache, tiny_data_dir, tmp_path):
    """Online: the teacher scores each batch; with the same records it trains the same student as the cache."""
    cached = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "c", test_eval=False, eval_every=0))
    online = distill(_cfg(teacher_dir, None, tiny_data_dir, tmp_path / "o", test_eval=False, eval_every=0,
                          transfer_set=cache.parent / "ts.parquet"))  # fmt: skip
    assert online["train_records"] == cached["train_records"]
    a, b = load_file(str(tmp_path / "c" / "model.safetensors")), load_file(str(tmp_path / "o" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_transfer_set_restricts_cache_rows(teacher_dir, cache, tiny_data_dir, tmp_path):
    frame, _ = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, max_labelled=20, seed=0))
    frame.to_parquet(tmp_path / "sub.parquet", index=False)
    summary = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "s", transfer_set=tmp_path / "sub.parquet",
                           max_steps=2, eval_every=0, test_eval=False))  # fmt: skip
    assert summary["train_records"] == 20
    extra, _ = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, extra_pairs=3, seed=9))
    extra.to_parquet(tmp_path / "other.parquet", index=False)
    with pytest.raises(ValueError, match=r"[12] of 51 records of transfer_set .* are not in teacher_cache"):
        distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "t", transfer_set=tmp_path / "other.parquet"))


@pytest.mark.parametrize("loss", ["token_kd", "uld", "gold"])
def test_token_level_losses_train(teacher_dir, cache, tiny_data_dir, tmp_path, loss):
    summary = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / loss, objective={"loss": loss},
                           max_steps=3, eval_every=3, test_eval=False))  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["kd"]) and x["kd"] >= 0 for x in lines)
    assert summary["steps"] == 3


def test_cross_tokenizer_student(other_tok_teacher_dir, teacher_dir, tiny_data_dir, tmp_path):
    """Teacher and student tokenizers differ: ULD and GOLD train, token_kd is refused with a clear message."""
    xcache = _cache(other_tok_teacher_dir, tiny_data_dir, tmp_path, "x.parquet")
    student = {"init": "model", "source": str(teacher_dir)}  # a 512-token student under a 300-token teacher
    for loss in ("uld", "gold"):
        s = distill(_cfg(other_tok_teacher_dir, xcache, tiny_data_dir, tmp_path / loss, student=student,
                         objective={"loss": loss, "kd_weight": 0.5}, max_steps=3, test_eval=False))  # fmt: skip
        assert s["steps"] == 3 and read_manifest(tmp_path / loss)["lineage"]["student"]["init"] == "model"
    with pytest.raises(ConfigError, match="tokenizers differ .*use uld or gold"):
        distill(_cfg(other_tok_teacher_dir, xcache, tiny_data_dir, tmp_path / "tk", student=student,
                     objective={"loss": "token_kd"}))  # fmt: skip


def test_cli_distill(teacher_dir, cache, tiny_data_dir, tmp_path, capsys):
    args = ["distill", "--out", str(tmp_path / "cli"), f"teacher={teacher_dir}", f"teacher_cache={cache}",
            f"data_dir={tiny_data_dir}", "student.num_layers=1", "max_steps=2", "eval_every=2",
            "eval_max_records=18", "device=cpu", "progress=false", *[f"prompt.{k}={v}" for k, v in PROMPT.items()]]  # fmt: skip
    assert main(args) == 0
    assert "test AUC" in capsys.readouterr().out
    assert main([*args, "objective.loss=nope"]) == 2
    assert main([*args[:-1], "teacher_cache=/nonexistent/cache.parquet"]) == 1
    assert "not found" in capsys.readouterr().err
    assert np.isfinite(read_manifest(tmp_path / "cli")["metrics"]["test_auc"])


# ------------------------------------------------------------------------------------------------ on-policy
def test_layout_and_completion_loss_reference():
    from recsys_slm.distill.on_policy import OnPolicyConfig, completion_token_loss, layout

    ids, mask, cmask, p = layout([[5, 6, 7], [8]], [[1, 2], [3]], pad_id=0)
    assert p == 3
    assert ids.tolist() == [[5, 6, 7, 1, 2], [0, 0, 8, 3, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert cmask.tolist() == [[True, True], [True, False]]
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 2, 7, generator=g), torch.randn(2, 2, 7, generator=g)
    comp = ids[:, 3:]
    fwd = completion_token_loss(s, t, comp, cmask, OnPolicyConfig(divergence="forward_kl"))
    kl = lambda a, b: (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum().item()  # noqa: E731
    ref = (kl(t[0, 0], s[0, 0]) + kl(t[0, 1], s[0, 1])) / 2 + kl(t[1, 0], s[1, 0])
    assert fwd.item() == pytest.approx(ref, rel=1e-5)
    ce = completion_token_loss(s, t, comp, cmask, OnPolicyConfig(divergence="ce"))
    nll = lambda row, tok: -row.log_softmax(-1)[tok].item()  # noqa: E731
    assert ce.item() == pytest.approx((nll(s[0, 0], 1) + nll(s[0, 1], 2)) / 2 + nll(s[1, 0], 3), rel=1e-5)


def test_sampled_completions_are_deterministic_and_stop_at_eos(teacher_dir):
    from recsys_slm.distill.on_policy import sample_completions

    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    prompts = [[5, 6, 7, 8], [9, 10]]
    torch.manual_seed(1)
    a = sample_completions(model, prompts, 5, 1.0, {2}, 0)
    torch.manual_seed(1)
    assert sample_completions(model, prompts, 5, 1.0, {2}, 0) == a
    greedy = sample_completions(model, prompts, 3, 0.0, set(), 0)
    ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=3, do_sample=False)[0, 4:].tolist()
    assert greedy[0] == ref and all(len(c) <= 5 for c in a)


@pytest.mark.parametrize("mode", ["gkd", "sequence_kd"])
def test_on_policy_distillation_trains_and_resumes(teacher_dir, cache, tiny_data_dir, tmp_path, mode):
    op = {"enabled": True, "mode": mode, "student_fraction": 0.5, "max_new_tokens": 3}
    full = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "f", on_policy=op, max_steps=4, eval_every=2,
                        test_eval=False))  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["on_policy"] >= 0 for x in lines)
    if mode == "gkd":
        assert 0 < sum(x["student_sampled"] for x in lines) < 4 * 4  # some, not all, micro-batches sampled
    cfg = _cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "k", on_policy=op, max_steps=4, eval_every=2,
               test_eval=False)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, stop_after_step=3)
    resumed = distill(cfg)
    assert resumed["best_val_auc"] == pytest.approx(full["best_val_auc"], abs=1e-3)


def test_hidden_state_term_pairs_copied_layers(teacher_dir, cache, tiny_data_dir, tmp_path):
    from recsys_slm.distill.trainer import answer_states

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids, mask = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    states = answer_states(model, ids, mask)
    assert len(states) == 5 and states[-1].shape == (2, 64)
    with torch.no_grad():
        ref = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states
    for got, want in zip(states, ref, strict=True):
        torch.testing.assert_close(got[0], want[0, -1], atol=1e-5, rtol=1e-4)
    summary = distill(_cfg(teacher_dir, cache, tiny_data_dir, tmp_path / "h", max_steps=2, eval_every=2,
                           test_eval=False, objective={"loss": "binary_kl", "hidden_weight": 0.5}))  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["hidden"] > 0 and summary["steps"] == 2


def test_pipeline_recipe_runs_the_same_job(teacher_dir, cache, tiny_data_dir, tmp_path):
    from pipelines.distill import cli

    args = [f"out={tmp_path / 'recipe'}", f"teacher={teacher_dir}", f"teacher_cache={cache}", f"data_dir={tiny_data_dir}",
            "student.num_layers=1", "max_steps=1", "eval_every=0", "test_eval=false", "device=cpu", "progress=false",
            *[f"prompt.{k}={v}" for k, v in PROMPT.items()]]  # fmt: skip
    assert cli(args) == 0
    assert read_manifest(tmp_path / "recipe")["stage"] == "distill"
    assert cli([*args, "student.selection=nope"]) == 2
