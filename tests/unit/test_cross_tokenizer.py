"""Cross-tokenizer distillation: offset alignment, shared vocabulary, ULD, GOLD-style hybrid loss, vocab checks.

Tokenizers are built in-process: the tiny ChatML byte-level BPE at two vocabulary sizes (512 and 300), a
byte-level BPE trained on a different corpus, and a SentencePiece-style (Metaspace) BPE.
"""

from __future__ import annotations

import math

import pytest
import torch

from recsys_slm.distill import (
    GoldLoss,
    GoldLossConfig,
    ULDLoss,
    ULDLossConfig,
    align_offsets,
    check_vocab_size,
    encode_with_offsets,
    filler_token_ids,
    generalized_jsd,
    hard_label_ce,
    ignored_ids,
    merge_group_logprobs,
    shared_vocab,
    sorted_l1,
    uld_distance,
)
from recsys_slm.distill.cross_tokenizer import normalize_token
from recsys_slm.models.tiny import build_tiny_tokenizer, tiny_causal_lm_config

TEXTS = [
    "The user liked Toy Story (1995) and Fargo (1996). Answer: Yes",
    "Misérables, Les (1995) — 日本 café; user 42 rated item 7 with 5 stars\nNo",
    "  double  spaces, tabs\tand émojis 🎬 at the end",
]

OTHER_CORPUS = [
    "a completely different corpus about cooking: pasta, tomatoes, garlic and olive oil",
    "the chef rated the recipe with five stars; the guests liked the dessert",
    "numbers 12345 67890 and punctuation !? ... -- (brackets) [square] {curly}",
] * 20


def _train_bpe(corpus, vocab_size, metaspace=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if metaspace:
        tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def tok512():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok300():
    return build_tiny_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def tok_other():
    return _train_bpe(OTHER_CORPUS, 400)


@pytest.fixture(scope="module")
def tok_meta():
    return _train_bpe(OTHER_CORPUS, 200, metaspace=True)


# ------------------------------------------------------------------------------------------------ alignment
def test_align_offsets_small_cases():
    # "abcdef": student ab|cd|ef, teacher abcd|e|f
    groups = align_offsets([(0, 2), (2, 4), (4, 6)], [(0, 4), (4, 5), (5, 6)])
    assert groups == [([0, 1], [0]), ([2], [1, 2])]
    # identical tokenisations: one token per group
    offsets = [(0, 1), (1, 3), (3, 4)]
    assert align_offsets(offsets, offsets) == [([0], [0]), ([1], [1]), ([2], [2])]
    # a 2-byte character split into two byte tokens that share its span (0, 1) is never cut apart
    assert align_offsets([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)]) == [([0, 1], [0]), ([2], [1])]
    # no common boundary before the end: a single group
    assert align_offsets([(0, 3), (3, 5)], [(0, 2), (2, 5)]) == [([0, 1], [0, 1])]
    assert align_offsets([], []) == []


def test_align_offsets_rejects_different_texts():
    with pytest.raises(ValueError, match="up to offset 5 but teacher tokens up to 6"):
        align_offsets([(0, 5)], [(0, 6)])
    with pytest.raises(ValueError, match="one side has no tokens"):
        align_offsets([(0, 5)], [])


