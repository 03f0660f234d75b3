"""The scoring engine behind the service: variants, request resolution, batched shared-prefix scoring, profiling.

Nothing here imports Ray; the Ray Serve deployment (:mod:`recsys_slm.serving.deployment`) and the tests drive
the same :class:`RankingEngine`.

Shared-prefix scoring across requests (:func:`score_prefix_groups`): every request's prompt splits into a prefix
(system turn, profile, history: the same for all its candidates) and one suffix per candidate. One forward runs
up to ``prefix_batch_size`` prefixes together, right-padded, and keeps their KV cache; then each forward of up to
``suffix_batch_size`` candidate suffixes (from any of those requests) attends to a row-gathered copy of that
cache. Each suffix row's attention mask is its prefix's real tokens (the padding after a shorter prefix is masked
out) followed by its own tokens, and its position ids continue from its own prefix length, so the result equals
scoring ``prefix + suffix`` alone (pinned in tests/unit/test_serving_engine.py to 1e-4). Only the final hidden
state of the last real token meets the two verbalizer rows of the output embedding: no generation, no
full-vocabulary logits.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_slm.config import ConfigError, config_to_dict
from recsys_slm.data.prompts import (
    PromptConfig,
    PromptRenderer,
    PromptTooLongError,
    _Strict,
    _template_fields,
)
from recsys_slm.ranker.verbalizer import VerbalizerScorer
from recsys_slm.serving.config import ServingConfig
from recsys_slm.serving.schemas import FieldError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- scoring
def _cache_of(out: Any):
    return out.cache if "cache" in out else out.past_key_values


@torch.inference_mode()
def score_prefix_groups(
    scorer: VerbalizerScorer,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    prefix_batch_size: int = 8,
    suffix_batch_size: int = 32,
) -> list[torch.Tensor]:
    """Score ``prefix_g + suffix_gi`` for every group g and suffix i, running each prefix once (see module doc).

    Args:
        scorer (VerbalizerScorer): model, pad id and verbalizer rows.
        groups: ``(prefix_ids, [suffix_ids, ...])`` pairs; prefixes and suffixes non-empty.
        prefix_batch_size (int): prefixes per prefix forward.
        suffix_batch_size (int): suffixes per suffix forward.

    Returns:
        list[torch.Tensor]: per group, an (n_g, 2) float32 CPU tensor of [logit_yes, logit_no].
    """
    base = scorer.model.base_model
    device = scorer.device
    out: list[torch.Tensor] = []
    for g0 in range(0, len(groups), prefix_batch_size):
        chunk = groups[g0 : g0 + prefix_batch_size]
        if any(len(p) == 0 for p, _ in chunk) or any(len(s) == 0 for _, sufs in chunk for s in sufs):
            raise ValueError("shared-prefix scoring needs non-empty prefixes and suffixes")
        lens = torch.as_tensor([len(p) for p, _ in chunk], dtype=torch.long)
        width = int(lens.max())
        ids = torch.full((len(chunk), width), scorer.pad_id, dtype=torch.long)
        pmask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (prefix, _) in enumerate(chunk):
            ids[r, : len(prefix)] = torch.as_tensor(list(prefix), dtype=torch.long)
            pmask[r, : len(prefix)] = 1
        positions = torch.arange(width).unsqueeze(0).expand(len(chunk), -1)
        cache = _cache_of(
            base(input_ids=ids.to(device), attention_mask=pmask.to(device), position_ids=positions.to(device),
                 use_cache=True)
        )  # fmt: skip
        flat = [(r, s) for r, (_, sufs) in enumerate(chunk) for s in sufs]
        logits = []
        for c0 in range(0, len(flat), suffix_batch_size):
            part = flat[c0 : c0 + suffix_batch_size]
            batch, swidth = len(part), max(len(s) for _, s in part)
            rows = torch.as_tensor([r for r, _ in part], dtype=torch.long)
            sids = torch.full((batch, swidth), scorer.pad_id, dtype=torch.long)
            smask = torch.zeros((batch, swidth), dtype=torch.long)
            for b, (_, s) in enumerate(part):
                sids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
                smask[b, : len(s)] = 1
            gathered = copy.deepcopy(cache)  # forward() appends to a cache: each suffix batch gets its own
            gathered.batch_select_indices(rows.to(device))
            mask = torch.cat([pmask[rows], smask], dim=1)
            spos = lens[rows].unsqueeze(1) + torch.arange(swidth).unsqueeze(0)
            hidden = base(
                input_ids=sids.to(device), attention_mask=mask.to(device), position_ids=spos.to(device),
                cache=gathered, use_cache=True,
            ).last_hidden_state  # fmt: skip
            last = torch.as_tensor([len(s) - 1 for _, s in part], device=device)
            logits.append(scorer.verbalizer_logits(hidden[torch.arange(batch, device=device), last]).cpu())
        flat_logits = torch.cat(logits) if logits else torch.empty((0, 2))
        start = 0
        for _, sufs in chunk:
            out.append(flat_logits[start : start + len(sufs)])
            start += len(sufs)
    return out


# ------------------------------------------------------------------------------------------------ rendering
class TextItem(str):
    """A history entry or candidate given as free text: rendered verbatim instead of looked up by id."""


@dataclass(frozen=True)
class GivenProfile:
    """User attributes sent with a request; they fill the prompt's profile template."""

    attributes: tuple[tuple[str, str], ...]


