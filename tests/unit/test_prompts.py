"""Prompt rendering: chat template, liked/disliked lists, the verbalizer position and the truncation policy."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_slm.config import ConfigError
from recsys_slm.data.prompts import PromptConfig, PromptRenderer, PromptTooLongError
from recsys_slm.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def items():
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, 8)],
            "title": ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Babe", "Heat"],
            "text": [f"Movie {i} (1995), Drama" for i in range(1, 8)],
        }
    )


@pytest.fixture()
def users():
    return pd.DataFrame({"user_id": ["u1"], "age": [24], "occupation": ["technician"]})


def render(tokenizer, items, users=None, **cfg):
    return PromptRenderer(PromptConfig(**cfg), tokenizer, items, users)


def test_renders_chat_template_and_ends_where_verbalizer_is_read(tokenizer, items, users):
    r = render(tokenizer, items, users, profile_template="Age {age}, {occupation}.\n")
    p = r.render(["1", "2", "3"], [1, 0, 1], "5", "u1")
    assert p.text.startswith("<|im_start|>system\nYou are a movie recommender.")
    assert "Age 24, technician." in p.text
    assert "Liked: Toy Story; Four Rooms\nDisliked: GoldenEye\nCandidate: Movie 5 (1995), Drama" in p.text
    assert p.text.endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:")
    # the prefix holds everything user-specific, the suffix the candidate; the space goes with the candidate
    assert p.prefix + p.suffix == p.text
    assert p.prefix.endswith("Candidate:") and p.suffix.startswith(" Movie 5")
    # tokens(text) + " Yes" == tokens(text) followed by the single verbalizer token
    base = tokenizer(p.text, add_special_tokens=False)["input_ids"]
    with_yes = tokenizer(p.text + " Yes", add_special_tokens=False)["input_ids"]
    assert with_yes[:-1] == base and len(with_yes) == len(base) + 1
    assert p.n_tokens == len(base) and p.history_kept == 3 and p.history_dropped == 0


def test_candidate_template_and_history_counts(tokenizer, items):
    items = items.assign(rating_summary=[f"average rating {i}.0/5 from {i * 10} ratings" for i in range(1, 8)])
    r = render(
        tokenizer,
        items,
        user_template="Liked {n_liked} of {n_history}: {liked}\nDisliked {n_disliked}: {disliked}\nCandidate: {candidate}",
        candidate_template="{title}; {rating_summary}",
    )
    p = r.render(["1", "2", "3"], [1, 0, 1], "4")
    assert "Liked 2 of 3: Toy Story; Four Rooms\nDisliked 1: GoldenEye\nCandidate: Get Shorty; average rating 4.0/5 from 40 ratings" in p.text


def test_empty_lists_and_plain_text_mode(tokenizer, items):
    p = render(tokenizer, items, use_chat_template=False, system="").render([], [], "2")
    assert p.text == (
        "Given the user's preferences, decide whether the user will like the candidate movie. Answer Yes or No.\n"
        "Liked: none\nDisliked: none\nCandidate: Movie 2 (1995), Drama\nAnswer:"
    )


def test_truncation_drops_oldest_history_first_never_the_candidate(tokenizer, items):
    full = render(tokenizer, items).render(["1", "2", "3", "4", "6"], [1, 1, 0, 1, 0], "7")
    # budget that fits exactly two fewer history items than the full prompt
    two_dropped = render(tokenizer, items).render(["3", "4", "6"], [0, 1, 0], "7")
    p = render(tokenizer, items, max_tokens=two_dropped.n_tokens).render(["1", "2", "3", "4", "6"], [1, 1, 0, 1, 0], "7")
    assert p.n_tokens <= two_dropped.n_tokens < full.n_tokens
    assert p.history_kept == 3 and p.history_dropped == 2
    assert "Toy Story" not in p.text and "GoldenEye" not in p.text  # the two oldest went
    assert "Four Rooms" in p.text and "Get Shorty" in p.text and "Babe" in p.text
    assert "Movie 7 (1995), Drama" in p.text
    assert p.text == two_dropped.text


def test_too_long_even_without_history_is_a_clear_error(tokenizer, items):
    with pytest.raises(PromptTooLongError, match=r"needs \d+ tokens with an empty history but prompt.max_tokens is 10"):
        render(tokenizer, items, max_tokens=10).render(["1"], [1], "2")


def test_bad_inputs_name_the_problem(tokenizer, items, users):
    with pytest.raises(ConfigError, match="user_template.*exactly once"):
        PromptConfig(user_template="{instruction} {liked}")
    with pytest.raises(ConfigError, match=r"user_template.*unknown field\(s\) \['rating'\]"):
        PromptConfig(user_template="{candidate} {rating}")
    with pytest.raises(ValueError, match=r"prompt.candidate_template uses \['blurb'\] which are not columns"):
        render(tokenizer, items, candidate_template="{text} {blurb}")
    with pytest.raises(ValueError, match="prompt.history_field='name' is not a column"):
        render(tokenizer, items, history_field="name")
    with pytest.raises(ValueError, match=r"profile_template uses \['gender'\]"):
        render(tokenizer, items, users, profile_template="{gender}")
    with pytest.raises(ValueError, match="no users table"):
        render(tokenizer, items, None, profile_template="{age}")
    r = render(tokenizer, items)
    with pytest.raises(KeyError, match="candidate item_id '99'"):
        r.render([], [], "99")
    with pytest.raises(KeyError, match="history item_id '42'"):
        r.render(["42"], [1], "1")
    with pytest.raises(ValueError, match="history_labels has 1"):
        r.render(["1", "2"], [1], "3")


def test_prefix_plus_suffix_tokenises_like_the_whole_text(tokenizer, items, users):
    r = render(tokenizer, items, users, profile_template="Age {age}.\n")
    for cand in ("1", "2", "5", "7"):
        p = r.render(["3", "4"], [1, 0], cand, "u1")
        ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert ids(p.prefix) + ids(p.suffix) == ids(p.text)
        assert p.n_tokens == len(ids(p.text))
