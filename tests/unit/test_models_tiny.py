"""Tiny offline test models: deterministic tokenizer, loadable causal LMs and sentence encoder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recsys_slm.model_dir import read_manifest
from recsys_slm.models.tiny import (
    SPECIAL_TOKENS,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    tiny_causal_lm_config,
)


def test_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 512


def test_tokenizer_verbalizers_and_specials():
    tok = build_tiny_tokenizer()
    yes, no = tok.encode(" Yes", add_special_tokens=False), tok.encode(" No", add_special_tokens=False)
    assert len(yes) == 1 and len(no) == 1 and yes != no
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    # Every byte is in the alphabet: arbitrary text round-trips without unknown tokens.
    text = "Misérables, Les (1995) — 東京 ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_chat_template_is_chatml():
    tok = build_tiny_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Toy Story?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nToy Story?<|im_end|>\n"
    )
    with_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert with_prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_config_shape():
    cfg = tiny_causal_lm_config(512)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    assert cfg.intermediate_size == 128 and cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_causal_lm_config(512, arch="t5")


def test_tiny_lm_loads_with_plain_from_pretrained(tiny_lm_dir):
    assert (tiny_lm_dir / "model.safetensors").is_file()
    assert not list(tiny_lm_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template and len(tok.encode(" Yes", add_special_tokens=False)) == 1
    batch = tok(["Toy Story (1995) Yes", "No"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    manifest = read_manifest(tiny_lm_dir)
    assert manifest["stage"] == "tiny" and manifest["config"]["arch"] == "llama"


def test_tiny_lm_is_seeded(tmp_path, tiny_lm_dir):
    same = build_tiny_causal_lm(tmp_path / "same", seed=0)
    other = build_tiny_causal_lm(tmp_path / "other", seed=1)
    a, b, c = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_lm_dir, same, other))
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        la, lb, lc = (m(ids).logits for m in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)


def test_build_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_causal_lm(tmp_path / "lm", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "arch, cls",
    [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM"), ("gpt2", "GPT2LMHeadModel")],
)
def test_other_architectures(tmp_path, arch, cls):
    path = build_tiny_causal_lm(tmp_path / arch, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == cls
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 512)


def test_tiny_encoder_loads_with_sentence_transformers(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    assert read_manifest(tiny_encoder_dir)["stage"] == "tiny"
    model = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    emb = model.encode(["Toy Story (1995)", "a movie nobody knows"], convert_to_tensor=True)
    assert emb.shape == (2, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)  # Normalize module present
    short = SentenceTransformer(str(tiny_encoder_dir), device="cpu", truncate_dim=16)
    assert short.encode(["Toy Story (1995)"]).shape == (1, 16)
