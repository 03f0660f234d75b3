"""Distillation on the real packaged models and MovieLens-100K: a 10-layer SmolLM2 student from a real teacher
cache, and the real Qwen2.5 ↔ SmolLM2 cross-tokenizer set-up (271 filler ids masked, shared vocabulary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from recsys_slm.config import config_to_dict, load_config
from recsys_slm.data.movielens import load_movielens_100k
from recsys_slm.data.prepare import DataPrepareConfig, prepare_dataset
from recsys_slm.distill.teacher_cache import TeacherScoreConfig, read_teacher_cache, score_task
from recsys_slm.distill.trainer import DistillConfig, distill
from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set
from recsys_slm.model_dir import read_manifest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipelines.quickstart import QuickstartConfig

    prompt = load_config(QuickstartConfig, ROOT / "pipelines/configs/quickstart/smollm2_movielens.yaml").prompt
    tmp = tmp_path_factory.mktemp("distill")
    data = tmp / "data"
    prepare_dataset(DataPrepareConfig(out=data), log=load_movielens_100k())
    frame, _ = build_transfer_set(TransferSetConfig(data_dir=data, max_labelled=24, extra_pairs=8))
    frame.to_parquet(tmp / "ts.parquet", index=False)
    score_task(TeacherScoreConfig(model="smollm2-135m-instruct", task=tmp / "ts.parquet", out=tmp / "c.parquet",
                                  data_dir=data, prompt=prompt, batch_size=8, device="cpu"), progress=False)  # fmt: skip
    return tmp, data, prompt


def test_smollm2_student_from_a_real_teacher_cache(setup):
    tmp, data, prompt = setup
    cache, meta = read_teacher_cache(tmp / "c.parquet")
    assert len(cache) == 32 and meta["vocab_rows"] == 49152 and meta["ignored_ids"] == 0
    cfg = load_config(DistillConfig, ROOT / "pipelines/configs/distill/smollm2_movielens.yaml", [
        "teacher=smollm2-135m-instruct", f"teacher_cache={tmp / 'c.parquet'}", f"data_dir={data}",
        f"out={tmp / 'student'}", "sources=[labelled,teacher_labelled]", "max_steps=2", "batch_size=4",
        "eval_every=2", "eval_max_records=24", "test_eval=false", "device=cpu", "progress=false"])  # fmt: skip
    cfg.prompt = prompt
    summary = distill(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp / "student")  # stock transformers
    assert model.config.num_hidden_layers == 10
    lineage = read_manifest(tmp / "student")["lineage"]
    assert lineage["student"]["kept_layers"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert summary["train_records_by_source"] == {"labelled": 24, "teacher_labelled": 8}
    assert 63e6 < summary["student_params"] < 64e6 and summary["teacher_params"] > 134e6
    assert config_to_dict(cfg.prompt) == read_manifest(tmp / "student")["config"]["prompt"]


def test_qwen_smollm2_cross_tokenizer_plan():
    """The real pair: Qwen's 271 filler head rows are masked, " Yes"/" No" are in the exactly shared vocabulary,
    and GOLD on the answer word is finite, ≥ 0, and lower for a student that agrees with the teacher."""
    from recsys_slm.distill.cross_tokenizer import GoldLoss, ignored_ids, shared_vocab
    from recsys_slm.models.loading import load_tokenizer
    from recsys_slm.ranker.verbalizer import verbalizer_token_ids

    qwen, smol = load_tokenizer("qwen2.5-coder-0.5b-instruct"), load_tokenizer("smollm2-135m-instruct")
    assert len(ignored_ids(151936, qwen)) == 271  # [PAD151665]… fillers listed by the converted tokenizer
    s_ids, t_ids = shared_vocab(smol, qwen)
    (s_yes, s_no), (t_yes, t_no) = verbalizer_token_ids(smol), verbalizer_token_ids(qwen)
    pairs = set(zip(s_ids.tolist(), t_ids.tolist(), strict=True))
    assert (s_yes, t_yes) in pairs and (s_no, t_no) in pairs
    gold = GoldLoss(smol, qwen)
    teacher = torch.full((1, 151936), -5.0)
    teacher[0, t_yes] = 5.0
    agree, disagree = torch.full((1, 49152), -5.0), torch.full((1, 49152), -5.0)
    agree[0, s_yes], disagree[0, s_no] = 5.0, 5.0
    losses = [float(gold(s, teacher, [s_yes], [t_yes], [(0, 1)], [(0, 1)])) for s in (agree, disagree)]
    assert all(np.isfinite(losses)) and 0 <= losses[0] < losses[1]