def _token_bytes(tokenizer, ids):
    return b"".join(normalize_token(t, "byte_level") for t in tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("pair", ["512-300", "512-other", "other-512"])
def test_alignment_groups_cover_the_same_text(pair, tok512, tok300, tok_other):
    student, teacher = {"512-300": (tok512, tok300), "512-other": (tok512, tok_other),
                        "other-512": (tok_other, tok512)}[pair]  # fmt: skip
    for text in TEXTS:
        data = text.encode("utf-8")
        s_ids, s_off = encode_with_offsets(student, text)
        t_ids, t_off = encode_with_offsets(teacher, text)
        assert _token_bytes(student, s_ids) == data  # byte offsets: every token owns its own bytes
        assert [b - a for a, b in s_off] == [len(_token_bytes(student, [i])) for i in s_ids]
        groups = align_offsets(s_off, t_off)
        assert [i for g, _ in groups for i in g] == list(range(len(s_ids)))
        assert [i for _, g in groups for i in g] == list(range(len(t_ids)))
        start = 0
        for s_group, t_group in groups:
            end = s_off[s_group[-1]][1]
            assert end == t_off[t_group[-1]][1]
            assert _token_bytes(student, [s_ids[i] for i in s_group]) == data[start:end]
            assert _token_bytes(teacher, [t_ids[i] for i in t_group]) == data[start:end]
            start = end
        assert start == len(data)
        if pair != "512-300":  # tokenizers trained on different text disagree somewhere
            assert any(len(s) > 1 or len(t) > 1 for s, t in groups)


def test_character_offsets_keep_split_characters_together(tok512, tok300):
    text = TEXTS[1]
    s_ids, s_off = encode_with_offsets(tok512, text, unit="char")
    t_ids, t_off = encode_with_offsets(tok300, text, unit="char")
    start = 0
    for s_group, t_group in align_offsets(s_off, t_off):
        end = max(s_off[i][1] for i in s_group)
        assert tok512.decode([s_ids[i] for i in s_group]) == text[start:end]
        assert tok300.decode([t_ids[i] for i in t_group]) == text[start:end]
        start = end
    assert start == len(text)
    # the same tokenizer on both sides gives one token per group with byte offsets, not with char offsets
    ids, byte_off = encode_with_offsets(tok512, text)
    assert all(len(s) == 1 for s, _ in align_offsets(byte_off, byte_off))
    assert any(len(s) > 1 for s, _ in align_offsets(s_off, s_off))


def test_merge_group_logprobs_matches_chain_rule():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    ids = [2, 4, 1, 0, 5]
    groups = [[0], [1, 2, 3], [4]]
    merged, log_c = merge_group_logprobs(logp, ids, groups)
    assert merged.shape == (3, 6)
    for gi, group in enumerate(groups):
        c = math.prod(math.exp(logp[j, ids[j]].item()) for j in group[1:])
        assert math.exp(log_c[gi].item()) == pytest.approx(c)
        for v in range(6):
            assert math.exp(merged[gi, v].item()) == pytest.approx(math.exp(logp[group[0], v].item()) * c)
    # the actual group text gets its exact chain-rule probability
    actual = sum(logp[j, ids[j]].item() for j in groups[1])
    assert merged[1, ids[1]].item() == pytest.approx(actual)


# ------------------------------------------------------------------------------------------------ vocabulary
def test_shared_vocab_maps_equal_strings(tok512, tok300, tok_other):
    s_ids, t_ids = shared_vocab(tok512, tok300)
    assert len(s_ids) == len(t_ids) == len(tok300)  # same corpus: the 300-vocabulary is a subset
    assert tok512.convert_ids_to_tokens(s_ids.tolist()) == tok300.convert_ids_to_tokens(t_ids.tolist())
    s_ids, t_ids = shared_vocab(tok512, tok_other)
    s_tokens = tok512.convert_ids_to_tokens(s_ids.tolist())
    assert s_tokens == tok_other.convert_ids_to_tokens(t_ids.tolist())
    assert 256 < len(s_ids) < min(len(tok512), len(tok_other))  # bytes + specials shared, merges mostly not
    assert "<|im_end|>" in s_tokens and "Ġthe" in s_tokens
    assert s_ids.tolist() == sorted(s_ids.tolist())
    only_student = set(tok512.get_vocab()) - set(tok_other.get_vocab())
    assert only_student and not only_student & set(s_tokens)


def test_shared_vocab_normalises_space_markers(tok512, tok_meta):
    assert normalize_token("Ġthe", "byte_level") == b" the"
    assert normalize_token("Ã©", "byte_level") == "é".encode()
    assert normalize_token("Ċ", "byte_level") == b"\n"
    assert normalize_token("▁the", "metaspace") == b" the"
    assert normalize_token("<0x0A>", "metaspace") == b"\n"
    s_ids, t_ids = shared_vocab(tok512, tok_meta)
    pairs = dict(
        zip(tok512.convert_ids_to_tokens(s_ids.tolist()), tok_meta.convert_ids_to_tokens(t_ids.tolist()))
    )
    assert pairs["Ġthe"] == "▁the"
    assert pairs["<|im_end|>"] == "<|im_end|>"
    assert all(normalize_token(a, "byte_level") == normalize_token(b, "metaspace") for a, b in pairs.items()
               if not a.startswith("<|"))  # fmt: skip


# ------------------------------------------------------------------------------------------------ vocab sizes
def test_vocab_size_mismatch_raises_with_both_numbers(tok512):
    with pytest.raises(
        ValueError, match=r"student: the output head has 300 rows .* tokenizer has 512 tokens"
    ):
        check_vocab_size(300, len(tok512), "student")
    check_vocab_size(512, 512)
    check_vocab_size(520, 512)  # padding rows are allowed (and masked)


def test_ignored_ids_cover_padding_rows_and_fillers(tok512):
    assert ignored_ids(515, tok512) == [512, 513, 514]
    tok = build_tiny_tokenizer()
    tok.add_tokens(["[PAD513]", "[PAD514]"])
    assert filler_token_ids(tok) == [512, 513]
    assert ignored_ids(520, tok) == [512, 513] + list(range(514, 520))


# ------------------------------------------------------------------------------------------------ ULD
def test_uld_matches_hand_computation():
    student = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64).log().requires_grad_(True)
    teacher = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.3, 0.0, 0.5, 0.2]], dtype=torch.float64).log()
    # row 0: sorted (0.7, 0.2, 0.1, 0) vs (0.5, 0.3, 0.1, 0.1): 0.2 + 0.1 + 0 + 0.1 = 0.4
    # row 1: sorted (0.5, 0.3, 0.2, 0) vs (0.5, 0.3, 0.2, 0): 0
    got = uld_distance(student, teacher)
    assert got.item() == pytest.approx(0.2)
    got.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert sorted_l1(student.detach().exp(), teacher.exp()).tolist() == pytest.approx([0.4, 0.0])
    assert uld_distance(student, teacher, mask=torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-12)


