"""Verbalizer scoring: padding never changes a score; shared-prefix scoring equals independent scoring;
only verbalizer logits are formed and they equal the full-vocabulary logits at the last position."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_slm.data.prompts import PromptConfig, PromptRenderer
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.ranker import VerbalizerScorer
from recsys_slm.ranker.ranker import Ranker, RankerConfig

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param) / "lm", seed=1, arch=request.param)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def items():
    titles = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Babe", "Heat", "Fargo", "Alien"]
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in range(len(titles))],
            "title": titles,
            "text": [f"{t} ({1990 + i}), {'Drama' if i % 2 else 'Comedy, Romance'}" for i, t in enumerate(titles)],
        }
    )


def _prompts(tokenizer, items):
    renderer = PromptRenderer(PromptConfig(), tokenizer, items)
    histories = [(["1", "2", "3"], [1, 0, 1]), (["4"], [0]), ([], []), (["5", "6", "7", "8", "1", "2"], [1] * 6)]
    return [renderer.render(h, y, c) for (h, y) in histories for c in ("0", "3")]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_scores_equal_one_by_one(tiny, items, padding_side):
    model, tokenizer = tiny
    seqs = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in _prompts(tokenizer, items)]
    assert len({len(s) for s in seqs}) > 1  # lengths differ, so padding is exercised
    batched = VerbalizerScorer(model, tokenizer, batch_size=8, padding_side=padding_side).score_token_ids(seqs)
    single = VerbalizerScorer(model, tokenizer, batch_size=1).score_token_ids(seqs)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


def test_verbalizer_logits_equal_full_vocab_logits(tiny, items):
    model, tokenizer = tiny
    prompt = _prompts(tokenizer, items)[0]
    ids = torch.tensor([tokenizer(prompt.text, add_special_tokens=False)["input_ids"]])
    scorer = VerbalizerScorer(model, tokenizer)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]  # (V,) the naive reference
    ours = scorer.score_token_ids(ids.tolist())[0]
    torch.testing.assert_close(ours, full[[scorer.yes_id, scorer.no_id]], atol=1e-5, rtol=0)
    p_yes = scorer.score_texts([prompt.text])[0]
    ref = torch.softmax(full[[scorer.yes_id, scorer.no_id]], -1)[0]
    assert abs(float(p_yes) - float(ref)) < 1e-5


def test_shared_prefix_equals_independent_scoring(tiny, items):
    model, tokenizer = tiny
    ranker_cfg = RankerConfig(batch_size=3, shared_prefix=True)
    renderer = PromptRenderer(ranker_cfg.prompt, tokenizer, items)
    shared = Ranker(model, tokenizer, renderer, ranker_cfg)
    independent = Ranker(model, tokenizer, renderer, RankerConfig(batch_size=1, shared_prefix=False))
    candidates = [str(i) for i in range(9)]
    a = shared.score_candidates(["1", "2", "3"], [1, 0, 1], candidates)
    b = independent.score_candidates(["1", "2", "3"], [1, 0, 1], candidates)
    assert a.shape == (9,)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # the shared path ran one prefix group with 3 suffix batches; independent ran one forward per candidate
    assert [t.prompts for t in shared.timings] == [9] and len(independent.timings) == 9


def test_shared_prefix_with_per_candidate_truncation_still_matches(tiny, items):
    model, tokenizer = tiny
    base = PromptConfig()
    renderer = PromptRenderer(base, tokenizer, items)
    history = ["1", "2", "3", "4", "5"]
    labels = [1, 0, 1, 1, 0]
    # a budget that the short candidate text fits with full history but the long one does not
    short = renderer.render(history, labels, "1")
    long = renderer.render(history, labels, "2")
    assert long.n_tokens > short.n_tokens
    cfg = PromptConfig(max_tokens=short.n_tokens)
    shared = Ranker(model, tokenizer, PromptRenderer(cfg, tokenizer, items), RankerConfig(shared_prefix=True, prompt=cfg))
    indep = Ranker(model, tokenizer, PromptRenderer(cfg, tokenizer, items), RankerConfig(shared_prefix=False, prompt=cfg))
    cands = ["1", "2", "0"]
    np.testing.assert_allclose(
        shared.score_candidates(history, labels, cands), indep.score_candidates(history, labels, cands), atol=1e-4
    )
    assert len(shared.timings) >= 2  # the long candidate got a shorter history, hence its own prefix group


def test_verbalizer_must_be_single_token(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="' Absolutely' encodes to .* tokens"):
        VerbalizerScorer(model, tokenizer, yes_token=" Absolutely")
