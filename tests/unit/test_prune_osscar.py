"""OSSCAR: the refit is least squares, the OBS greedy equals a brute-force greedy and finds redundant groups, and
osscar_prune gives GQA-valid, stock-reloadable models whose refit lowers the layer-wise reconstruction error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.prune.osscar import (
    damp_gram,
    gram_of_input,
    greedy_group_removal,
    osscar_prune,
    refit,
    relative_error,
)
from recsys_slm.prune.structure import check_gqa_keep, layer_widths

IDS = torch.tensor([[5, 9, 13, 22, 40, 41, 7], [3, 3, 60, 61, 62, 8, 100]])
# 24 calibration prompts of varied length (231 real tokens > 128 MLP neurons: H is well conditioned)
SEQS = [[(7 * i + 13 * j) % 500 + 3 for j in range(6 + i % 9)] for i in range(24)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param) / "m", seed=4, arch=request.param, num_layers=2)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama1") / "m", seed=4, arch="llama", num_layers=1)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _problem(n=200, cols=12, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64)
    return X, torch.randn(out, cols, generator=g, dtype=torch.float64)


def _error(X, W, kept, W_kept):
    """‖X Wᵀ − X_K W_keptᵀ‖² / ‖X Wᵀ‖² on explicit X."""
    return float((X @ W.T - X[:, kept] @ W_kept.T).pow(2).sum() / (X @ W.T).pow(2).sum())


# ------------------------------------------------------------------------------------------------ solver
def test_refit_equals_naive_least_squares():
    X, W = _problem()
    kept = [0, 2, 3, 7, 8, 11]
    ref = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T  # (out, |K|)
    got = refit(W, X.T @ X, [11, 0, 2, 3, 7, 8])  # order of kept_columns does not matter
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert relative_error(W, X.T @ X, kept, got) == pytest.approx(_error(X, W, kept, ref), rel=1e-9)


def test_refit_keeping_everything_returns_the_weights():
    X, W = _problem()
    torch.testing.assert_close(refit(W, damp_gram(X.T @ X, 0.01), range(12)), W, atol=1e-10, rtol=0)


def test_refit_lowers_the_error_of_the_same_selection():
    X, W = _problem(n=300, cols=16, seed=3)
    X[:, 5] = X[:, 1] + 0.3 * X[:, 5]  # correlated columns: the refit can move weight onto the kept twin
    H = X.T @ X
    kept_groups, W_kept = greedy_group_removal(W, damp_gram(H, 0.01), [[c] for c in range(16)], n_remove=6)
    before = relative_error(W, H, kept_groups, W[:, kept_groups])
    after = relative_error(W, H, kept_groups, W_kept)
    assert 0 < after < before
    assert after == pytest.approx(_error(X, W, kept_groups, W_kept), rel=1e-8)


@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_removes_the_duplicated_group_and_the_refit_recovers_it(group_size):
    """Group 4 duplicates group 1: removing either loses nothing once the other takes over its weight."""
    X, W = _problem(n=300, cols=6 * group_size, seed=1)
    dup, src = slice(4 * group_size, 5 * group_size), slice(group_size, 2 * group_size)
    X[:, dup] = X[:, src]
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(6)]
    H = X.T @ X
    kept, W_kept = greedy_group_removal(W, damp_gram(H, 1e-9), groups, n_remove=1)
    assert set(range(6)) - set(kept) in ({1}, {4})
    columns = [c for g in kept for c in groups[g]]
    assert _error(X, W, columns, W_kept) < 1e-6
    assert relative_error(W, H, columns, W[:, columns]) > 0.01  # without the refit the twin's share is lost


@pytest.mark.parametrize(("group_size", "quota"), [(1, None), (2, None), (2, [0, 0, 0, 1, 1, 1])])
def test_obs_greedy_equals_brute_force_greedy_with_explicit_refits(group_size, quota):
    """Each OBS step (Δ from the downdated inverse) removes the group a brute-force search over refits removes."""
    X, W = _problem(n=400, cols=6 * group_size, out=4, seed=5)
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(6)]
    H = damp_gram(X.T @ X, 1e-3)
    kept, W_kept = greedy_group_removal(W, H, groups, n_remove=4, quota=quota)

    alive, left = list(range(6)), {0: 2, 1: 2}
    for _ in range(4):
        def cost(g, alive=alive):
            cols = [c for h in alive if h != g for c in groups[h]]
            return relative_error(W, H, cols, refit(W, H, cols))

        options = [g for g in alive if quota is None or left[quota[g]] > 0]
        best = min(options, key=cost)
        alive.remove(best)
        if quota is not None:
            left[quota[best]] -= 1
    assert kept == alive
    torch.testing.assert_close(W_kept, refit(W, H, [c for g in alive for c in groups[g]]))
    if quota is not None:
        assert sorted(quota[g] for g in kept) == [0, 1]  # each bucket lost exactly 2


def test_chunked_greedy_removes_the_requested_count():
    X, W = _problem(n=300, cols=20, seed=2)
    kept, W_kept = greedy_group_removal(W, damp_gram(X.T @ X, 0.01), [[c] for c in range(20)], 13, chunk=4)
    assert len(kept) == 7 and W_kept.shape == (5, 7)


def test_greedy_argument_errors():
    X, W = _problem()
    H = X.T @ X
    single = [[c] for c in range(12)]
    with pytest.raises(ValueError, match="n_remove"):
        greedy_group_removal(W, H, single, 12)
    with pytest.raises(ValueError, match="equal size"):
        greedy_group_removal(W, H, [[0, 1], [2]], 1)
    with pytest.raises(ValueError, match="quota"):
        greedy_group_removal(W, H, single, 3, quota=[0] * 6 + [1] * 6)
    with pytest.raises(ValueError, match="positive definite"):
        greedy_group_removal(W, torch.zeros(12, 12, dtype=torch.float64), single, 1)


# ------------------------------------------------------------------------------------------------ model
def test_gram_of_input_matches_explicit_inputs_over_real_tokens(lm_dir):
    """H over a left-padded batch equals XᵀX of each sequence run alone (padding excluded)."""
    model = _load(lm_dir)
    seqs = [[5, 9, 13, 22], [7, 8], [40, 41, 42, 43, 44]]
    layer = decoder_layers(model)[1]
    (h_o, h_d), tokens = gram_of_input(model, [layer.self_attn.o_proj, layer.mlp.down_proj], seqs, pad_id=0,
                                       batch_size=2)  # fmt: skip
    assert tokens == 11
    xs = {"o": [], "d": []}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: xs["o"].append(a[0][0])),
               layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: xs["d"].append(a[0][0]))]  # fmt: skip
    for seq in seqs:
        with torch.no_grad():
            model(torch.tensor([seq]))
    for h in handles:
        h.remove()
    X_o, X_d = torch.cat(xs["o"]).double(), torch.cat(xs["d"]).double()
    torch.testing.assert_close(h_o, X_o.T @ X_o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_d, X_d.T @ X_d, atol=1e-4, rtol=1e-4)


def test_keeping_everything_changes_no_output(lm_dir):
    model = _load(lm_dir)
    before = _logits(model)
    report = osscar_prune(model, SEQS, pad_id=0, batch_size=8, keep_heads=4, keep_neurons=128)
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)
    assert report["calibration_passes"] == 0  # nothing to remove: no pass, weights untouched
    # the greedy + refit path itself with nothing removed: writing its weights back changes no output either
    for layer in decoder_layers(model):
        for linear, size in ((layer.self_attn.o_proj, 16), (layer.mlp.down_proj, 1)):
            (H,), _ = gram_of_input(model, [linear], SEQS, pad_id=0, batch_size=8)
            groups = [list(range(c, c + size)) for c in range(0, linear.in_features, size)]
            kept, W_new = greedy_group_removal(linear.weight, damp_gram(H, 0.01), groups, n_remove=0)
            assert kept == list(range(len(groups)))
            linear.weight.data.copy_(W_new)
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("head_mode", "keep_heads", "kv_kept"), [("query_heads", 2, 2), ("kv_groups", 2, 1)])
def test_osscar_prune_gives_a_valid_stock_model(lm_dir, tmp_path, head_mode, keep_heads, kv_kept):
    model = _load(lm_dir)
    report = osscar_prune(model, SEQS, pad_id=0, batch_size=8, keep_heads=keep_heads, keep_neurons=48,
                          head_mode=head_mode)  # fmt: skip
    assert report["calibration_passes"] == 4  # sequential: attention + MLP of each of the 2 layers
    assert report["widths"] == {"heads": 2, "kv_heads": kv_kept, "head_dim": 16, "intermediate": 48}
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 48
    for w, row in zip(layer_widths(model), report["layers"], strict=True):
        assert (w.heads, w.kv_heads, w.intermediate) == (2, kv_kept, 48)
        check_gqa_keep(row["kept_heads"], heads=4, kv_heads=2)
        assert row["kept_neurons"] == 48
        # the refit never does worse than the same selection without it (ridge optimum includes "no change")
        assert 0 < row["attn_error_after_refit"] < row["attn_error_before_refit"]
        assert 0 < row["mlp_error_after_refit"] < row["mlp_error_before_refit"]
    model.save_pretrained(tmp_path / "p", safe_serialization=True)
    reloaded = _load(tmp_path / "p")
    assert torch.isfinite(_logits(model)).all()
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_refit_written_into_the_model_beats_the_same_selection_without_refit(lm_dir):
    """At model level, the refit o_proj reconstructs the dense attention output on the calibration prompts better
    than the same kept heads with their original weights (layer 0, whose input pruning does not change)."""
    from recsys_slm.prune.structure import prune_attention_heads

    dense, pruned, plain = _load(lm_dir), _load(lm_dir), _load(lm_dir)
    report = osscar_prune(pruned, SEQS, pad_id=0, batch_size=8, keep_heads=2, keep_neurons=128)
    prune_attention_heads(plain.model.layers[0].self_attn, report["layers"][0]["kept_heads"])
    outs: dict[str, list[torch.Tensor]] = {"dense": [], "osscar": [], "plain": []}
    for name, model in (("dense", dense), ("osscar", pruned), ("plain", plain)):
        h = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out, n=name: outs[n].append(out[0]))
        for seq in SEQS[:8]:
            with torch.no_grad():
                model(torch.tensor([seq]))
        h.remove()
    dense_out = torch.cat(outs["dense"], 1)
    err = {k: float((torch.cat(outs[k], 1) - dense_out).pow(2).sum()) for k in ("osscar", "plain")}
    assert err["osscar"] < err["plain"]


def test_non_sequential_uses_one_pass(lm_dir):
    model = _load(lm_dir)
    report = osscar_prune(model, SEQS, pad_id=0, batch_size=8, keep_heads=2, keep_neurons=64, sequential=False,
                          neuron_chunk=8)  # fmt: skip
    assert report["calibration_passes"] == 1 and report["tokens"] == sum(len(s) for s in SEQS)
    assert layer_widths(model)[1].intermediate == 64 and torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"keep_heads": 3}, "keep_heads"),  # query_heads: not a multiple of the 2 KV heads
        ({"keep_heads": 8}, "keep_heads"),  # more than the 4 heads
        ({"keep_heads": 0}, "keep_heads"),
        ({"keep_heads": 1, "head_mode": "kv_groups"}, "keep_heads"),  # groups are 2 query heads
        ({"keep_neurons": 129}, "keep_neurons"),
        ({"keep_neurons": 0}, "keep_neurons"),
        ({"head_mode": "heads"}, "head_mode"),
        ({"damp": -1.0}, "damp"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(llama_dir, kwargs, name):
    model = _load(llama_dir)
    before = _logits(model)
    args = {"keep_heads": 2, "keep_neurons": 64} | kwargs
    with pytest.raises(ValueError, match=name):
        osscar_prune(model, SEQS, 0, 8, **args)
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)  # validated before anything changes
