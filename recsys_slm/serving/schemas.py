"""Typed request/response bodies of the ranking service (pydantic v2; FastAPI publishes them as OpenAPI).

Request models are built by :func:`request_models` from the configured :class:`LimitsConfig`, so the OpenAPI
schema states the limits the running service enforces. Every request model is strict (no type coercion:
``"1"`` is not an integer, ``1`` is not a string, ``"true"`` is not a boolean) and forbids unknown fields, so a
typo or an unexpected field (a file or model path, say) is a 422 naming it, never silently ignored. No field
selects a model or a file: the service serves the variants of its config only.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recsys_slm.serving.config import LimitsConfig

# Control characters (C0 except none, DEL, C1) never appear in item or user text; they are refused outright.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _clean_text(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters (newlines, tabs, NUL, ...)")
    if not value.strip():
        raise ValueError(f"{what} must not be blank")
    return value


# ------------------------------------------------------------------------------------------------ responses
class FieldError(BaseModel):
    """One problem with a request: the field (``candidates[3].item_id``, ``body``) and what is wrong."""

    field: str
    message: str
    type: str = "value_error"


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: a short code (``invalid_request``, ``malformed_json``, ``overloaded``,
    ``payload_too_large``, ``not_implemented``, ``internal_error``), a message and per-field details."""

    error: str
    message: str
    detail: list[FieldError] = Field(default_factory=list)


class RankResponse(BaseModel):
    """Scores of one /rank request.

    Attributes:
        scores: P(yes) of each candidate, aligned with the request's ``candidates``; null = not scored (the
            request was degraded to fewer candidates).
        logits: ``logit_yes - logit_no`` of each candidate (the ranking key; P(yes) can saturate), null as above.
        order: candidate indices, best first: scored candidates by logit descending (ties: lower index first),
            then the unscored ones in request order.
        variant: the model variant that scored the request.
        latency_ms: server-side time from admission to response (queueing + batching + scoring).
        degraded: the request was served by a fallback variant or with fewer candidates because of load.
        candidates_scored: how many candidates were scored.
        history_used: history entries that fit the prompt's token budget (the fewest over the candidates).
    """

    scores: list[float | None]
    logits: list[float | None]
    order: list[int]
    variant: str
    latency_ms: float
    degraded: bool = False
    degrade_reason: str | None = None
    candidates_scored: int
    history_used: int


class RecommendedItem(BaseModel):
    """One recommendation: ranker P(yes) and logit (null when the request was degraded to fewer scored
    candidates and this item was not scored) and the retriever's cosine similarity."""

    item_id: str
    score: float | None
    logit: float | None
    retrieval_score: float


class RecommendResponse(BaseModel):
    """Top ``n`` of the ``k`` retrieved items, best first by ranker logit (unscored ones last, in retrieval order)."""

    items: list[RecommendedItem]
    variant: str
    latency_ms: float
    retrieve_ms: float
    retrieved: int
    candidates_scored: int
    history_used: int
    degraded: bool = False
    degrade_reason: str | None = None


class Health(BaseModel):
    status: str
    variant: str
    queue_depth: int
    uptime_s: float


