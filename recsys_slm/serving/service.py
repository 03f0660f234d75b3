"""The HTTP layer: :class:`ServiceCore` (request handling, admission, metrics) and :func:`build_app` (FastAPI).

Both are independent of Ray: the Ray Serve deployment builds them inside its replica and routes scoring through
``@serve.batch``; tests build them in-process around a :class:`~recsys_slm.serving.engine.RankingEngine` and call
the app with FastAPI's TestClient.

Error contract: bad input is always a 4xx with an :class:`~recsys_slm.serving.schemas.ErrorResponse` naming the
field — 400 malformed JSON, 413 body too large, 422 invalid or unknown values — never a 5xx. 503 + ``Retry-After``
means overloaded (shed by the admission control); 501 means not built yet (/recommend without a retriever);
500 is reserved for server faults.
"""


import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from recsys_slm import __version__
from recsys_slm.serving.admission import AdmissionController, Decision
from recsys_slm.serving.engine import JobResult, RankingEngine, RequestError, ScoreJob, TextItem
from recsys_slm.serving.metrics import ServingMetrics
from recsys_slm.serving.schemas import (
    ErrorResponse,
    FieldError,
    Health,
    RankResponse,
    RecommendedItem,
    RecommendResponse,
    field_errors,
    request_models,
)


class Overloaded(Exception):
    """The admission control shed the request (→ 503 + Retry-After)."""

    def __init__(self, decision: Decision):
        self.decision = decision
        super().__init__(decision.reason or "overloaded")


