"""Student construction: layer selection strategies, Block Influence, and a stock-loadable shallower model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_slm.config import ConfigError, from_dict
from recsys_slm.distill.student import (
    StudentConfig,
    block_influence,
    build_student,
    keep_layers,
    select_layers,
)
from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.tiny import build_tiny_causal_lm


@pytest.fixture(scope="module")
def deep_lm_dir(tmp_path_factory) -> Path:
    """A tiny 6-layer Llama (the teacher of these tests)."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("deep") / "model", seed=3, num_layers=6)


def test_select_layers_strategies():
    assert select_layers(30, 10, "evenly") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(6, 2, "evenly") == [0, 5]
    assert select_layers(6, 1, "evenly") == [5]
    assert select_layers(6, 6, "evenly") == list(range(6))
    assert select_layers(6, 3, "first") == [0, 1, 2]
    assert select_layers(6, 3, "first_last") == [0, 1, 5]
    assert select_layers(6, 4, "first_last") == [0, 1, 4, 5]
    assert select_layers(4, 2, "block_influence", scores=[0.1, 0.9, 0.2, 0.5]) == [1, 3]
    assert select_layers(6, 2, "explicit", explicit=[4, 1]) == [1, 4]


def test_select_layers_errors_name_the_key():
    with pytest.raises(ConfigError, match="student.num_layers.*the source has 6 blocks"):
        select_layers(6, 7, "evenly")
    with pytest.raises(ConfigError, match=r"student.layers.*\[6\] out of range"):
        select_layers(6, 2, "explicit", explicit=[0, 6])
    with pytest.raises(ValueError, match="block_influence needs 6 scores"):
        select_layers(6, 2, "block_influence", scores=[0.1])


def test_student_config_validation():
    with pytest.raises(ConfigError, match="layers"):
        from_dict(StudentConfig, {"selection": "explicit"})
    with pytest.raises(ConfigError, match="only read with selection=explicit"):
        from_dict(StudentConfig, {"layers": [1, 2]})
    with pytest.raises(ConfigError, match="layer_fraction"):
        from_dict(StudentConfig, {"layer_fraction": 0})
    assert StudentConfig().count(30) == 10  # default 1/3, rounded up
    assert StudentConfig(num_layers=4).count(30) == 4


def test_block_influence_matches_hidden_state_reference(deep_lm_dir):
    """BI_i = 1 − mean over real tokens of cos(input of block i, output of block i) (ShortGPT)."""
    model = AutoModelForCausalLM.from_pretrained(deep_lm_dir).eval()
    seqs = [[5, 9, 13, 22, 40, 41], [7, 8, 100], [3, 3, 3, 60, 61]]
    scores = block_influence(model, seqs, pad_id=0, batch_size=2)
    assert scores.shape == (6,)
    # Reference: one unpadded sequence at a time; HF hidden_states[i] is block i's input, [i+1] its output for
    # i < L − 1 (the last entry has the final norm applied, so the last block is checked via hooks only).
    sums, count = np.zeros(5), 0
    for seq in seqs:
        with torch.no_grad():
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        for i in range(5):
            sums[i] += torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1).sum().item()
        count += len(seq)
    np.testing.assert_allclose(scores[:5], 1 - sums / count, atol=1e-5)


def test_keep_layers_gives_a_stock_loadable_model(deep_lm_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(deep_lm_dir).eval()
    teacher_layers = [layer.self_attn.q_proj.weight.clone() for layer in decoder_layers(model)]
    keep_layers(model, [0, 3, 5])
    assert model.config.num_hidden_layers == 3
    for j, i in enumerate([0, 3, 5]):
        assert torch.equal(decoder_layers(model)[j].self_attn.q_proj.weight, teacher_layers[i])
        assert decoder_layers(model)[j].self_attn.layer_idx == j
    model.save_pretrained(tmp_path / "s", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert len(decoder_layers(reloaded)) == 3
    ids = torch.tensor([[5, 9, 13, 22]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        # KV-cache generation indexes the cache by layer_idx: must equal the no-cache greedy continuation.
        cached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_build_student_records_lineage(deep_lm_dir):
    model, tokenizer, lineage = build_student(StudentConfig(num_layers=2), str(deep_lm_dir))
    assert lineage["kept_layers"] == [0, 5] and lineage["source_layers"] == 6
    assert lineage["params"] < lineage["source_params"]
    assert lineage["params"] == sum(p.numel() for p in model.parameters())
    seqs = [AutoTokenizer.from_pretrained(deep_lm_dir)("Yes the movie Fargo")["input_ids"]] * 2
    _, _, bi = build_student(StudentConfig(num_layers=3, selection="block_influence"), str(deep_lm_dir), seqs)
    assert len(bi["block_influence"]) == 6
    assert bi["kept_layers"] == sorted(np.argsort(-np.asarray(bi["block_influence"]), kind="stable")[:3].tolist())
    with pytest.raises(ValueError, match="calibration"):
        build_student(StudentConfig(num_layers=3, selection="block_influence"), str(deep_lm_dir))
    _, _, same = build_student(StudentConfig(init="model"), str(deep_lm_dir))
    assert same["params"] == same["source_params"] and "kept_layers" not in same