# ------------------------------------------------------------------------------------------------- requests
def request_models(limits: LimitsConfig | None = None) -> dict[str, type[BaseModel]]:
    """The request models under ``limits``: ``{"HistoryEntry", "Candidate", "RankRequest", "RecommendRequest"}``."""
    lim = limits or LimitsConfig()
    Id = Annotated[str, Field(min_length=1, max_length=lim.max_id_chars)]
    Text = Annotated[str, Field(min_length=1, max_length=lim.max_text_chars)]
    ProfileValue = Annotated[str, Field(min_length=1, max_length=lim.max_text_chars)] | Annotated[
        int, Field(ge=-(10**9), le=10**9)
    ] | Annotated[float, Field(ge=-1e9, le=1e9)]

    class _Item(BaseModel):
        model_config = STRICT
        item_id: Id | None = Field(None, description="an item id of the service's catalogue")
        text: Text | None = Field(None, description="free text used verbatim instead of a catalogue item")

        @field_validator("item_id", "text")
        @classmethod
        def _no_control(cls, v: str | None, info: Any) -> str | None:
            return None if v is None else _clean_text(v, info.field_name)

        @model_validator(mode="after")
        def _one_of(self):
            if (self.item_id is None) == (self.text is None):
                raise ValueError("give exactly one of item_id or text")
            return self

    class HistoryEntry(_Item):
        """One past interaction: a catalogue item (``item_id``) or free ``text``, and whether it was liked."""

        liked: bool = Field(description="true = liked, false = disliked")

    class Candidate(_Item):
        """An item to score: a catalogue item (``item_id``) or free ``text``."""

    class _User(BaseModel):
        model_config = STRICT
        user_id: Id | None = Field(
            None, description="a known user: supplies the profile and, when `history` is absent, the history"
        )
        profile: dict[Id, ProfileValue] | None = Field(
            None, max_length=16,
            description="user attributes filling the prompt's profile template (e.g. age, gender, occupation); "
            "overrides the profile looked up from user_id",
        )  # fmt: skip
        history: list[HistoryEntry] | None = Field(
            None, min_length=1, max_length=lim.max_history,
            description="past interactions, oldest first; absent = the user's logged history (needs user_id)",
        )  # fmt: skip

        @field_validator("user_id")
        @classmethod
        def _id_text(cls, v: str | None) -> str | None:
            return None if v is None else _clean_text(v, "user_id")

        @field_validator("profile")
        @classmethod
        def _profile_text(cls, v: dict | None) -> dict | None:
            for key, value in (v or {}).items():
                _clean_text(key, "profile key")
                if isinstance(value, str):
                    _clean_text(value, f"profile.{key}")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"profile.{key} must be finite")
            return v

        @model_validator(mode="after")
        def _who(self):
            if self.user_id is None and self.history is None:
                raise ValueError("user_id or history is required (give user_id, history, or both)")
            return self

    class RankRequest(_User):
        """Score candidates for one user. Example::

            {"user_id": "42", "candidates": [{"item_id": "1"}, {"item_id": "50"}]}
            {"profile": {"age": 24, "gender": "M", "occupation": "technician"},
             "history": [{"item_id": "1", "liked": true}, {"text": "Heat (1995), Action", "liked": false}],
             "candidates": [{"item_id": "50"}, {"text": "Alien (1979), Sci-Fi"}]}
        """

        candidates: list[Candidate] = Field(min_length=1, max_length=lim.max_candidates)

    class RecommendRequest(_User):
        """Recommend ``n`` items for one user: retrieve ``k`` with the embedding retriever, re-rank with the LLM."""

        n: int = Field(min(10, lim.max_recommend, lim.max_candidates), ge=1, le=lim.max_recommend, description="recommendations returned")
        k: int = Field(min(50, lim.max_candidates), ge=1, le=lim.max_candidates,
                       description="candidates retrieved and re-ranked (>= n)")

        @model_validator(mode="after")
        def _n_le_k(self):
            if self.n > self.k:
                raise ValueError(f"n ({self.n}) must be <= k ({self.k})")
            return self

    return {
        "HistoryEntry": HistoryEntry,
        "Candidate": Candidate,
        "RankRequest": RankRequest,
        "RecommendRequest": RecommendRequest,
    }


_UNION_TAG = re.compile(r"^(constrained-\w+|function-\w+\[.*\]|json-or-python\[.*\]|str|int|float|bool)$")


def field_path(loc: tuple | list) -> str:
    """A pydantic/FastAPI error location as a field path: ``("body", "candidates", 0, "item_id")`` →
    ``candidates[0].item_id``; an error about the whole body is ``body``. Union-member tags pydantic adds to a
    location (``constrained-str``, ``function-after[...]``) are dropped."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    parts = [p for p in parts if not (isinstance(p, str) and _UNION_TAG.match(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def field_errors(errors: list[dict]) -> list[FieldError]:
    """Pydantic error dicts → one :class:`FieldError` per field (a union's per-member errors are merged)."""
    merged: dict[str, FieldError] = {}
    for err in errors:
        path = field_path(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if path in merged:
            if msg not in merged[path].message:
                merged[path].message += f"; or: {msg}"
            continue
        merged[path] = FieldError(field=path, message=msg, type=str(err.get("type", "value_error")))
    return list(merged.values())
