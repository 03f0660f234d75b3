"""The ranker on the real SmolLM2-135M-Instruct with real MovieLens prompts: shared-prefix scoring equals
independent scoring, and batching (either padding side) does not change scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_slm.config import load_config
from recsys_slm.data.movielens import load_movielens_100k
from recsys_slm.data.prepare import DataPrepareConfig, prepare_dataset
from recsys_slm.data.prompts import PromptRenderer
from recsys_slm.data.schema import InteractionLog
from recsys_slm.models.loading import load_causal_lm
from recsys_slm.ranker import VerbalizerScorer
from recsys_slm.ranker.ranker import Ranker, RankerConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipelines.quickstart import QuickstartConfig

    root = Path(__file__).resolve().parents[2]
    prompt = load_config(QuickstartConfig, root / "pipelines/configs/quickstart/smollm2_movielens.yaml").prompt
    out = tmp_path_factory.mktemp("ml") / "data"
    prepare_dataset(DataPrepareConfig(out=out), log=load_movielens_100k())
    log = InteractionLog.load(out)
    task = pd.read_parquet(out / "tasks" / "candidates" / "test.parquet")
    model, tokenizer = load_causal_lm("smollm2-135m-instruct", device="cpu")
    return model, tokenizer, prompt, log, task


def test_shared_prefix_equals_independent_on_smollm2(setup):
    model, tokenizer, prompt, log, task = setup
    renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
    row = task.iloc[0]
    cands = list(row.candidate_item_ids)[:8]
    args = (list(row.history_item_ids), list(row.history_labels), cands, row.user_id)
    shared = Ranker(model, tokenizer, renderer, RankerConfig(batch_size=4, shared_prefix=True, prompt=prompt))
    indep = Ranker(model, tokenizer, renderer, RankerConfig(batch_size=1, shared_prefix=False, prompt=prompt))
    a, b = shared.score_candidates(*args), indep.score_candidates(*args)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert np.ptp(a) > 0  # real, distinct scores


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_single_on_smollm2(setup, padding_side):
    model, tokenizer, prompt, log, task = setup
    renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
    row = task.iloc[1]
    prompts = [renderer.render(list(row.history_item_ids)[k:], list(row.history_labels)[k:], c, row.user_id)
               for k, c in zip((0, 3, 6, 9), list(row.candidate_item_ids)[:4])]
    seqs = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(s) for s in seqs}) > 1
    batched = VerbalizerScorer(model, tokenizer, batch_size=4, padding_side=padding_side).score_token_ids(seqs)
    single = VerbalizerScorer(model, tokenizer, batch_size=1).score_token_ids(seqs)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


def test_prefix_plus_suffix_tokenises_like_the_whole_text_on_smollm2(setup):
    model, tokenizer, prompt, log, task = setup
    renderer = PromptRenderer(prompt, tokenizer, log.items, log.users)
    row = task.iloc[2]
    for cand in list(row.candidate_item_ids):
        p = renderer.render(list(row.history_item_ids), list(row.history_labels), cand, row.user_id)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (p.prefix, p.suffix, p.text)]
        assert ids[0] + ids[1] == ids[2], cand