def test_uld_ignore_ids_and_temperature():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 9, generator=g, dtype=torch.float64)
    padded = torch.cat(
        [teacher, torch.full((3, 4), 50.0, dtype=torch.float64)], dim=1
    )  # filler rows, huge logits
    want = uld_distance(student, teacher, student_temperature=2.0, teacher_temperature=0.5)
    got = uld_distance(student, padded, student_temperature=2.0, teacher_temperature=0.5,
                       teacher_ignore_ids=[9, 10, 11, 12])  # fmt: skip
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # naive: sort descending, zero-pad, L1
    ref = 0.0
    for n in range(3):
        q = sorted(torch.softmax(student[n] / 2.0, -1).tolist(), reverse=True) + [0.0] * 2
        p = sorted(torch.softmax(teacher[n] / 0.5, -1).tolist(), reverse=True)
        ref += sum(abs(a - b) for a, b in zip(q, p))
    assert want.item() == pytest.approx(ref / 3, rel=1e-12)


def test_uld_loss_adds_weighted_ce():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 2, -100, 5])
    got = ULDLoss()(student, teacher, labels)  # paper defaults: CE 1, distillation 1.5
    want = hard_label_ce(student, labels) + 1.5 * uld_distance(student, teacher)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert ULDLoss(ULDLossConfig(ce_weight=0.0))(student, teacher).item() == pytest.approx(
        1.5 * uld_distance(student, teacher).item()
    )
    with pytest.raises(ValueError, match="labels are required"):
        ULDLoss()(student, teacher)


# ------------------------------------------------------------------------------------------------ GOLD
def _logits_for(ids, width, seed):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(len(ids), width, generator=g, dtype=torch.float64)


def test_gold_loss_is_zero_for_identical_tokenizers_and_models(tok512):
    text = TEXTS[1]
    ids, off = encode_with_offsets(tok512, text)
    logits = _logits_for(ids, len(tok512), 0)
    loss = GoldLoss(tok512, tok512)
    assert loss(logits, logits.clone(), ids, ids, off, off).item() == pytest.approx(0.0, abs=1e-10)
    # with one tokenizer it is the plain generalized JSD of the two models
    other = _logits_for(ids, len(tok512), 1)
    got = GoldLoss(tok512, tok512, GoldLossConfig(beta=0.3))(logits, other, ids, ids, off, off)
    assert got.item() == pytest.approx(generalized_jsd(logits, other, beta=0.3).item(), rel=1e-6)


