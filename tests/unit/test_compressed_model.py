"""The registered compressed model type: non-uniform widths and low-rank factors round-trip through
save_pretrained/from_pretrained with identical logits, and uniformize gives stock-loadable directories."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from recsys_slm.models.compressed import (
    RecsysSlmLlamaConfig,
    needs_compressed,
    register,
    to_compressed,
    uniformize,
)
from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.low_rank import LowRankLinear
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.prune.structure import (
    LayerWidths,
    layer_widths,
    prune_attention_heads,
    prune_mlp_neurons,
    sync_config,
)

IDS = torch.tensor([[5, 9, 13, 22, 40, 41, 7], [3, 3, 60, 61, 62, 8, 100]])
STOCK = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm_dir(request, tmp_path_factory):
    # tiny config: hidden 64, 4 query heads / 2 KV heads (GQA, 2 queries per group), head_dim 16, MLP 128
    return build_tiny_causal_lm(
        tmp_path_factory.mktemp(request.param) / "m", seed=4, arch=request.param, num_layers=3
    )


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _nonuniform(model):
    """Layer 0: one KV group with both its queries, 96 neurons; layer 1: one query per group, 64 neurons; layer 2
    untouched (4 heads / 2 KV, 128)."""
    layers = decoder_layers(model)
    prune_attention_heads(layers[0].self_attn, [2, 3])
    prune_mlp_neurons(layers[0].mlp, range(96))
    prune_attention_heads(layers[1].self_attn, [0, 3])
    prune_mlp_neurons(layers[1].mlp, range(0, 128, 2))
    return model


def _factor(module: torch.nn.Linear, rank: int) -> LowRankLinear:
    """Truncated-SVD LowRankLinear of a Linear: up = U·S (out, r), down = Vᵀ (r, in)."""
    u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
    up, down = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    return LowRankLinear.from_factors(up, down, None if module.bias is None else module.bias.detach())


def _low_rank(model):
    layers = decoder_layers(model)
    layers[0].self_attn.q_proj = _factor(layers[0].self_attn.q_proj, 8)
    layers[1].self_attn.v_proj = _factor(layers[1].self_attn.v_proj, 4)  # qwen2: carries a bias
    layers[2].mlp.down_proj = _factor(layers[2].mlp.down_proj, 16)
    return model


def _round_trip(model, path):
    model.save_pretrained(path, safe_serialization=True)
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


def test_nonuniform_widths_round_trip(lm_dir, tmp_path):
    model = _nonuniform(_load(lm_dir))
    expected, widths = _logits(model), layer_widths(model)
    assert needs_compressed(model)
    to_compressed(model)
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)  # conversion changes nothing
    loaded = _round_trip(model, tmp_path / "c")
    assert type(loaded).__name__ == "RecsysSlm" + STOCK[model.config.model_type.removeprefix("recsys_slm_")]
    assert layer_widths(loaded) == widths == [LayerWidths(2, 1, 16, 96), LayerWidths(2, 2, 16, 64),
                                              LayerWidths(4, 2, 16, 128)]  # fmt: skip
    assert json.loads((tmp_path / "c" / "config.json").read_text())["layer_widths"][1]["intermediate"] == 64
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)
    # generation: the dynamic KV cache takes each layer's own number of KV heads
    assert torch.equal(loaded.generate(IDS, max_new_tokens=3, do_sample=False),
                       model.generate(IDS, max_new_tokens=3, do_sample=False))  # fmt: skip


def test_low_rank_round_trip(lm_dir, tmp_path):
    model = _low_rank(_nonuniform(_load(lm_dir)))
    expected = _logits(model)
    to_compressed(model)
    assert model.config.low_rank == {"0.self_attn.q_proj": 8, "1.self_attn.v_proj": 4, "2.mlp.down_proj": 16}
    loaded = _round_trip(model, tmp_path / "c")
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, LowRankLinear)
    assert loaded.model.layers[2].mlp.down_proj.rank == 16
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)


def test_mistral_has_its_own_type_and_round_trips(tmp_path):
    model = _low_rank(
        _nonuniform(_load(build_tiny_causal_lm(tmp_path / "m", seed=4, arch="mistral", num_layers=3)))
    )
    expected = _logits(model)
    loaded = _round_trip(to_compressed(model), tmp_path / "c")
    assert (
        type(loaded).__name__ == "RecsysSlmMistralForCausalLM"
        and loaded.config.model_type == "recsys_slm_mistral"
    )
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)
    padded = uniformize(loaded, "pad")
    assert type(padded).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(_logits(padded), expected, atol=1e-5, rtol=1e-5)


def test_full_rank_factors_reproduce_the_dense_model(lm_dir):
    model = _load(lm_dir)
    expected = _logits(model)
    for layer in decoder_layers(model):
        layer.self_attn.k_proj = _factor(layer.self_attn.k_proj, 32)  # (32, 64): full rank 32
        layer.mlp.up_proj = _factor(layer.mlp.up_proj, 64)  # (128, 64): full rank 64
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)


def test_needs_compressed(lm_dir):
    model = _load(lm_dir)
    assert not needs_compressed(model)
    for layer in decoder_layers(model):  # uniform pruning: a stock config expresses it
        prune_mlp_neurons(layer.mlp, range(64))
    sync_config(model)
    assert not needs_compressed(model)
    prune_attention_heads(decoder_layers(model)[2].self_attn, [0, 1])
    assert needs_compressed(model)
    uniform = _load(lm_dir)
    uniform.model.layers[0].mlp.gate_proj = _factor(uniform.model.layers[0].mlp.gate_proj, 64)
    assert needs_compressed(uniform)


def test_load_causal_lm_loads_a_compressed_dir(lm_dir, tmp_path):
    from recsys_slm.models.loading import load_causal_lm, load_tokenizer

    model = to_compressed(_low_rank(_nonuniform(_load(lm_dir))))
    model.save_pretrained(tmp_path / "c", safe_serialization=True)
    load_tokenizer(lm_dir).save_pretrained(tmp_path / "c")
    loaded, tokenizer = load_causal_lm(tmp_path / "c", device="cpu", dtype="float32")
    assert type(loaded) is type(model) and tokenizer.pad_token is not None
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


def test_uniformize_pad_is_exact_and_shrink_cuts_to_the_narrowest(lm_dir, tmp_path):
    arch = json.loads((lm_dir / "config.json").read_text())["model_type"]
    compressed = to_compressed(_low_rank(_nonuniform(_load(lm_dir))))
    expected = _logits(compressed)

    padded = uniformize(copy.deepcopy(compressed), "pad")
    assert type(padded).__name__ == STOCK[arch] and padded.config.model_type == arch
    assert not needs_compressed(padded) and not hasattr(padded.config, "layer_widths")
    assert set(layer_widths(padded)) == {LayerWidths(4, 2, 16, 128)}  # the widest layer (2)
    torch.testing.assert_close(_logits(padded), expected, atol=1e-5, rtol=1e-5)

    shrunk = uniformize(compressed, "shrink")
    assert type(shrunk).__name__ == STOCK[arch] and not needs_compressed(shrunk)
    # fewest KV heads (layer 0: 1), fewest queries per KV group (layer 1: 1), narrowest MLP (layer 1: 64)
    assert set(layer_widths(shrunk)) == {LayerWidths(1, 1, 16, 64)}
    assert type(_round_trip(shrunk, tmp_path / "s")).__name__ == STOCK[arch]


def test_uniformized_dirs_load_without_recsys_slm(tmp_path):
    """One fresh interpreter (slow to start) checks llama and qwen2, pad and shrink, and that the compressed dir
    itself does not load there (the documented trade-off)."""
    expected = {}
    for arch in ("llama", "qwen2"):
        compressed = to_compressed(_low_rank(_nonuniform(_load(build_tiny_causal_lm(tmp_path / arch, seed=4,
                                                                                       arch=arch, num_layers=3)))))  # fmt: skip
        compressed.save_pretrained(tmp_path / f"{arch}-compressed", safe_serialization=True)
        for mode in ("pad", "shrink"):
            model = uniformize(copy.deepcopy(compressed), mode)
            model.save_pretrained(tmp_path / f"{arch}-{mode}", safe_serialization=True)
            expected[f"{arch}-{mode}"] = _logits(model)
        torch.testing.assert_close(expected[f"{arch}-pad"], _logits(compressed), atol=1e-5, rtol=1e-5)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "out = {}\n"
        f"for name in {sorted(expected)!r}:\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + name).eval()\n"
        "    with torch.no_grad(): out[name] = m(ids).logits.tolist()\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'llama-compressed')!r})\n"
        "    out['compressed_loads'] = True\n"
        "except (ValueError, KeyError, OSError):\n"
        "    out['compressed_loads'] = False\n"
        "assert 'recsys_slm' not in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, logits in expected.items():
        torch.testing.assert_close(torch.tensor(out[name]), logits, atol=1e-5, rtol=1e-5)
    assert out["compressed_loads"] is False  # stock transformers alone cannot read the registered type


def test_pad_picks_a_head_count_the_stock_llama_config_accepts():
    """LlamaConfig rejects hidden_size % num_attention_heads != 0: 9 heads in hidden 96 must pad to 12."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                      num_key_value_heads=3, head_dim=8, intermediate_size=64)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    prune_attention_heads(model.model.layers[0].self_attn, [0, 1, 2, 4, 5, 6, 8, 9, 10])  # 3 KV x 3 queries
    prune_attention_heads(model.model.layers[1].self_attn, [0, 1, 2, 4, 5, 6])  # 2 KV x 3 queries
    expected = _logits(model)
    assert to_compressed(model).config.num_attention_heads == 12  # the envelope, not 9
    uniformize(model, "pad")
    assert set(layer_widths(model)) == {LayerWidths(12, 3, 8, 64)}
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)


