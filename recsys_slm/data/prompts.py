"""Prompt rendering for pointwise LLM rankers (TALLRec-style Yes/No preference prompts).

A prompt = the model's own chat template around a user message built from templates in config
(instruction, optional user profile, liked titles, disliked titles, the candidate item's text), followed by the
assistant turn and ``answer_prefix``. The text ends exactly where the verbalizer token (" Yes" / " No") is
read, so the ranker scores the next-token distribution at the last prompt position.

Truncation policy (token budget ``max_tokens``): the oldest history items are dropped first, one at a time,
until the prompt fits; the candidate text, the profile and the fixed wording are never cut. If the prompt
does not fit even with an empty history, :class:`PromptTooLongError` is raised naming both numbers.

References:
    TALLRec (Bao et al., RecSys'23, arXiv 2305.00447) for the liked/disliked prompt and the Yes/No verbalizer.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from recsys_slm.config import check, validate_fields

CANDIDATE_FIELD = "candidate"
_TEMPLATE_FIELDS = {"instruction", "profile", "liked", "disliked", "n_liked", "n_disliked", "n_history", CANDIDATE_FIELD}


class PromptTooLongError(ValueError):
    """The prompt exceeds the token budget even with the whole history dropped."""


@dataclass
class PromptConfig:
    """How a (user, history, candidate) triple becomes a ranker prompt.

    Fields:
        system (str): system message; empty string = no system turn (the chat template may add its default).
        instruction (str): the task wording, inserted as ``{instruction}``.
        user_template (str): the user turn; fields ``{instruction} {profile} {liked} {disliked} {candidate}``
            and the counts of the kept history ``{n_liked} {n_disliked} {n_history}``. ``{candidate}`` must
            appear exactly once (the candidate is never truncated).
        profile_template (str): rendered from the user's attribute columns (e.g. ``{age}``, ``{occupation}``);
            empty string = no profile. Default "".
        history_field (str): items column used for history entries. Default "title".
        candidate_template (str): the candidate's text, formatted from its items row (any column, e.g.
            ``"{text}; {rating_summary}"`` with the train-period statistics ``data prepare`` adds). Default "{text}".
        list_separator (str): between history titles. Default "; ".
        empty_list (str): shown when a history list is empty. Default "none".
        answer_prefix (str): appended after the assistant turn starts. Default "Answer:".
        yes_token (str) / no_token (str): the verbalizer strings; each must be one token. Defaults " Yes" / " No".
        max_tokens (int): token budget for the whole prompt. Default 512.
        use_chat_template (bool): wrap in the tokenizer's chat template (False: plain text). Default True.
    """

    system: str = "You are a movie recommender. Reply with Yes or No."
    instruction: str = "Given the user's preferences, decide whether the user will like the candidate movie. Answer Yes or No."
    user_template: str = (
        "{instruction}\n{profile}Liked: {liked}\nDisliked: {disliked}\nCandidate: {candidate}"
    )
    profile_template: str = ""
    history_field: str = "title"
    candidate_template: str = "{text}"
    list_separator: str = "; "
    empty_list: str = "none"
    answer_prefix: str = "Answer:"
    yes_token: str = " Yes"
    no_token: str = " No"
    max_tokens: int = 512
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        validate_fields(self)
        names = _template_fields(self.user_template)
        unknown = sorted(set(names) - _TEMPLATE_FIELDS)
        check(
            not unknown, "user_template", f"unknown field(s) {unknown}; allowed: {sorted(_TEMPLATE_FIELDS)}"
        )
        check(names.count(CANDIDATE_FIELD) == 1, "user_template", "must contain {candidate} exactly once")
        check(self.max_tokens > 0, "max_tokens", f"must be > 0, got {self.max_tokens}")
        check(self.yes_token != self.no_token, "no_token", "must differ from yes_token")


@dataclass
class RenderedPrompt:
    """One rendered prompt.

    Attributes:
        text (str): the full prompt; the verbalizer token is read right after its last token.
        prefix (str): ``text`` up to the candidate (shared by all candidates of one user and history).
        suffix (str): the candidate text and everything after it; ``prefix + suffix == text``.
        n_tokens (int): ``len(tokens(prefix)) + len(tokens(suffix))``, the ids the ranker scores (no special
            tokens added beyond the chat template's).
        history_kept (int): how many of the most recent history items fit the budget.
        history_dropped (int): how many oldest items were dropped.
    """

    text: str
    prefix: str
    suffix: str
    n_tokens: int
    history_kept: int
    history_dropped: int


class _Strict(dict):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def _template_fields(template: str) -> list[str]:
    """The ``{field}`` names a str.format template uses, in order (repeats kept)."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _check_template_columns(key: str, template: str, table: str, frame: pd.DataFrame, hint: str = "") -> None:
    """Raise ValueError naming ``prompt.<key>`` when ``template`` uses fields that are not columns of ``frame``."""
    missing = sorted(set(_template_fields(template)) - set(frame.columns))
    if missing:
        raise ValueError(
            f"prompt.{key} uses {missing} which are not columns of the {table} table "
            f"(columns: {', '.join(map(str, frame.columns))}){hint}"
        )


class PromptRenderer:
    """Render ranker prompts from item/user tables with a tokenizer's chat template and a token budget.

    Args:
        config (PromptConfig): templates and budget.
        tokenizer: a Hugging Face tokenizer (its chat template is used when ``config.use_chat_template``).
        items (pd.DataFrame): items table (``item_id`` + the columns named by history/candidate fields).
        users (pd.DataFrame | None): users table (``user_id`` + attributes) for ``profile_template``.

    Raises:
        ValueError: a configured column is missing from the items/users table, or the tokenizer has no chat
            template while ``use_chat_template`` is set.
    """

    def __init__(
        self, config: PromptConfig, tokenizer: Any, items: pd.DataFrame, users: pd.DataFrame | None = None
    ):
        self.config = config
        self.tokenizer = tokenizer
        columns = ", ".join(map(str, items.columns))
        if config.history_field not in items.columns:
            raise ValueError(
                f"prompt.history_field={config.history_field!r} is not a column of the items table (columns: {columns})"
            )
        _check_template_columns(
            "candidate_template", config.candidate_template, "items", items,
            "; train-period statistics (stats_*, rating_summary) come from `recsys-slm data prepare`",
        )  # fmt: skip
        ids = items["item_id"].astype(str)
        self._history_text = dict(zip(ids, items[config.history_field].astype(str)))
        self._candidate_text = dict(
            zip(ids, (config.candidate_template.format_map(_Strict(r)) for r in items.to_dict("records")))
        )
        self._users: dict[str, dict[str, Any]] = {}
        if config.profile_template:
            if users is None:
                raise ValueError("prompt.profile_template is set but the data has no users table")
            _check_template_columns("profile_template", config.profile_template, "users", users)
            self._users = {str(r["user_id"]): r for r in users.to_dict("records")}
        if config.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; set prompt.use_chat_template=false to render plain text"
            )

    def _profile(self, user_id: str | None) -> str:
        if not self.config.profile_template:
            return ""
        if user_id is None or str(user_id) not in self._users:
            raise KeyError(
                f"user_id {user_id!r} is not in the users table (needed by prompt.profile_template)"
            )
        return self.config.profile_template.format_map(_Strict(self._users[str(user_id)]))

    def _item(self, table: Mapping[str, str], item_id: str, role: str) -> str:
        try:
            return table[str(item_id)]
        except KeyError:
            raise KeyError(f"{role} item_id {item_id!r} is not in the items table") from None

    def _wrap(self, user_message: str) -> str:
        cfg = self.config
        if not cfg.use_chat_template:
            head = f"{cfg.system}\n\n" if cfg.system else ""
            return f"{head}{user_message}\n{cfg.answer_prefix}"
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": user_message}
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + cfg.answer_prefix

    def _render(
        self, profile: str, history: Sequence[tuple[str, int]], candidate_text: str
    ) -> tuple[str, str]:
        cfg = self.config
        liked = [t for t, y in history if y]
        disliked = [t for t, y in history if not y]
        marker = "\x00CANDIDATE\x00"
        message = cfg.user_template.format(
            instruction=cfg.instruction,
            profile=profile,
            liked=cfg.list_separator.join(liked) or cfg.empty_list,
            disliked=cfg.list_separator.join(disliked) or cfg.empty_list,
            n_liked=len(liked),
            n_disliked=len(disliked),
            n_history=len(history),
            candidate=marker,
        )
        prefix, rest = self._wrap(message).split(marker)
        # Keep a trailing space with the candidate (" Toy Story" is one natural BPE pre-token), so that
        # tokens(prefix) + tokens(suffix) tokenises like the whole text and shared-prefix scoring can reuse it.
        stripped = prefix.rstrip(" ")
        return stripped, prefix[len(stripped) :] + candidate_text + rest

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` as the ranker will see it (chat-template special tokens are in the text)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(
        self,
        history_item_ids: Sequence[str],
        history_labels: Sequence[int],
        candidate_item_id: str,
        user_id: str | None = None,
    ) -> RenderedPrompt:
        """Render one prompt, dropping the oldest history items until it fits ``max_tokens``.

        Args:
            history_item_ids (Sequence[str]): the user's previous items, oldest first, length H.
            history_labels (Sequence[int]): 1 = liked, 0 = disliked, length H.
            candidate_item_id (str): the item to score.
            user_id (str | None): needed when ``profile_template`` is set.

        Raises:
            PromptTooLongError: the prompt exceeds the budget even with no history.
            KeyError: an unknown item or user id.
            ValueError: history ids and labels differ in length.
        """
        if len(history_item_ids) != len(history_labels):
            raise ValueError(
                f"history_item_ids has {len(history_item_ids)} entries but history_labels has {len(history_labels)}"
            )
        profile = self._profile(user_id)
        candidate = self._item(self._candidate_text, candidate_item_id, "candidate")
        history = [
            (self._item(self._history_text, i, "history"), int(y))
            for i, y in zip(history_item_ids, history_labels)
        ]

        def build(keep: int) -> tuple[str, str, int]:
            prefix, suffix = self._render(profile, history[len(history) - keep :], candidate)
            # count exactly what the ranker feeds the model: tokens(prefix) + tokens(suffix)
            return prefix, suffix, self.count_tokens(prefix) + self.count_tokens(suffix)

        budget = self.config.max_tokens
        best = build(len(history))
        kept = len(history)
        if best[2] > budget:
            # Token count grows with the number of kept items, so binary-search the largest k that fits.
            lo, hi = 0, len(history) - 1
            fit = None
            while lo <= hi:
                mid = (lo + hi) // 2
                cand = build(mid)
                if cand[2] <= budget:
                    fit, kept, lo = cand, mid, mid + 1
                else:
                    hi = mid - 1
            if fit is None:
                empty = build(0)[2]
                raise PromptTooLongError(
                    f"prompt needs {empty} tokens with an empty history but prompt.max_tokens is {budget}; "
                    f"the candidate text (item {candidate_item_id!r}) is never cut: raise max_tokens"
                )
            best = fit
        prefix, suffix, n = best
        return RenderedPrompt(prefix + suffix, prefix, suffix, n, kept, len(history) - kept)