def test_gold_loss_positive_across_tokenizers_and_student_only_gradients(tok512, tok_other):
    text = TEXTS[0]
    s_ids, s_off = encode_with_offsets(tok512, text)
    t_ids, t_off = encode_with_offsets(tok_other, text)
    student = _logits_for(s_ids, len(tok512), 3).requires_grad_(True)
    teacher = _logits_for(t_ids, len(tok_other), 4).requires_grad_(True)
    loss_fn = GoldLoss(tok512, tok_other, GoldLossConfig(matched_weight=0.6, unmatched_weight=0.4))
    loss = loss_fn(student, teacher, s_ids, t_ids, s_off, t_off)
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert loss_fn.last_matched_loss > 0 and loss_fn.last_unmatched_loss > 0
    assert loss.item() == pytest.approx(
        0.6 * loss_fn.last_matched_loss.item() + 0.4 * loss_fn.last_unmatched_loss.item()
    )
    loss.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_gold_loss_masks_padding_rows_and_rejects_short_heads(tok512, tok300):
    text = TEXTS[0]
    s_ids, s_off = encode_with_offsets(tok300, text)
    t_ids, t_off = encode_with_offsets(tok512, text)
    student = _logits_for(s_ids, len(tok300), 5)
    teacher = _logits_for(t_ids, len(tok512), 6)
    loss_fn = GoldLoss(tok300, tok512)
    want = loss_fn(student, teacher, s_ids, t_ids, s_off, t_off)
    assert want.item() > 0
    padded = torch.cat([teacher, torch.full((len(t_ids), 8), 30.0, dtype=torch.float64)], dim=1)
    got = loss_fn(student, padded, s_ids, t_ids, s_off, t_off)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    with pytest.raises(
        ValueError, match=r"teacher: the output head has 500 rows .* tokenizer has 512 tokens"
    ):
        loss_fn(student, teacher[:, :500], s_ids, t_ids, s_off, t_off)


def test_gold_loss_on_tiny_models(tok512, tok_other):
    """End to end: two tiny causal LMs with different tokenizers distil on the same completion text."""
    from transformers import AutoModelForCausalLM

    def model_for(tokenizer, arch, seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_causal_lm_config(len(tokenizer), arch)).eval()

    student, teacher = model_for(tok512, "llama", 0), model_for(tok_other, "qwen2", 1)
    prompt, completion = "User liked Fargo. Recommend:", " Toy Story (1995)"

    def completion_logits(model, tokenizer):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids, offsets = encode_with_offsets(tokenizer, completion)
        input_ids = torch.tensor([prompt_ids + ids])
        hidden = model.base_model(input_ids=input_ids).last_hidden_state[0]
        rows = hidden[
            len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)
        ]  # positions predicting the completion
        return model.get_output_embeddings()(rows), ids, offsets

    s_logits, s_ids, s_off = completion_logits(student, tok512)
    with torch.no_grad():
        t_logits, t_ids, t_off = completion_logits(teacher, tok_other)
    loss = GoldLoss(tok512, tok_other)(s_logits, t_logits, s_ids, t_ids, s_off, t_off)
    assert loss.item() > 0
    loss.backward()
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    same = GoldLoss(tok512, tok512)(s_logits, s_logits.detach(), s_ids, s_ids, s_off, s_off)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_configs_validate_fields():
    from recsys_slm.config import ConfigError

    with pytest.raises(ConfigError, match="beta"):
        GoldLossConfig(beta=1.5)
    with pytest.raises(ConfigError, match="matched_weight"):
        GoldLossConfig(matched_weight=-1.0)
    with pytest.raises(ConfigError, match="student_temperature"):
        ULDLossConfig(student_temperature=0.0)
    assert GoldLossConfig(matched_weight=1).matched_weight == 1.0