class NotBuilt(Exception):
    """An endpoint whose backing component does not exist yet (→ 501)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class ServiceCore:
    """Request handling shared by the Ray deployment and in-process tests.

    Args:
        engine (RankingEngine): loaded and profiled (``engine.selected`` set).
        score_fn: ``async (ScoreJob) -> JobResult``, e.g. a ``@serve.batch`` method that calls
            :meth:`run_batch`; None = score each request alone via :meth:`run_batch`.
    """

    def __init__(self, engine: RankingEngine, score_fn: Callable[[ScoreJob], Awaitable[JobResult]] | None = None):
        self.engine = engine
        self.cfg = cfg = engine.cfg
        self.models = request_models(cfg.limits)
        self.metrics = ServingMetrics(list(engine.variants), engine.selected)
        costs = {r["name"]: float(r["ms_per_candidate"]) for r in engine.profile_rows}
        self.admission = AdmissionController(
            cfg.overload, cfg.slo.p99_ms, cfg.batching.batch_wait_timeout_s * 1000, engine.selected,
            engine.degrade_variant, costs,
        )  # fmt: skip
        for name, cost in costs.items():
            self.metrics.ms_per_candidate.labels(name).set(cost)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-score")
        self._retrieve_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-retrieve")
        self._score_fn = score_fn
        self.started = time.time()

    # ------------------------------------------------------------------------------------------- scoring
    async def run_batch(self, jobs: list[ScoreJob]) -> list[JobResult]:
        """Score a batch in the scoring thread (the event loop stays free to admit, shed and answer health)."""
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_candidates.observe(sum(j.n_scored for j in jobs))
        loop = asyncio.get_running_loop()
        results, timings = await loop.run_in_executor(self._pool, self.engine.score_jobs, jobs)
        for variant, (candidates, seconds) in timings.items():
            self.admission.observe(variant, candidates, seconds)
            self.metrics.batch_seconds.labels(variant).observe(seconds)
            self.metrics.ms_per_candidate.labels(variant).set(self.admission.cost[variant])
        return results

    async def _score(self, job: ScoreJob) -> JobResult:
        if self._score_fn is not None:
            return await self._score_fn(job)
        return (await self.run_batch([job]))[0]

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.admission.pending_requests)
        self.metrics.queue_ms.set(self.admission.pending_ms)

    async def _admit_and_score(self, resolved) -> tuple[Decision, JobResult]:
        decision = self.admission.admit(len(resolved.candidates))
        self._gauges()
        if not decision.accepted:
            raise Overloaded(decision)
        try:
            result = await self._score(ScoreJob(resolved, decision.variant, decision.n_scored))
        finally:
            self.admission.release(decision)
            self._gauges()
        if result.error is not None:
            raise result.error
        self.metrics.variant_requests.labels(decision.variant, str(decision.degraded).lower()).inc()
        return decision, result

    async def rank(self, req: Any) -> RankResponse:
        """Resolve, admit (or degrade / shed), score and order one request.

        Raises:
            RequestError: bad input (4xx).
            Overloaded: shed (503).
        """
        start = time.perf_counter()
        resolved = self.engine.resolve(req)
        decision, result = await self._admit_and_score(resolved)
        n = len(resolved.candidates)
        logits = result.logits
        missing = [None] * (n - len(logits))
        return RankResponse(
            scores=[float(p) for p in _sigmoid(logits)] + missing,
            logits=[float(x) for x in logits] + missing,
            order=sorted(range(len(logits)), key=lambda i: (-logits[i], i)) + list(range(len(logits), n)),
            variant=decision.variant,
            latency_ms=round((time.perf_counter() - start) * 1000, 3),
            degraded=decision.degraded,
            degrade_reason=decision.reason if decision.degraded else None,
            candidates_scored=len(logits),
            history_used=result.history_used,
        )

    async def recommend(self, req: Any) -> RecommendResponse:
        """Retrieve ``k`` unseen items with the retriever, score them with the ranker, return the best ``n``.

        Raises:
            RequestError: bad input, or history given as free text (the retriever reads catalogue items only).
            NotBuilt: the config has no ``retriever`` section (501).
            Overloaded: shed (503).
        """
        start = time.perf_counter()
        resolved = self.engine.resolve(req)  # bad input is a 4xx even where /recommend is not configured
        rec = self.engine.recommender
        if rec is None:
            raise NotBuilt(
                "/recommend is not configured on this service: add a `retriever:` section (encoder + FAISS index, "
                "see docs/serving.md) to the serving config; meanwhile score your own candidates with POST /rank"
            )
        texts = [i for i, h in enumerate(resolved.history) if isinstance(h, TextItem)]
        if texts:
            raise RequestError([FieldError(field=f"history[{i}].text", message="/recommend needs catalogue items "
                                           "(item_id) in history: the retriever encodes their titles",
                                           type="unsupported") for i in texts])  # fmt: skip
        exclude: set[str] = set()
        if rec.cfg.exclude_seen:
            exclude = set(resolved.history) | self.engine.seen.get(req.user_id or "", set())
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        profile_user = req.user_id if req.user_id in self.engine.profile_users else None
        ids, sims = await loop.run_in_executor(
            self._retrieve_pool, rec.retrieve, list(resolved.history), list(resolved.labels), profile_user, req.k,
            exclude,
        )  # fmt: skip
        retrieve_ms = (time.perf_counter() - t0) * 1000
        if not ids:
            return RecommendResponse(items=[], variant=self.engine.selected or "", retrieve_ms=round(retrieve_ms, 3),
                                     latency_ms=round((time.perf_counter() - start) * 1000, 3), retrieved=0,
                                     candidates_scored=0, history_used=0)  # fmt: skip
        resolved.candidates = list(ids)
        resolved.fields = [f"retrieved[{i}]" for i in range(len(ids))]
        decision, result = await self._admit_and_score(resolved)
        logits = result.logits
        order = sorted(range(len(logits)), key=lambda i: (-logits[i], i)) + list(range(len(logits), len(ids)))
        probs = _sigmoid(logits)
        items = [
            RecommendedItem(item_id=ids[i], score=float(probs[i]) if i < len(logits) else None,
                            logit=float(logits[i]) if i < len(logits) else None, retrieval_score=sims[i])
            for i in order[: req.n]
        ]  # fmt: skip
        return RecommendResponse(
            items=items, variant=decision.variant, latency_ms=round((time.perf_counter() - start) * 1000, 3),
            retrieve_ms=round(retrieve_ms, 3), retrieved=len(ids), candidates_scored=len(logits),
            history_used=result.history_used, degraded=decision.degraded,
            degrade_reason=decision.reason if decision.degraded else None,
        )  # fmt: skip

    def health(self) -> Health:
        return Health(status="ok", variant=self.engine.selected or "", queue_depth=self.admission.pending_requests,
                      uptime_s=round(time.time() - self.started, 3))  # fmt: skip

    def profile(self) -> dict[str, Any]:
        out = self.engine.describe()
        out["admission"] = {
            "max_queue": self.cfg.overload.max_queue,
            "latency_admission": self.cfg.overload.latency_admission,
            "budget_ms": self.admission.budget_ms,
            "ms_per_candidate_now": {k: round(v, 4) for k, v in self.admission.cost.items()},
            "queue_depth": self.admission.pending_requests,
        }
        out["recommend_available"] = self.engine.recommender is not None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._retrieve_pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------- app
def _error(status: int, code: str, message: str, detail: list[FieldError] | None = None,
           headers: dict[str, str] | None = None):  # fmt: skip
    from fastapi.responses import JSONResponse

    body = ErrorResponse(error=code, message=message, detail=detail or [])
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


class _BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int, on_reject: Callable[[], None]):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            self.on_reject()
            return await _error(413, "payload_too_large", f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def build_app(core: ServiceCore):
    """The FastAPI application of ``core``: /rank, /recommend, /healthz, /metrics, /profile, OpenAPI at
    /openapi.json and /docs."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    RankRequest = core.models["RankRequest"]
    RecommendRequest = core.models["RecommendRequest"]
    metrics = core.metrics
    errors = {
        400: {"model": ErrorResponse, "description": "malformed JSON"},
        413: {"model": ErrorResponse, "description": "body too large"},
        422: {"model": ErrorResponse, "description": "invalid request: `detail` names each bad field"},
    }
    app = FastAPI(
        title="recsys-slm ranking service",
        version=__version__,
        description="LLM ranker behind a latency SLO: dynamic batching, shared-prefix scoring, SLO-driven variant "
        "choice, degradation and load shedding. See docs/serving.md.",
    )

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        endpoint = metrics.endpoint(request.url.path)
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    app.add_middleware(_BodyLimit, limit=core.cfg.limits.max_body_bytes,
                       on_reject=lambda: metrics.rejections.labels("too_large").inc())  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        errs = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errs):
            metrics.rejections.labels("malformed_json").inc()
            where = next((e for e in errs if e.get("type") == "json_invalid"), {})
            ctx = where.get("ctx") or {}
            return _error(400, "malformed_json", f"body is not valid JSON: {ctx.get('error', 'parse error')}",
                          [FieldError(field="body", message="not valid JSON", type="json_invalid")])  # fmt: skip
        metrics.rejections.labels("invalid").inc()
        detail = field_errors(errs)
        return _error(422, "invalid_request", "; ".join(f"{d.field}: {d.message}" for d in detail), detail)

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError):
        metrics.rejections.labels("invalid").inc()
        return _error(exc.status, "invalid_request", str(exc), exc.errors)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded):
        metrics.rejections.labels("overloaded").inc()
        retry = str(exc.decision.retry_after_s)
        return _error(503, "overloaded", f"service overloaded ({exc.decision.reason}); retry after {retry} s",
                      headers={"Retry-After": retry})  # fmt: skip

    @app.exception_handler(NotBuilt)
    async def not_built(_: Request, exc: NotBuilt):
        metrics.rejections.labels("not_implemented").inc()
        return _error(501, "not_implemented", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            metrics.rejections.labels("too_large").inc()
            return _error(413, "payload_too_large", str(exc.detail))
        if exc.status_code == 400:  # FastAPI: "There was an error parsing the body"
            metrics.rejections.labels("malformed_json").inc()
            return _error(400, "malformed_json", str(exc.detail), [FieldError(field="body", message=str(exc.detail))])
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.post("/rank", response_model=RankResponse, responses={
        **errors, 503: {"model": ErrorResponse, "description": "overloaded: retry after `Retry-After` seconds"}})
    async def rank(body: RankRequest) -> RankResponse:  # type: ignore[valid-type]
        """Score and order candidates for one user (see RankRequest / RankResponse)."""
        return await core.rank(body)

    @app.post("/recommend", response_model=RecommendResponse, responses={
        **errors, 501: {"model": ErrorResponse, "description": "no `retriever` in the serving config"},
        503: {"model": ErrorResponse, "description": "overloaded: retry after `Retry-After` seconds"}})
    async def recommend(body: RecommendRequest) -> RecommendResponse:  # type: ignore[valid-type]
        """Retrieve top-k unseen items with the embedding retriever, re-rank with the LLM, return the top n."""
        return await core.recommend(body)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: 200 while the replica serves."""
        return core.health()

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format (see recsys_slm.serving.metrics for the names)."""
        return Response(content=metrics.render(), media_type=metrics.content_type)

    @app.get("/profile")
    async def profile() -> dict:
        """The start-up profile: SLO, per-variant latency and quality, the chosen and the degrade variant."""
        return json.loads(json.dumps(core.profile(), default=str))

    return app

