"""Encoder pruning (BERT, MPNet): keeping everything is a no-op, removing heads / neurons equals masking them, and
uniformly pruned sentence encoders reload with stock sentence-transformers / transformers in a fresh process that
never imports recsys_slm, with the embeddings of the in-memory pruned model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from recsys_slm.model_dir import read_manifest
from recsys_slm.models.tiny import build_tiny_encoder
from recsys_slm.prune.encoder import (
    encoder_activation_scores,
    encoder_layers,
    encoder_magnitude_scores,
    encoder_widths,
    keep_encoder_layers,
    prune_encoder,
    prune_encoder_heads,
    prune_encoder_neurons,
    prune_sentence_encoder,
    sync_encoder_config,
)

TEXTS = [
    "toy story (1995)",
    "a crime drama with a heist in the city",
    "star wars (1977) sci-fi adventure",
    "comedy",
]


def _build_tiny_mpnet(bert_dir: Path, out: Path) -> Path:
    """A 3-layer MPNet sentence encoder (hidden 32, 4 heads, MLP 64) with the tiny BERT's WordPiece tokenizer."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=80)  # fmt: skip
    raw = out.parent / "mpnet-raw"
    torch.manual_seed(5)
    MPNetModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=32)
    model = SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()], device="cpu")
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("bert") / "enc", seed=3)


@pytest.fixture(scope="module")
def mpnet_dir(bert_dir, tmp_path_factory):
    return _build_tiny_mpnet(bert_dir, tmp_path_factory.mktemp("mpnet") / "enc")


@pytest.fixture(params=["bert", "mpnet"])
def enc_dir(request, bert_dir, mpnet_dir):
    return bert_dir if request.param == "bert" else mpnet_dir


def _load(path) -> SentenceTransformer:
    return SentenceTransformer(str(path), device="cpu").eval()


def _embed(model: SentenceTransformer) -> torch.Tensor:
    return model.encode(TEXTS, convert_to_tensor=True).cpu()


def test_keeping_everything_changes_nothing(enc_dir):
    model = _load(enc_dir)
    before = _embed(model)
    for layer in encoder_layers(model):
        w = encoder_widths(model)[0]
        prune_encoder_heads(layer, range(w.heads))
        prune_encoder_neurons(layer, range(w.intermediate))
    keep_encoder_layers(model, range(len(encoder_layers(model))))
    sync_encoder_config(model)
    prune_encoder(model)  # all fractions 1.0
    torch.testing.assert_close(_embed(model), before, atol=1e-6, rtol=0)