def test_from_config_builds_the_configured_shapes():
    cfg = RecsysSlmLlamaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128,
                               layer_widths=[{"heads": 2, "kv_heads": 1, "head_dim": 16, "intermediate": 48},
                                             {"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128}],
                               low_rank={"1.mlp.up_proj": 5})  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.num_key_value_groups == 2 and model.model.layers[0].mlp.down_proj.weight.shape == (64, 48)
    assert model.model.layers[1].mlp.up_proj.down.weight.shape == (5, 64)
    assert model(IDS % 32).logits.shape == (2, 7, 32)


def test_register_is_idempotent():
    from transformers import AutoConfig

    register()
    register()
    assert type(AutoConfig.for_model("recsys_slm_qwen2")).__name__ == "RecsysSlmQwen2Config"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("low_rank", {"5.self_attn.q_proj": 4}, r"'5.self_attn.q_proj' names layer 5, but the model has 2 layers"),
    ("low_rank", {"0.self_attn.qq_proj": 4}, r"low_rank key '0.self_attn.qq_proj' names no factorable module"),
    ("low_rank", {"0.mlp.up_proj": 0}, r"low_rank\['0.mlp.up_proj'\] must be an integer rank >= 1"),
    ("layer_widths", [{"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 8}], r"one entry per layer \(2\)"),
    ("layer_widths", [{"heads": 3, "kv_heads": 2, "head_dim": 16, "intermediate": 8}] * 2, r"layer_widths\[0\]: heads"),
    ("layer_widths", [{"heads": 4, "kv_heads": 2, "head_dim": 8, "intermediate": 8}] * 2, r"head_dim 8 differs"),
    ("layer_widths", [{"heads": 4, "kv_heads": 2}] * 2, r"layer_widths\[0\] must be a dict with exactly the keys"),
])  # fmt: skip
def test_bad_config_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        RecsysSlmLlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             **{field: value})  # fmt: skip


def test_bad_conversion_inputs(tmp_path):
    model = _load(build_tiny_causal_lm(tmp_path / "m", num_layers=1))
    with pytest.raises(ValueError, match="mode must be 'pad' or 'shrink', got 'trim'"):
        uniformize(model, "trim")
    model.lm_head = _factor(model.lm_head, 8)
    with pytest.raises(
        ValueError, match="LowRankLinear outside the decoder layers is not supported: \\['lm_head'\\]"
    ):
        to_compressed(model)
    gpt2 = _load(build_tiny_causal_lm(tmp_path / "g", arch="gpt2", num_layers=1))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no compressed model type"):
        to_compressed(gpt2)
