"""Structural pruning operators: pruning equals masking the removed units, GQA stays valid, and uniformly pruned
models reload with stock transformers in a fresh process that never imports recsys_slm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.prune.structure import (
    check_gqa_keep,
    layer_widths,
    non_embedding_params,
    prune_attention_heads,
    prune_mlp_neurons,
    sync_config,
)

IDS = torch.tensor([[5, 9, 13, 22, 40, 41, 7], [3, 3, 60, 61, 62, 8, 100]])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param) / "m", seed=4, arch=request.param, num_layers=3)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_keeping_everything_changes_nothing(lm_dir):
    model = _load(lm_dir)
    before = _logits(model)
    for layer in decoder_layers(model):
        prune_attention_heads(layer.self_attn, range(4))
        prune_mlp_neurons(layer.mlp, range(128))
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)


def test_head_pruning_equals_zeroing_the_heads_output(lm_dir):
    """Removing query heads = zeroing their o_proj input columns (the reference: the heads contribute nothing)."""
    pruned, masked = _load(lm_dir), _load(lm_dir)
    keep = [0, 2]  # 4 query heads / 2 KV heads: one query head per group
    hd = 16
    for lp, lm in zip(decoder_layers(pruned), decoder_layers(masked), strict=True):
        prune_attention_heads(lp.self_attn, keep)
        for h in (1, 3):
            lm.self_attn.o_proj.weight.data[:, h * hd : (h + 1) * hd] = 0
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=1e-5, rtol=1e-5)
    assert layer_widths(pruned)[0].heads == 2 and layer_widths(pruned)[0].kv_heads == 2


def test_removing_a_whole_kv_group_equals_masking_it(lm_dir):
    pruned, masked = _load(lm_dir), _load(lm_dir)
    for lp, lm in zip(decoder_layers(pruned), decoder_layers(masked), strict=True):
        prune_attention_heads(lp.self_attn, [2, 3])  # group 1 only
        lm.self_attn.o_proj.weight.data[:, :32] = 0
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=1e-5, rtol=1e-5)
    assert layer_widths(pruned)[0].kv_heads == 1


def test_mlp_pruning_equals_zeroing_down_columns(lm_dir):
    pruned, masked = _load(lm_dir), _load(lm_dir)
    keep = list(range(0, 128, 2))
    for lp, lm in zip(decoder_layers(pruned), decoder_layers(masked), strict=True):
        prune_mlp_neurons(lp.mlp, keep)
        lm.mlp.down_proj.weight.data[:, 1::2] = 0
    torch.testing.assert_close(_logits(pruned), _logits(masked), atol=1e-5, rtol=1e-5)
    assert layer_widths(pruned)[0].intermediate == 64


def test_gqa_validation(tmp_path):
    assert check_gqa_keep([0, 1, 6, 7], heads=8, kv_heads=4) == ([0, 3], 2)
    with pytest.raises(ValueError, match="same number of query heads"):
        check_gqa_keep([0, 1, 2], heads=8, kv_heads=4)
    with pytest.raises(ValueError, match="distinct indices"):
        check_gqa_keep([0, 8], heads=8, kv_heads=4)
    with pytest.raises(ValueError, match="every attention head"):
        check_gqa_keep([], heads=8, kv_heads=4)
    with pytest.raises(ValueError, match="at least one"):
        prune_mlp_neurons(_load(build_tiny_causal_lm(tmp_path / "t", num_layers=1)).model.layers[0].mlp, [])


def test_uniformly_pruned_model_reloads_in_a_fresh_process_without_recsys_slm(lm_dir, tmp_path):
    model = _load(lm_dir)
    before = non_embedding_params(model)
    for layer in decoder_layers(model):
        prune_attention_heads(layer.self_attn, [0, 2])
        prune_mlp_neurons(layer.mlp, range(48))
    sync_config(model)
    assert non_embedding_params(model) < before
    model.save_pretrained(tmp_path / "p", safe_serialization=True)
    expected = _logits(model)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'p')!r}).eval()\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        "assert 'recsys_slm' not in sys.modules\n"
        "print(json.dumps(out.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_sync_config_refuses_non_uniform_widths(lm_dir):
    model = _load(lm_dir)
    prune_mlp_neurons(decoder_layers(model)[1].mlp, range(64))
    with pytest.raises(ValueError, match="different widths"):
        sync_config(model)


# ------------------------------------------------------------------------------------------------ importance
def test_magnitude_scores_match_definition(lm_dir):
    from recsys_slm.prune.importance import magnitude_scores

    model = _load(lm_dir)
    heads, neurons = magnitude_scores(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, o = attn.q_proj.weight[16:32], attn.o_proj.weight[:, 16:32]  # head 1 (head_dim 16)
    assert heads[1, 1].item() == pytest.approx(torch.cat([q.flatten(), o.flatten()]).norm().item(), rel=1e-5)
    ref = torch.cat([mlp.gate_proj.weight[7], mlp.up_proj.weight[7], mlp.down_proj.weight[:, 7]]).norm()
    assert neurons[1, 7].item() == pytest.approx(ref.item(), rel=1e-5)


def test_activation_scores_match_naive_per_sequence_reference(lm_dir):
    """mean over each sequence's real tokens, then L2 over sequences; padding must not count."""
    from recsys_slm.prune.importance import activation_scores

    model = _load(lm_dir)
    seqs = [[5, 9, 13, 22], [7, 8], [40, 41, 42, 43, 44]]
    heads, neurons = activation_scores(model, seqs, pad_id=0, batch_size=2)
    captured = {}
    layer = model.model.layers[2]
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("d", a[0]))
    head_rows, neuron_rows = [], []
    for seq in seqs:  # one unpadded sequence at a time
        with torch.no_grad():
            model(torch.tensor([seq]))
        head_rows.append(captured["o"][0].reshape(len(seq), 4, 16).norm(dim=-1).mean(0))
        neuron_rows.append(captured["d"][0].abs().mean(0))
    h1.remove(), h2.remove()
    torch.testing.assert_close(heads[2].float(), torch.stack(head_rows).pow(2).sum(0).sqrt(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(neurons[2].float(), torch.stack(neuron_rows).pow(2).sum(0).sqrt(), atol=1e-4, rtol=1e-4)


def test_uniform_plans_are_gqa_valid():
    from recsys_slm.prune.importance import uniform_head_plan, uniform_neuron_plan

    scores = torch.tensor([[1.0, 2.0, 9.0, 8.0], [5.0, 0.0, 1.0, 2.0]])
    assert uniform_head_plan(scores, kv_heads=2, keep_heads=2, mode="kv_groups") == [[2, 3], [0, 1]]
    assert uniform_head_plan(scores, kv_heads=2, keep_heads=2, mode="query_heads") == [[1, 2], [0, 3]]
    for plan in uniform_head_plan(scores, 2, 2, "query_heads"):
        check_gqa_keep(plan, 4, 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        uniform_head_plan(scores, kv_heads=2, keep_heads=3)
    assert uniform_neuron_plan(torch.tensor([[3.0, 1.0, 2.0]]), 2) == [[0, 2]]


# ------------------------------------------------------------------------------------------------ command
@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
def test_prune_command_writes_a_stock_model_with_report(tmp_path, tiny_data_dir, method, capsys):
    from recsys_slm.cli import main
    from recsys_slm.model_dir import read_manifest

    src = build_tiny_causal_lm(tmp_path / "src", seed=2, num_layers=2)
    prompt = ["prompt.system=Recommender.", "prompt.instruction=Like it?", "prompt.max_tokens=400"]
    rc = main(["prune", "--model", str(src), "--out", str(tmp_path / "p"), f"data_dir={tiny_data_dir}",
               f"method={method}", "heads_keep=0.5", "neurons_keep=0.25", "calibration_records=8",
               "eval_records=18", "device=cpu", *prompt])  # fmt: skip
    assert rc == 0 and "non-embedding params" in capsys.readouterr().out
    m = read_manifest(tmp_path / "p")["metrics"]
    assert m["after"]["widths"] == [{"heads": 2, "kv_heads": 2, "head_dim": 16, "intermediate": 32}] * 2
    assert m["after"]["non_embedding_params"] < m["before"]["non_embedding_params"]
    assert 0 <= m["after"]["val_auc"] <= 1 and m["forward_speedup"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.intermediate_size == 32
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "q"), "heads_keep=0"]) == 2
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "q"), "param_budget=1.5"]) == 2
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "q"), "uniformize=pad"]) == 2  # uniform=true