class ServingRenderer(PromptRenderer):
    """:class:`PromptRenderer` that also renders free-text items (:class:`TextItem`) and request-supplied
    profiles (:class:`GivenProfile` passed as the user id); everything else, truncation included, is the
    renderer the models were trained with."""

    def _item(self, table, item_id, role):  # noqa: D102
        if isinstance(item_id, TextItem):
            return str(item_id)
        return super()._item(table, item_id, role)

    def _profile(self, user_id):  # noqa: D102
        if isinstance(user_id, GivenProfile):
            if not self.config.profile_template:
                return ""
            return self.config.profile_template.format_map(_Strict(dict(user_id.attributes)))
        return super()._profile(user_id)


class RequestError(Exception):
    """A request that cannot be served as sent (→ HTTP 4xx). ``errors`` name the offending fields."""

    def __init__(self, errors: list[FieldError] | FieldError, status: int = 422):
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        self.status = status
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))


@dataclass
class ResolvedRequest:
    """A validated request in the engine's terms (variant independent).

    Attributes:
        history (list): item ids (str) or :class:`TextItem`, oldest first, non-empty.
        labels (list[int]): 1 = liked, aligned with ``history``.
        user (str | GivenProfile | None): what the renderer receives as the user id (profile source).
        candidates (list): item ids or :class:`TextItem`.
        fields (list[str]): the request field of each candidate (for error messages).
    """

    history: list
    labels: list[int]
    user: Any
    candidates: list
    fields: list[str] = field(default_factory=list)


@dataclass
class ScoreJob:
    """One request to score with one variant: the first ``n_scored`` candidates."""

    request: ResolvedRequest
    variant: str
    n_scored: int


@dataclass
class JobResult:
    """Per job: ``logits`` (n_scored,) float64 logit_yes − logit_no and ``history_used``, or ``error``."""

    logits: np.ndarray | None = None
    history_used: int = 0
    error: RequestError | None = None


# ------------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    name: str
    spec: str
    model: Any
    tokenizer: Any
    renderer: ServingRenderer
    scorer: VerbalizerScorer
    prompt: PromptConfig
    manifest: dict | None
    params: int
    quality: float | None = None
    quality_metric: str | None = None


def _metric(manifest: dict | None, key: str) -> float | None:
    node: Any = (manifest or {}).get("metrics") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def assign_quality(variants: Sequence[Variant], overrides: dict[str, float | None], keys: Sequence[str]) -> None:
    """Set each variant's ``quality``/``quality_metric``: the config override, else the first of ``keys`` that
    every non-overridden variant's manifest has (so all compare on one figure), else its own first available key."""
    pending = [v for v in variants if overrides.get(v.name) is None]
    common = next((k for k in keys if pending and all(_metric(v.manifest, k) is not None for v in pending)), None)
    for v in variants:
        if overrides.get(v.name) is not None:
            v.quality, v.quality_metric = float(overrides[v.name]), "config"
            continue
        key = common or next((k for k in keys if _metric(v.manifest, k) is not None), None)
        v.quality, v.quality_metric = (_metric(v.manifest, key), key) if key else (None, None)