def test_head_pruning_equals_zeroing_the_heads_output_columns(enc_dir):
    """Different heads per layer; for MPNet this also checks that each layer reads its own heads' position bias."""
    pruned, masked = _load(enc_dir), _load(enc_dir)
    keeps = [[0, 3], [1, 2], [2]]
    d = encoder_widths(pruned)[0].head_size
    for i, (lp, lm) in enumerate(zip(encoder_layers(pruned), encoder_layers(masked), strict=True)):
        prune_encoder_heads(lp, keeps[i])
        o = lm.attention.output.dense if hasattr(lm.attention, "output") else lm.attention.attn.o
        for h in set(range(4)) - set(keeps[i]):
            o.weight.data[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(_embed(pruned), _embed(masked), atol=1e-5, rtol=0)
    assert [w.heads for w in encoder_widths(pruned)] == [len(k) for k in keeps][: len(encoder_layers(pruned))]
    with pytest.raises(ValueError, match="heads were removed|different widths"):
        sync_encoder_config(pruned)


def test_repeated_head_pruning_composes(mpnet_dir):
    once, twice = _load(mpnet_dir), _load(mpnet_dir)
    for lo, lt in zip(encoder_layers(once), encoder_layers(twice), strict=True):
        prune_encoder_heads(lo, [1, 3])
        prune_encoder_heads(lt, [1, 2, 3])
        prune_encoder_heads(lt, [0, 2])  # of the current heads 1, 2, 3 → original 1 and 3
    torch.testing.assert_close(_embed(twice), _embed(once), atol=1e-6, rtol=0)


def test_neuron_pruning_equals_zeroing_output_columns(enc_dir):
    pruned, masked = _load(enc_dir), _load(enc_dir)
    width = encoder_widths(pruned)[0].intermediate
    for lp, lm in zip(encoder_layers(pruned), encoder_layers(masked), strict=True):
        prune_encoder_neurons(lp, range(0, width, 2))
        lm.output.dense.weight.data[:, 1::2] = 0
    torch.testing.assert_close(_embed(pruned), _embed(masked), atol=1e-5, rtol=0)
    assert sync_encoder_config(pruned).intermediate == width // 2
    assert pruned[0].auto_model.config.intermediate_size == width // 2


def test_importance_scores(bert_dir, mpnet_dir):
    from transformers import AutoTokenizer

    bert = _load(bert_dir)
    mag = encoder_magnitude_scores(bert)
    assert mag.heads.shape == (2, 4) and mag.neurons.shape == (2, 128) and mag.layers is None
    assert bool((mag.heads > 0).all()) and bool((mag.neurons > 0).all())
    act = encoder_activation_scores(bert, TEXTS, batch_size=3)
    assert act.heads.shape == (2, 4) and act.neurons.shape == (2, 128) and act.layers.shape == (2,)
    assert bool(torch.isfinite(act.layers).all()) and bool((act.heads > 0).all())
    # Token batches on the bare model give the same scores as texts through the SentenceTransformer.
    tok = AutoTokenizer.from_pretrained(bert_dir)
    batches = [
        tok(TEXTS[:3], padding=True, return_tensors="pt"),
        tok(TEXTS[3:], padding=True, return_tensors="pt"),
    ]
    again = encoder_activation_scores(bert[0].auto_model, batches)
    for a, b in zip(act, again, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    mp = encoder_activation_scores(_load(mpnet_dir), TEXTS)
    assert mp.heads.shape == (3, 4) and mp.neurons.shape == (3, 64) and mp.layers.shape == (3,)


def test_pruned_encoders_reload_in_a_fresh_process_without_recsys_slm(bert_dir, mpnet_dir, tmp_path):
    from transformers import AutoTokenizer

    # BERT: magnitude, half the neurons, 1 of 2 layers; compared through SentenceTransformer (+ truncate_dim).
    bert = _load(bert_dir)
    plan = prune_encoder(bert, neurons_keep=0.5, layers_keep=0.5)
    expected_bert = _embed(bert)
    bert.truncate_dim = 16
    expected_trunc = _embed(bert)
    report = prune_sentence_encoder(
        bert_dir, tmp_path / "bert", neurons_keep=0.5, layers_keep=0.5, device="cpu"
    )
    assert report["layers"] == plan["layers"] == [1] and report["widths"]["intermediate"] == 64
    assert report["encoder_layer_params"]["after"] < report["encoder_layer_params"]["before"] / 2
    assert report["reload_max_abs_diff"] <= 1e-5
    manifest = read_manifest(tmp_path / "bert")
    assert manifest["stage"] == "prune" and manifest["parent"] == str(bert_dir)
    assert manifest["metrics"]["layers"] == [1]

    # MPNet: activation importance, 2 of 3 layers by Block Influence; compared through stock AutoModel.
    mpnet = _load(mpnet_dir)
    mplan = prune_encoder(
        mpnet, neurons_keep=0.25, layers_keep=0.6, method="activation", calibration_texts=TEXTS
    )
    batch = AutoTokenizer.from_pretrained(mpnet_dir)(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected_mpnet = mpnet[0].auto_model(input_ids=ids, attention_mask=mask).last_hidden_state
    mreport = prune_sentence_encoder(mpnet_dir, tmp_path / "mpnet", neurons_keep=0.25, layers_keep=0.6,
                                     method="activation", calibration_texts=TEXTS, device="cpu")  # fmt: skip
    assert mreport["layers"] == mplan["layers"] and len(mplan["layers"]) == 2
    assert mreport["widths"] == {"layers": 2, "heads": 4, "head_size": 8, "intermediate": 16}

    code = (
        "import json, sys, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        "from transformers import AutoModel\n"
        f"texts = {TEXTS!r}\n"
        f"full = SentenceTransformer({str(tmp_path / 'bert')!r}, device='cpu').encode(texts)\n"
        f"trunc = SentenceTransformer({str(tmp_path / 'bert')!r}, device='cpu', truncate_dim=16).encode(texts)\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'mpnet')!r}).eval()\n"
        f"ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})\n"
        "with torch.no_grad(): hidden = m(input_ids=ids, attention_mask=mask).last_hidden_state\n"
        "assert 'recsys_slm' not in sys.modules\n"
        "print(json.dumps({'full': full.tolist(), 'trunc': trunc.tolist(), 'mpnet': hidden.tolist()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(out["full"]), expected_bert, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(out["trunc"]), expected_trunc, atol=1e-5, rtol=0)
    assert expected_trunc.shape == (len(TEXTS), 16)
    torch.testing.assert_close(torch.tensor(out["mpnet"]), expected_mpnet, atol=1e-5, rtol=0)


def test_bad_input_is_refused_naming_it(bert_dir, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    model = _load(bert_dir)
    layer = encoder_layers(model)[0]
    with pytest.raises(ValueError, match="0 attention heads"):
        prune_encoder_heads(layer, [])
    with pytest.raises(ValueError, match=r"attention heads .*\[0, 4\).*\[4\]"):
        prune_encoder_heads(layer, [0, 4])
    with pytest.raises(ValueError, match="0 MLP neurons"):
        prune_encoder_neurons(layer, [])
    with pytest.raises(ValueError, match=r"MLP neurons .*\[999\]"):
        prune_encoder_neurons(layer, [0, 999])
    with pytest.raises(ValueError, match="0 encoder layers"):
        keep_encoder_layers(model, [])
    with pytest.raises(ValueError, match=r"encoder layers .*\[5\]"):
        keep_encoder_layers(model, [0, 5])
    distil = DistilBertModel(DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(ValueError, match="DistilBertModel"):
        encoder_layers(distil)
    with pytest.raises(ValueError, match="DistilBertModel"):
        encoder_magnitude_scores(distil)
    out = tmp_path / "p"
    with pytest.raises(ValueError, match="heads_keep=0.5.*head size"):
        prune_sentence_encoder(bert_dir, out, heads_keep=0.5, device="cpu")
    with pytest.raises(ValueError, match="neurons_keep"):
        prune_encoder(model, neurons_keep=0)
    with pytest.raises(ValueError, match="unknown method"):
        prune_encoder(model, method="taylor")
    with pytest.raises(ValueError, match="calibration_texts"):
        prune_encoder(model, method="activation")
    assert not out.exists()
