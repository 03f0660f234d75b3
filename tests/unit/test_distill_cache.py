"""Transfer sets (teacher-labelled pairs) and the off-policy teacher cache (``recsys-slm teacher score``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_slm.cli import main
from recsys_slm.data.events import candidate_target_events, event_index
from recsys_slm.data.prompts import PromptConfig, PromptRenderer
from recsys_slm.data.schema import InteractionLog
from recsys_slm.distill.teacher_cache import TeacherScoreConfig, read_teacher_cache, score_task
from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set

PROMPT = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}


@pytest.fixture(scope="module")
def transfer(tiny_data_dir, tmp_path_factory):
    frame, summary = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, extra_pairs=20, seed=0))
    path = tmp_path_factory.mktemp("ts") / "transfer.parquet"
    frame.to_parquet(path, index=False)
    return frame, summary, path


def test_transfer_set_adds_unrated_pairs_only(tiny_data_dir, transfer):
    frame, summary, _ = transfer
    log = InteractionLog.load(tiny_data_dir)
    labelled = frame[frame["source"] == "labelled"]
    extra = frame[frame["source"] == "teacher_labelled"]
    assert summary["labelled"] == len(labelled) and summary["teacher_labelled"] == len(extra) == 20
    assert extra["label"].isna().all() and labelled["label"].notna().all()
    # Never an item the user interacted with, at any time; pairs are distinct.
    seen = set(zip(log.interactions["user_id"].astype(str), log.interactions["item_id"].astype(str), strict=True))
    pairs = list(zip(extra["user_id"].astype(str), extra["item_id"].astype(str), strict=True))
    assert not set(pairs) & seen and len(set(pairs)) == len(pairs)
    # Each extra pair reuses the context (user, time, history) of a labelled record.
    contexts = {(r.user_id, r.timestamp, tuple(r.history_item_ids)) for r in labelled.itertuples()}
    assert all((r.user_id, r.timestamp, tuple(r.history_item_ids)) in contexts for r in extra.itertuples())
    # Held-out candidate targets are not in the base.
    assert not event_index(labelled).isin(candidate_target_events(tiny_data_dir)).any()
    assert summary["excluded_candidate_targets"] >= 0


def test_transfer_set_sampling_is_seeded_and_nested(tiny_data_dir):
    a, _ = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, max_labelled=20, seed=1))
    b, _ = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, max_labelled=20, seed=1))
    small, _ = build_transfer_set(TransferSetConfig(data_dir=tiny_data_dir, max_labelled=10, seed=1))
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 20 and set(event_index(small)) <= set(event_index(a))  # a smaller sample is a subset


def _score_cfg(tiny_lm_dir, tiny_data_dir, task, out, **kw) -> TeacherScoreConfig:
    values = dict(model=str(tiny_lm_dir), task=task, out=out, data_dir=tiny_data_dir, prompt=PromptConfig(**PROMPT),
                  top_k=5, batch_size=4, chunk_records=16, device="cpu")  # fmt: skip
    values.update(kw)
    return TeacherScoreConfig(**values)


def test_teacher_cache_matches_naive_full_forward(tiny_lm_dir, tiny_data_dir, transfer, tmp_path):
    frame, _, path = transfer
    summary = score_task(_score_cfg(tiny_lm_dir, tiny_data_dir, path, tmp_path / "c.parquet"), progress=False)
    cache, meta = read_teacher_cache(tmp_path / "c.parquet")
    assert len(cache) == len(frame) == summary["records"] and meta["top_k"] == 5
    pd.testing.assert_frame_equal(cache[frame.columns].reset_index(drop=True), frame.reset_index(drop=True))
    # Naive reference: one unpadded forward per record, full logits at the last position.
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    log = InteractionLog.load(tiny_data_dir)
    renderer = PromptRenderer(PromptConfig(**PROMPT), tok, log.items, log.users)
    yes, no = tok.encode(" Yes")[0], tok.encode(" No")[0]
    for i in [0, 7, len(frame) - 1]:
        r = frame.iloc[i]
        p = renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id)
        ids = tok(p.prefix, add_special_tokens=False)["input_ids"] + tok(p.suffix, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        assert cache.loc[i, "teacher_score"] == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)
        assert cache.loc[i, "teacher_p_yes"] == pytest.approx(float(torch.sigmoid(logits[yes] - logits[no])), abs=1e-5)
        values, index = torch.log_softmax(logits, -1).topk(5)
        np.testing.assert_array_equal(cache.loc[i, "teacher_topk_ids"], index.numpy())
        np.testing.assert_allclose(cache.loc[i, "teacher_topk_logprobs"], values.numpy(), atol=1e-4)
    assert not (tmp_path / "c.parquet.parts").exists()  # parts are removed once the file is complete


def test_teacher_cache_resumes_from_finished_parts(tiny_lm_dir, tiny_data_dir, transfer, tmp_path):
    _, _, path = transfer
    cfg = _score_cfg(tiny_lm_dir, tiny_data_dir, path, tmp_path / "c.parquet")
    full = score_task(cfg, progress=False)
    first, _ = read_teacher_cache(tmp_path / "c.parquet")
    # Simulate a kill after the first chunk: keep only part 0 of a fresh run's parts.
    import recsys_slm.distill.teacher_cache as tc

    calls = []
    original = tc.answer_position_outputs

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    tc.answer_position_outputs = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            score_task(_score_cfg(tiny_lm_dir, tiny_data_dir, path, tmp_path / "d.parquet"), progress=False)
    finally:
        tc.answer_position_outputs = original
    assert (tmp_path / "d.parquet.parts" / "part-00000.parquet").is_file() and not (tmp_path / "d.parquet").exists()
    resumed = score_task(_score_cfg(tiny_lm_dir, tiny_data_dir, path, tmp_path / "d.parquet"), progress=False)
    assert resumed["scored_now"] == full["records"] - 16
    second, _ = read_teacher_cache(tmp_path / "d.parquet")
    np.testing.assert_allclose(second["teacher_score"], first["teacher_score"], atol=1e-5)


def test_teacher_cache_bad_inputs(tiny_lm_dir, tiny_data_dir, tmp_path, transfer):
    frame, _, _ = transfer
    bad = tmp_path / "bad.parquet"
    frame.drop(columns=["history_labels"]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) history_labels"):
        score_task(_score_cfg(tiny_lm_dir, tiny_data_dir, bad, tmp_path / "o.parquet"), progress=False)
    with pytest.raises(FileNotFoundError, match="task file"):
        score_task(_score_cfg(tiny_lm_dir, tiny_data_dir, tmp_path / "nope.parquet", tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match="is not a teacher cache"):
        read_teacher_cache(bad)
    with pytest.raises(FileNotFoundError, match="teacher score"):
        read_teacher_cache(tmp_path / "missing.parquet")


def test_cli_transfer_set_and_teacher_score(tiny_lm_dir, tiny_data_dir, tmp_path, capsys):
    ts = tmp_path / "ts.parquet"
    assert main(["data", "transfer-set", "--out", str(ts), f"data_dir={tiny_data_dir}", "extra_pairs=5"]) == 0
    assert (pd.read_parquet(ts)["source"] == "teacher_labelled").sum() == 5
    out = tmp_path / "scores.parquet"
    prompt = [f"prompt.{k}={v}" for k, v in PROMPT.items()]
    rc = main(["teacher", "score", "--model", str(tiny_lm_dir), "--task", str(ts), "--out", str(out),
               f"data_dir={tiny_data_dir}", "device=cpu", "top_k=3", *prompt])  # fmt: skip
    assert rc == 0 and out.is_file()
    capsys.readouterr()  # the transfer-set command's output
    rc = main(["teacher", "score", "--model", str(tiny_lm_dir), "--task", str(ts), "--out", str(out),
               f"data_dir={tiny_data_dir}", "device=cpu", "top_k=3", *prompt])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "(0 scored now" in text  # the same teacher, task and prompt: the finished cache is reused
    assert "teacher AUC on labelled rows" in text
    assert json.loads(text[text.index("{") :])["top_k"] == 3
    assert main(["teacher", "score", "--model", str(tiny_lm_dir), "--task", str(ts), "--out", str(out),
                 "top_k=-1"]) == 2  # fmt: skip