def choose_variant(rows: Sequence[dict], on_miss: str = "fastest") -> tuple[str, str]:
    """The SLO choice: the best-quality variant whose measured p99 meets the SLO.

    Args:
        rows: per variant ``name``, ``quality`` (None = unknown, ranks last), ``p99_ms`` (None = not profiled),
            ``meets_slo`` (bool | None), in config order (earlier wins ties).
        on_miss: "fastest" (serve the lowest p99 when none meets the SLO) or "error".

    Returns:
        (name, reason).

    Raises:
        ConfigError: no variant meets the SLO and ``on_miss`` is "error".
    """

    def quality_key(r: dict) -> tuple:
        return (r["quality"] is not None, r["quality"] if r["quality"] is not None else 0.0)

    order = {r["name"]: i for i, r in enumerate(rows)}
    if all(r.get("p99_ms") is None for r in rows):
        best = max(rows, key=lambda r: (*quality_key(r), -order[r["name"]]))
        return best["name"], "profiling disabled: best quality"
    ok = [r for r in rows if r.get("meets_slo")]
    if ok:
        best = max(ok, key=lambda r: (*quality_key(r), -r["p99_ms"], -order[r["name"]]))
        return best["name"], "best quality among the variants whose p99 meets the SLO"
    if on_miss == "error":
        raise ConfigError(
            "no variant meets the latency SLO: "
            + ", ".join(f"{r['name']} p99 {r['p99_ms']:.0f} ms" for r in rows)
            + " (raise slo.p99_ms, lower slo.concurrency / slo.candidates, or set slo.on_miss: fastest)"
        )
    fastest = min(rows, key=lambda r: (r["p99_ms"], order[r["name"]]))
    return fastest["name"], "no variant meets the SLO: serving the fastest"


