"""Pruning plans: parameter prediction is exact, budgets are met, non-uniform plans stay GQA-valid."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.prune.importance import magnitude_scores, uniform_head_plan, uniform_neuron_plan
from recsys_slm.prune.plan import budget_widths, global_plan, predict_non_embedding, uniform_counts
from recsys_slm.prune.structure import (
    check_gqa_keep,
    non_embedding_params,
    prune_attention_heads,
    prune_mlp_neurons,
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param) / "m", seed=2, arch=request.param, num_layers=3)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("mode", ["kv_groups", "query_heads"])
def test_predicted_params_equal_the_pruned_model(lm_dir, mode):
    """The prediction counts the tensors the operators remove (incl. Qwen2's q/k/v biases)."""
    model = _load(lm_dir)
    keep_heads, keep_kv, keep_neurons = uniform_counts(model, 0.5, 0.3, mode)
    predicted = predict_non_embedding(model, keep_heads, keep_kv, keep_neurons)
    heads, neurons = magnitude_scores(model)
    for layer, h, n in zip(decoder_layers(model), uniform_head_plan(heads, 2, keep_heads, mode),
                           uniform_neuron_plan(neurons, keep_neurons), strict=True):  # fmt: skip
        prune_attention_heads(layer.self_attn, h)
        prune_mlp_neurons(layer.mlp, n)
    assert non_embedding_params(model) == predicted
    assert predict_non_embedding(model, 0, 0, 0) < predicted  # sanity: the formula reads the current widths


def test_budget_gives_the_largest_share_that_fits(lm_dir):
    model = _load(lm_dir)
    budget = int(0.5 * non_embedding_params(model))
    share, heads, kv, neurons = budget_widths(model, budget, "query_heads")
    assert predict_non_embedding(model, heads, kv, neurons) <= budget
    bigger = uniform_counts(model, share + 0.01, share + 0.01, "query_heads")
    assert predict_non_embedding(model, *bigger) > budget or bigger == (heads, kv, neurons)
    with pytest.raises(ValueError, match="param_budget"):
        budget_widths(model, 10, "query_heads")


@pytest.mark.parametrize("mode", ["kv_groups", "query_heads"])
def test_global_plan_is_gqa_valid_and_meets_totals(mode):
    torch.manual_seed(0)
    heads = torch.rand(3, 8)  # 8 query heads, 2 KV groups of 4
    heads[0] += 5  # layer 0 matters most: it should keep more heads than the others
    neurons = torch.rand(3, 20)
    head_plan, neuron_plan = global_plan(heads, neurons, kv_heads=2, total_heads=12, total_neurons=30, head_mode=mode)
    for kept in head_plan:
        check_gqa_keep(kept, 8, 2)  # raises on an invalid plan
        assert kept
    assert sum(map(len, head_plan)) <= 12 + (4 if mode == "kv_groups" else 2)
    assert sum(map(len, neuron_plan)) == 30
    assert all(neuron_plan)


def test_global_plan_favours_layers_whose_units_stand_out():
    """Standardised scores: a layer where a few units dominate keeps those; flat layers lose more."""
    heads = torch.ones(2, 4)
    heads[0] = torch.tensor([10.0, 1.0, 1.0, 1.0])
    heads[1] = torch.tensor([1.0, 1.1, 1.2, 1.3])
    neurons = torch.stack([torch.arange(10.0), torch.arange(10.0).flip(0)])
    head_plan, neuron_plan = global_plan(heads, neurons, kv_heads=4, total_heads=5, total_neurons=6, head_mode="kv_groups")
    assert 0 in head_plan[0] and len(head_plan[0]) == 2  # the dominant head, then flat ones lose out
    assert head_plan[1] == [1, 2, 3]
    assert neuron_plan[0][-1] == 9 and neuron_plan[1][0] == 0  # each layer keeps its best neurons


def test_head_counts_divide_the_hidden_size():
    """Stock configs refuse hidden_size % heads != 0, so plans skip such counts and sync_config names the fix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recsys_slm.prune.structure import sync_config

    cfg = LlamaConfig(vocab_size=32, hidden_size=80, num_attention_heads=10, num_key_value_heads=2, head_dim=8,
                      intermediate_size=16, num_hidden_layers=1)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    assert uniform_counts(model, 0.6, 1.0, "query_heads")[0] == 8  # 6 is GQA-valid but 80 % 6 != 0
    prune_attention_heads(decoder_layers(model)[0].self_attn, [0, 1, 2, 5, 6, 7])
    with pytest.raises(ValueError, match=r"hidden_size \(80\) divisible.*keep one of \[2, 4, 8, 10"):
        sync_config(model)


@pytest.mark.parametrize("low_rank, key", [
    ({"method": "svd_llm", "keep_ratio": 0.5, "energy": 0.9}, "low_rank.keep_ratio"),
    ({"method": "cti", "keep_ratio": None}, "low_rank.keep_ratio"),
    ({"method": "cti", "candidates": []}, "low_rank.candidates"),
    ({"method": "cti", "samples": 500}, "low_rank.samples"),
    ({"method": "svd_llm", "keep_ratio": 1.5}, "low_rank.keep_ratio"),
    ({"method": "svd_llm", "kinds": []}, "low_rank.kinds"),
])  # fmt: skip
def test_low_rank_config_errors_name_the_key(low_rank, key):
    from recsys_slm.config import ConfigError, from_dict
    from recsys_slm.prune.pruner import PruneConfig

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(PruneConfig, {"model": "m", "out": "o", "low_rank": low_rank})
