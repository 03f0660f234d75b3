"""Tiny randomly initialised models for tests: built from configs in-process, fully offline, deterministic.

They have the same shape of interfaces as the real ones (a ChatML byte-level BPE tokenizer whose " Yes" and
" No" are single tokens, a Llama/Qwen2/Mistral/GPT-2 causal LM saved as a plain ``from_pretrained`` directory,
a BERT sentence-transformers folder) but build in about a second and run a forward in milliseconds, so every
stage can be tested end to end without the packaged models.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from recsys_slm.model_dir import atomic_dir, write_manifest

Arch = Literal["llama", "qwen2", "mistral", "gpt2"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
TINY_VOCAB_SIZE = 512

# Same shape as SmolLM2-Instruct's ChatML template, without its default system prompt (tests pass their own).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Built-in training text: movie-title-like words, genres, years and the ranking prompt vocabulary. Repeating the
# verbalizers makes BPE merge " Yes" / " No" into single tokens.
_TITLES = (
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Star Wars (1977)",
    "Lion King, The (1994)", "Pulp Fiction (1994)", "Fargo (1996)", "Return of the Jedi (1983)",
    "Contact (1997)", "Titanic (1997)", "Scream (1996)", "Liar Liar (1997)", "Air Force One (1997)",
    "English Patient, The (1996)", "Godfather, The (1972)", "Casablanca (1942)", "Alien (1979)",
    "Heat (1995)", "Braveheart (1995)", "Usual Suspects, The (1995)", "Silence of the Lambs, The (1991)",
    "Raiders of the Lost Ark (1981)", "Back to the Future (1985)", "Forrest Gump (1994)", "Jurassic Park (1993)",
)  # fmt: skip
_GENRES = (
    "Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror Musical "
    "Mystery Romance Sci-Fi Thriller War Western unknown"
)
_PROMPT = (
    "You are a movie recommender. The user liked these movies: {liked}. The user disliked these movies: "
    "{disliked}. Will the user like the movie {title}, genres {genres}? Answer with Yes or No. Answer: {answer}"
)


def _corpus() -> list[str]:
    """The deterministic training corpus of the tiny tokenizer."""
    genres = _GENRES.split()
    lines = []
    for i, title in enumerate(_TITLES):
        liked = ", ".join(_TITLES[(i + k) % len(_TITLES)] for k in (1, 2, 3))
        disliked = ", ".join(_TITLES[(i + k) % len(_TITLES)] for k in (5, 7))
        answer = "Yes" if i % 2 == 0 else "No"
        lines.append(
            _PROMPT.format(
                liked=liked,
                disliked=disliked,
                title=title,
                genres=f"{genres[i % 19]}|{genres[(i * 7) % 19]}",
                answer=answer,
            )
        )
    lines.append(_GENRES)
    lines += [" Yes", " No", "Yes", "No", " yes", " no"] * 50
    lines += [f"user {u} rated item {u * 7 % 1682} with {u % 5 + 1} stars" for u in range(50)]
    return lines


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A small byte-level BPE tokenizer with ChatML special tokens and chat template.

    Trained in-process with ``tokenizers`` on a built-in corpus; identical on every build (the corpus and trainer
    settings are fixed). Special tokens: ``<|endoftext|>`` (0, unk and pad), ``<|im_start|>`` (1, bos),
    ``<|im_end|>`` (2, eos), as in SmolLM2.

    Returns:
        A ``PreTrainedTokenizerFast``. " Yes" and " No" each encode to exactly one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    for word in (" Yes", " No"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"tiny tokenizer splits {word!r} into {ids}"
    return tokenizer


def tiny_causal_lm_config(vocab_size: int, arch: Arch = "llama", num_layers: int = 2, **special_ids: int):
    """Config of a tiny causal LM: 2 layers, hidden 64, 4 heads / 2 KV heads (GQA), MLP 128, tied embeddings.

    Args:
        vocab_size: the tokenizer's vocabulary size.
        num_layers: decoder blocks (default 2; student-construction tests use more).
        arch: ``"llama"`` (default, the SmolLM2 family), ``"qwen2"``, ``"mistral"`` or ``"gpt2"`` (GPT-2 has no
            GQA: 4 heads, MLP 128).
        special_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` to record in the config.

    Returns:
        A ``LlamaConfig`` (or ``Qwen2Config`` / ``MistralConfig`` / ``GPT2Config``).
    """
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=num_layers, n_head=4, n_inner=128, n_positions=512,
            tie_word_embeddings=True, **special_ids,
        )  # fmt: skip
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **special_ids,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose llama, qwen2, mistral or gpt2")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng keeps the caller's global RNG state untouched while making initialisation depend on seed only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_causal_lm(
    out_dir: str | Path,
    seed: int = 0,
    arch: Arch = "llama",
    num_layers: int = 2,
    vocab_size: int = TINY_VOCAB_SIZE,
) -> Path:
    """Build, save and return a tiny randomly initialised causal LM directory.

    The directory holds ``model.safetensors``, ``config.json``, the tiny tokenizer (with chat template) and a
    ``recsys_slm.json`` manifest (stage ``"tiny"``); plain ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load it. Same seed and arch, same weights.

    Args:
        out_dir: target directory (replaced if it exists).
        seed: weight initialisation seed.
        arch: ``"llama"``, ``"qwen2"``, ``"mistral"`` or ``"gpt2"``.
        num_layers: decoder blocks.
        vocab_size: BPE vocabulary size of the tokenizer; another size gives another tokenizer (different merges
            and ids), which is how the cross-tokenizer tests get a teacher and a student that do not share one.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size)
    config = tiny_causal_lm_config(
        len(tokenizer),
        arch,
        num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            "tiny",
            config={"kind": "causal_lm", "arch": arch, "seed": seed, "vocab_size": len(tokenizer)},
            extra={"model": {"architecture": type(model).__name__, "num_hidden_layers": num_layers}},
        )
    return Path(out_dir)


def _wordpiece_vocab() -> list[str]:
    """A deterministic WordPiece vocabulary: BERT specials, characters, their ``##`` forms, corpus words."""
    text = " ".join(_corpus()).lower()
    chars = sorted({c for c in text if not c.isspace()})
    words = sorted({w.strip(".,?:()|'") for w in text.split()} - {""})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + chars + [f"##{c}" for c in chars] + [w for w in words if w not in chars]
    return list(dict.fromkeys(vocab))


def build_tiny_encoder(out_dir: str | Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """Build, save and return a tiny sentence-transformers directory (BERT + mean pooling + normalize).

    2 layers, ``hidden_size`` 32 or 64, 4 heads, a small lower-casing WordPiece tokenizer built locally.
    ``SentenceTransformer(out_dir)`` loads it, with or without ``truncate_dim``. Manifest stage ``"tiny"``.

    Args:
        out_dir: target directory (replaced if it exists).
        seed: weight initialisation seed.
        hidden_size: embedding dimension (must be divisible by 4).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by the 4 attention heads, got {hidden_size}")
    vocab = _wordpiece_vocab()
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    with tempfile.TemporaryDirectory(prefix="tiny-bert-") as raw:
        (Path(raw) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(
            vocab_file=str(Path(raw) / "vocab.txt"), do_lower_case=True, model_max_length=128
        )
        with _seeded(seed):
            bert = BertModel(config)
        bert.save_pretrained(raw, safe_serialization=True)
        tokenizer.save_pretrained(raw)
        with _seeded(seed):  # in case the loader initialises anything the checkpoint lacks
            transformer = Transformer(raw, max_seq_length=64)
            model = SentenceTransformer(
                modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()],
                device="cpu",
            )
        with atomic_dir(out_dir) as tmp:
            model.save(str(tmp))
            write_manifest(
                tmp,
                "tiny",
                config={
                    "kind": "sentence_encoder",
                    "seed": seed,
                    "hidden_size": hidden_size,
                    "vocab_size": len(vocab),
                },
            )
    return Path(out_dir)