# --------------------------------------------------------------------------------------------------- engine
class RankingEngine:
    """Loads the data and every variant of a :class:`ServingConfig`; resolves, scores and profiles requests.

    Args:
        cfg (ServingConfig): the service config (paths already checked by ``check_servable``).
        load (bool): load data and models now (False: for tests that set attributes themselves).
    """

    def __init__(self, cfg: ServingConfig, load: bool = True):
        self.cfg = cfg
        self.variants: dict[str, Variant] = {}
        self.profile_rows: list[dict] = []
        self.selected: str | None = None
        self.selection_reason = ""
        self.degrade_variant: str | None = None
        self.recommender = None
        if load:
            self._load_data()
            self._load_variants()
            if cfg.retriever is not None:
                from recsys_slm.serving.recommend import Recommender

                self.recommender = Recommender(cfg.retriever, self.log, cfg.like_threshold, cfg.device)

    # ---------------------------------------------------------------------------------------------- loading
    def _load_data(self) -> None:
        from recsys_slm.data.schema import InteractionLog
        from recsys_slm.data.tasks import user_sequences

        log = InteractionLog.load(self.cfg.resolved_data_dir())
        self.log = log
        self.items = log.items
        self.users = log.users
        self.item_ids = set(log.items["item_id"].astype(str))
        placeholder = log.items.get("is_placeholder")
        real = log.items.loc[~placeholder.astype(bool)] if placeholder is not None else log.items
        self.real_item_ids = sorted(real["item_id"].astype(str))
        self.profile_users = set(log.users["user_id"].astype(str)) if log.users is not None else set()
        seq = user_sequences(log, self.cfg.like_threshold)
        self.histories: dict[str, tuple[list[str], list[int]]] = {}
        self.seen: dict[str, set[str]] = {}
        for user, frame in seq.groupby("user_id", sort=False):
            self.seen[str(user)] = set(frame["item_id"].astype(str))
            tail = frame.tail(self.cfg.history_len)
            self.histories[str(user)] = (tail["item_id"].astype(str).tolist(), tail["like"].astype(int).tolist())
        self.user_ids = set(self.histories) | self.profile_users

    def _load_variants(self) -> None:
        from recsys_slm.evaluation.ranker_eval import resolve_prompt
        from recsys_slm.model_dir import read_manifest
        from recsys_slm.models.loading import load_causal_lm, resolve_model_path

        prompts = {}
        for vc in self.cfg.variants:
            start = time.perf_counter()
            path = resolve_model_path(vc.model)
            manifest = read_manifest(path) if isinstance(path, Path) else None
            prompt, _ = resolve_prompt(self.cfg.prompt, manifest)
            model, tokenizer = load_causal_lm(
                path, device=self.cfg.device, dtype=None if vc.dtype == "auto" else vc.dtype
            )
            model.eval()
            renderer = ServingRenderer(prompt, tokenizer, self.items, self.users)
            scorer = VerbalizerScorer(model, tokenizer, prompt.yes_token, prompt.no_token,
                                      batch_size=self.cfg.batching.suffix_batch_size)  # fmt: skip
            self.variants[vc.name] = Variant(
                vc.name, vc.model, model, tokenizer, renderer, scorer, prompt, manifest,
                int(sum(p.numel() for p in model.parameters())),
            )  # fmt: skip
            prompts[vc.name] = config_to_dict(prompt)
            logger.info("variant %s loaded from %s in %.1f s", vc.name, path, time.perf_counter() - start)
        first = next(iter(prompts))
        differ = [n for n, p in prompts.items() if p != prompts[first]]
        if differ:
            raise ConfigError(
                f"variants {first!r} and {differ[0]!r} resolve to different prompts (from their manifests or the "
                "config); one service serves one prompt: set `prompt:` in the serving config explicitly"
            )
        assign_quality(list(self.variants.values()), {v.name: v.quality for v in self.cfg.variants},
                       self.cfg.quality_metrics)  # fmt: skip
        self._forbidden = sorted(
            {t for v in self.variants.values() for t in self._special_tokens(v.tokenizer) if t}, key=len, reverse=True
        )

    @staticmethod
    def _special_tokens(tokenizer) -> set[str]:
        tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
        try:
            tokens |= {t for t in tokenizer.get_added_vocab() if len(t) > 1}
        except Exception:  # noqa: BLE001 - a tokenizer without added vocab
            pass
        return tokens

    @property
    def prompt(self) -> PromptConfig:
        return next(iter(self.variants.values())).prompt

    # ------------------------------------------------------------------------------------------- resolution
    def _check_text(self, text: str, where: str, errors: list[FieldError]) -> None:
        for token in getattr(self, "_forbidden", []):
            if token in text:
                errors.append(FieldError(field=where, message=f"must not contain the model's special token {token!r}",
                                         type="special_token"))  # fmt: skip
                return

    def resolve(self, req: Any) -> ResolvedRequest:
        """A validated RankRequest/RecommendRequest → :class:`ResolvedRequest` (candidates empty for recommend).

        Raises:
            RequestError: unknown user or item ids, a profile that does not fit the prompt's profile template,
                no history to be found, or text carrying a special token; every problem is listed.
        """
        errors: list[FieldError] = []
        template = self.prompt.profile_template
        needed = sorted(set(_template_fields(template))) if template else []
        user_id = req.user_id
        if user_id is not None and user_id not in self.user_ids:
            errors.append(FieldError(field="user_id", message=f"unknown user id {user_id!r}", type="unknown_id"))
        user: Any = user_id
        if req.profile is not None:
            if not template:
                errors.append(FieldError(field="profile", message="this service's prompt has no profile template; "
                                         "remove profile", type="unused_field"))  # fmt: skip
            for key in sorted(set(req.profile) - set(needed)):
                errors.append(FieldError(field=f"profile.{key}", message="not a field of the prompt's profile "
                                         f"template (fields: {', '.join(needed)})", type="unknown_field"))  # fmt: skip
            for key in sorted(set(needed) - set(req.profile)):
                errors.append(FieldError(field=f"profile.{key}", message="required by the prompt's profile template",
                                         type="missing"))  # fmt: skip
            for key, value in req.profile.items():
                if isinstance(value, str):
                    self._check_text(value, f"profile.{key}", errors)
            user = GivenProfile(tuple(sorted((k, str(v)) for k, v in req.profile.items())))
        elif template and (user_id is None or user_id not in self.profile_users):
            if user_id is None or user_id in self.user_ids:
                errors.append(FieldError(
                    field="profile", message="required: the prompt has a profile template "
                    f"(fields: {', '.join(needed)}); give profile or a user_id from the users table", type="missing",
                ))  # fmt: skip
        history: list = []
        labels: list[int] = []
        if req.history is not None:
            for i, entry in enumerate(req.history):
                if entry.item_id is not None:
                    if entry.item_id not in self.item_ids:
                        errors.append(FieldError(field=f"history[{i}].item_id",
                                                 message=f"unknown item id {entry.item_id!r}", type="unknown_id"))  # fmt: skip
                    history.append(entry.item_id)
                else:
                    self._check_text(entry.text, f"history[{i}].text", errors)
                    history.append(TextItem(entry.text))
                labels.append(int(entry.liked))
        elif user_id is not None and user_id in self.user_ids:
            logged = self.histories.get(user_id, ([], []))
            history, labels = list(logged[0]), list(logged[1])
            if not history:
                errors.append(FieldError(field="history", message=f"user {user_id!r} has no logged history; "
                                         "give history", type="empty_history"))  # fmt: skip
        candidates: list = []
        fields: list[str] = []
        for i, cand in enumerate(getattr(req, "candidates", None) or []):
            if cand.item_id is not None:
                if cand.item_id not in self.item_ids:
                    errors.append(FieldError(field=f"candidates[{i}].item_id",
                                             message=f"unknown item id {cand.item_id!r}", type="unknown_id"))  # fmt: skip
                candidates.append(cand.item_id)
                fields.append(f"candidates[{i}].item_id")
            else:
                self._check_text(cand.text, f"candidates[{i}].text", errors)
                candidates.append(TextItem(cand.text))
                fields.append(f"candidates[{i}].text")
        if errors:
            raise RequestError(errors)
        return ResolvedRequest(history, labels, user, candidates, fields)

    # ---------------------------------------------------------------------------------------------- scoring
    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[list[JobResult], dict[str, tuple[int, float]]]:
        """Score a batch of jobs (any mix of variants), one shared-prefix pass per variant.

        Returns:
            (results aligned with ``jobs``, ``{variant: (candidates scored, seconds)}``).
        """
        results: list[JobResult | None] = [None] * len(jobs)
        timings: dict[str, tuple[int, float]] = {}
        by_variant: dict[str, list[int]] = {}
        for j, job in enumerate(jobs):
            by_variant.setdefault(job.variant, []).append(j)
        bcfg = self.cfg.batching
        for name, idxs in by_variant.items():
            start = time.perf_counter()
            v = self.variants[name]
            groups: list[tuple[list[int], list[list[int]]]] = []
            owners: list[tuple[int, list[int]]] = []
            kept: dict[int, int] = {}
            for j in idxs:
                req, n = jobs[j].request, jobs[j].n_scored
                prompts = []
                for i, cand in enumerate(req.candidates[:n]):
                    try:
                        prompts.append(v.renderer.render(req.history, req.labels, cand, req.user))
                    except PromptTooLongError as exc:
                        results[j] = JobResult(error=RequestError(FieldError(
                            field=req.fields[i] if i < len(req.fields) else f"candidates[{i}]",
                            message=f"too long for the model's prompt budget: {exc}", type="too_long")))  # fmt: skip
                        break
                if results[j] is not None:
                    continue
                by_prefix: dict[str, list[int]] = {}
                for i, p in enumerate(prompts):
                    by_prefix.setdefault(p.prefix, []).append(i)
                for prefix, rows in by_prefix.items():
                    prefix_ids = v.tokenizer(prefix, add_special_tokens=False)["input_ids"]
                    suffix_ids = v.tokenizer([prompts[i].suffix for i in rows], add_special_tokens=False)["input_ids"]
                    groups.append((prefix_ids, suffix_ids))
                    owners.append((j, rows))
                kept[j] = min(p.history_kept for p in prompts) if prompts else 0
            logits = score_prefix_groups(v.scorer, groups, bcfg.prefix_batch_size, bcfg.suffix_batch_size)
            arrays = {j: np.zeros(jobs[j].n_scored, dtype=np.float64) for j in kept}
            for (j, rows), out in zip(owners, logits, strict=True):
                arrays[j][rows] = (out[:, 0] - out[:, 1]).double().numpy()
            for j in kept:
                results[j] = JobResult(logits=arrays[j], history_used=kept[j])
            timings[name] = (sum(len(r) for _, r in owners), time.perf_counter() - start)
        return [r if r is not None else JobResult(error=RequestError(FieldError(field="body", message="not scored")))
                for r in results], timings  # fmt: skip

    # -------------------------------------------------------------------------------------------- profiling
    def synthetic_jobs(self, variant: str, count: int, rng: np.random.Generator) -> list[ScoreJob]:
        """``count`` realistic requests: a random user's logged history and ``slo.candidates`` random items."""
        users = sorted(u for u, (h, _) in self.histories.items() if h)
        n = self.cfg.slo.candidates
        jobs = []
        for _ in range(count):
            user = users[int(rng.integers(len(users)))]
            hist, labels = self.histories[user]
            items = rng.choice(self.real_item_ids, size=n, replace=n > len(self.real_item_ids)).tolist()
            who = user if user in self.profile_users or not self.prompt.profile_template else None
            jobs.append(ScoreJob(ResolvedRequest(list(hist), list(labels), who, items), variant, n))
        return jobs

    def profile(self) -> list[dict]:
        """Measure every variant at the SLO's load, then choose the served and the degrade variant.

        Each round scores ``slo.concurrency`` synthetic requests of ``slo.candidates`` candidates as one batch
        (what the dynamic batcher forms when that many requests arrive together); every request of the round
        sees the round's wall time. The SLO check adds ``batching.batch_wait_timeout_s``.
        """
        cfg = self.cfg
        wait_ms = cfg.batching.batch_wait_timeout_s * 1000
        rows = []
        for name, v in self.variants.items():
            row: dict[str, Any] = {
                "name": name, "quality": v.quality, "quality_metric": v.quality_metric, "params": v.params,
                "stage": (v.manifest or {}).get("stage"), "p50_ms": None, "p95_ms": None, "p99_ms": None,
                "requests_per_s": None, "ms_per_candidate": cfg.profile.assumed_ms_per_candidate, "meets_slo": None,
            }  # fmt: skip
            if cfg.profile.enabled:
                rng = np.random.default_rng(cfg.profile.seed)
                seconds = []
                for r in range(cfg.profile.warmup + cfg.profile.rounds):
                    jobs = self.synthetic_jobs(name, cfg.slo.concurrency, rng)
                    start = time.perf_counter()
                    self.score_jobs(jobs)
                    if r >= cfg.profile.warmup:
                        seconds.append(time.perf_counter() - start)
                ms = np.asarray(seconds) * 1000
                p99 = float(np.percentile(ms, 99))
                row.update(
                    p50_ms=round(float(np.percentile(ms, 50)), 2),
                    p95_ms=round(float(np.percentile(ms, 95)), 2),
                    p99_ms=round(p99, 2),
                    requests_per_s=round(cfg.slo.concurrency / float(np.mean(ms) / 1000), 3),
                    ms_per_candidate=round(float(np.median(ms)) / (cfg.slo.concurrency * cfg.slo.candidates), 4),
                    meets_slo=bool(p99 + wait_ms <= cfg.slo.p99_ms),
                )
                logger.info("profiled %s: p50 %.1f ms, p99 %.1f ms", name, row["p50_ms"], p99)
            rows.append(row)
        self.profile_rows = rows
        self.selected, self.selection_reason = choose_variant(rows, cfg.slo.on_miss)
        self.degrade_variant = self._pick_degrade_variant()
        return rows

    def _pick_degrade_variant(self) -> str | None:
        wanted = self.cfg.overload.degrade_variant
        if wanted is None:
            return None
        if wanted != "auto":
            return wanted if wanted != self.selected else None
        rows = {r["name"]: r for r in self.profile_rows}
        cost = {n: r["p99_ms"] if r["p99_ms"] is not None else None for n, r in rows.items()}
        if cost.get(self.selected) is None:
            return None
        faster = [n for n, c in cost.items() if n != self.selected and c is not None and c < cost[self.selected]]
        return min(faster, key=lambda n: cost[n]) if faster else None

    def describe(self) -> dict[str, Any]:
        """What ``GET /profile`` returns: the SLO, per-variant measurements, the choice and the limits."""
        cfg = self.cfg
        return {
            "slo": config_to_dict(cfg.slo),
            "batching": config_to_dict(cfg.batching),
            "profile_config": config_to_dict(cfg.profile),
            "variants": self.profile_rows,
            "selected": self.selected,
            "reason": self.selection_reason,
            "degrade_variant": self.degrade_variant,
            "degrade_max_candidates": cfg.overload.degrade_max_candidates,
            "limits": config_to_dict(cfg.limits),
            "device": str(next(iter(self.variants.values())).scorer.device) if self.variants else None,
            "torch_threads": torch.get_num_threads(),
            "retriever": self.recommender.describe() if self.recommender is not None else None,
        }