def test_prune_to_a_parameter_budget(tmp_path, tiny_data_dir):
    from recsys_slm.config import from_dict
    from recsys_slm.prune.pruner import PruneConfig, prune

    src = build_tiny_causal_lm(tmp_path / "src", seed=2, num_layers=2)
    cfg = from_dict(PruneConfig, {"model": str(src), "out": tmp_path / "p", "data_dir": tiny_data_dir,
                                  "prompt": {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400},
                                  "param_budget": 0.4, "method": "magnitude", "calibration_records": 8,
                                  "eval_records": 0, "device": "cpu"})  # fmt: skip
    summary = prune(cfg)
    assert summary["after"]["non_embedding_params"] <= 0.4 * summary["before"]["non_embedding_params"]
    assert 0 < summary["keep_share"] < 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").num_parameters() > 0


def test_taylor_scores_equal_gradient_times_weight_per_group(lm_dir):
    """|Σ g·w| over each group, with g from an independent autograd call; gradients are cleared afterwards."""
    from recsys_slm.prune.importance import taylor_scores

    model = _load(lm_dir)
    ids, mask, labels = IDS, torch.ones_like(IDS), torch.tensor([1.0, 0.0])

    def loss_fn(m, i, a, y):
        logits = m(i, attention_mask=a).logits[:, -1]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 10] - logits[:, 11], y, reduction="sum")

    heads, neurons = taylor_scores(model, [(ids, mask, labels)], loss_fn)
    mlp = model.model.layers[1].mlp
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = torch.autograd.grad(loss_fn(model, ids, mask, labels), weights)
    ref = (grads[0][5] * weights[0][5]).sum() + (grads[1][5] * weights[1][5]).sum() + (grads[2][:, 5] * weights[2][:, 5]).sum()
    assert neurons[1, 5].item() == pytest.approx(abs(ref.item()), rel=1e-4)
    attn = model.model.layers[0].self_attn
    gq, go = torch.autograd.grad(loss_fn(model, ids, mask, labels), [attn.q_proj.weight, attn.o_proj.weight])
    ref_h = (gq[16:32] * attn.q_proj.weight[16:32]).sum() + (go[:, 16:32] * attn.o_proj.weight[:, 16:32]).sum()
    assert heads[0, 1].item() == pytest.approx(abs(ref_h.item()), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_prune_command_removes_lowest_block_influence_layers(tmp_path, tiny_data_dir):
    from recsys_slm.config import from_dict
    from recsys_slm.prune.pruner import PruneConfig, prune

    src = build_tiny_causal_lm(tmp_path / "src", seed=2, num_layers=4)
    cfg = from_dict(PruneConfig, {"model": str(src), "out": tmp_path / "p", "data_dir": tiny_data_dir,
                                  "prompt": {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400},
                                  "layers_keep": 0.5, "heads_keep": 1.0, "neurons_keep": 1.0, "method": "magnitude",
                                  "calibration_records": 8, "eval_records": 0, "device": "cpu"})  # fmt: skip
    summary = prune(cfg)
    assert len(summary["removed_layers"]) == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.num_hidden_layers == 2


def test_unsupported_architecture_gets_a_clear_error(tmp_path, tiny_data_dir, capsys):
    from recsys_slm.cli import main

    src = build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2")
    rc = main(["prune", "--model", str(src), "--out", str(tmp_path / "p"), f"data_dir={tiny_data_dir}", "device=cpu"])
    assert rc == 1 and not (tmp_path / "p").exists()
    assert "GPT2LMHeadModel is not supported by the pruning operators: layer 0" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, model_type", [
    ({"method": "osscar"}, "llama"),
    ({"low_rank": {"method": "svd_llm", "keep_ratio": 0.4}}, "recsys_slm_llama"),
    ({"low_rank": {"method": "cti", "keep_ratio": 0.4, "candidates": [0.5, 1.0], "samples": 8}}, "recsys_slm_llama"),
    ({"uniform": False}, "recsys_slm_llama"),
    ({"uniform": False, "uniformize": "pad"}, "llama"),
])  # fmt: skip
def test_prune_methods_write_a_loadable_model(tmp_path, tiny_data_dir, overrides, model_type):
    """Every method path of ``prune()`` saves a directory that loads back (stock, or the registered compressed
    type through recsys_slm's loader) and scores like the in-memory model did (same val AUC)."""
    from recsys_slm.config import from_dict
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.prune.pruner import PruneConfig, prune

    src = build_tiny_causal_lm(tmp_path / "src", seed=2, num_layers=2)
    cfg = from_dict(PruneConfig, {"model": str(src), "out": tmp_path / "p", "data_dir": tiny_data_dir,
                                  "prompt": {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400},
                                  "method": "magnitude", "heads_keep": 0.5, "neurons_keep": 0.5,
                                  "calibration_records": 8, "eval_records": 18, "device": "cpu", **overrides})  # fmt: skip
    summary = prune(cfg)
    assert summary["model_type"] == model_type
    assert summary["after"]["non_embedding_params"] < summary["before"]["non_embedding_params"]
    model, _ = load_causal_lm(tmp_path / "p", device="cpu", dtype=torch.float32)
    assert model.config.model_type == model_type
    if model_type == "llama":  # stock: loads without the registration too
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.model_type == "llama"
    # the saved model scores like the pruned in-memory one: the eval harness on the reloaded directory
    from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, evaluate_ranker

    report = evaluate_ranker(RankerEvalConfig(model=str(tmp_path / "p"), out=tmp_path / "eval", max_records=18,
                                              task=tiny_data_dir / "tasks" / "pointwise" / "val.parquet",
                                              baselines=False, device="cpu"))  # fmt: skip
    assert report["metrics"][report["primary_method"]]["auc"] == pytest.approx(summary["after"]["val_auc"], abs=1e-6)


def test_width_pruning_refuses_factored_or_non_uniform_models(lm_dir):
    from recsys_slm.models.low_rank import LowRankLinear
    from recsys_slm.prune.structure import check_prunable

    model = _load(lm_dir)
    check_prunable(model)
    prune_mlp_neurons(decoder_layers(model)[1].mlp, range(64))
    with pytest.raises(ValueError, match="different widths"):
        check_prunable(model)
    model = _load(lm_dir)
    q = decoder_layers(model)[0].self_attn.q_proj
    decoder_layers(model)[0].self_attn.q_proj = LowRankLinear(q.in_features, q.out_features, 8)
    with pytest.raises(ValueError, match=r"layer 0 has low-rank factored projections \(self_attn.q_proj\)"):
        check_prunable(model)
