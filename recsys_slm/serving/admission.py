"""Admission control: a bounded queue that degrades, then sheds, before latency breaks the SLO.

Every admitted /rank request adds its predicted service time (candidates × the variant's current cost per
candidate) to ``pending_ms``; it is removed when the request finishes. Batches run one at a time, so a new
request's latency is predicted as ``pending_ms + own cost + batch wait``. The controller tries, in order:

1. the served variant with all candidates;
2. the degrade variant (a faster one) with all candidates;
3. the served variant, then the degrade variant, with the first ``degrade_max_candidates`` candidates;

and admits the first option whose prediction fits ``headroom × slo.p99_ms``. When none fits it sheds the request
(HTTP 503 + Retry-After), except on an idle server, which always serves (with the cheapest option). Independently
of the prediction, more than ``max_queue`` unfinished requests are never admitted, so the queue is bounded even
if the cost model is wrong. The cost per candidate starts from the start-up profile and follows each finished
batch (exponential moving average), so it tracks the machine's real speed.

With ``latency_admission: false`` only the queue depth decides: from ``degrade_at`` requests on, the cheapest
configured degradation is used, and at ``max_queue`` requests are shed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recsys_slm.serving.config import OverloadConfig


@dataclass
class Decision:
    """The admission outcome of one request."""

    accepted: bool
    variant: str | None = None
    n_scored: int = 0
    cost_ms: float = 0.0
    degraded: bool = False
    reason: str | None = None
    retry_after_s: int = 0


class AdmissionController:
    """See the module docstring.

    Args:
        cfg (OverloadConfig): the policy.
        slo_ms (float): the p99 objective.
        wait_ms (float): the batcher's wait timeout in ms (added to every prediction).
        primary (str): the variant chosen by the SLO logic.
        degrade (str | None): the fallback variant.
        ms_per_candidate (dict[str, float]): initial cost per candidate of each variant.
    """

    def __init__(self, cfg: OverloadConfig, slo_ms: float, wait_ms: float, primary: str, degrade: str | None,
                 ms_per_candidate: dict[str, float]):  # fmt: skip
        self.cfg = cfg
        self.slo_ms = slo_ms
        self.wait_ms = wait_ms
        self.primary = primary
        self.degrade = degrade
        self.cost = dict(ms_per_candidate)
        self.pending_requests = 0
        self.pending_ms = 0.0

    @property
    def budget_ms(self) -> float:
        return self.cfg.headroom * self.slo_ms

    def _options(self, n: int) -> list[tuple[str, int, str | None]]:
        opts: list[tuple[str, int, str | None]] = [(self.primary, n, None)]
        if self.degrade:
            opts.append((self.degrade, n, "variant"))
        cap = self.cfg.degrade_max_candidates
        if cap is not None and cap < n:
            opts.append((self.primary, cap, "candidates"))
            if self.degrade:
                opts.append((self.degrade, cap, "variant+candidates"))
        return opts

    def _accept(self, variant: str, n: int, reason: str | None) -> Decision:
        cost = n * self.cost.get(variant, 0.0)
        self.pending_requests += 1
        self.pending_ms += cost
        return Decision(True, variant, n, cost, reason is not None, reason)

    def _shed(self, why: str) -> Decision:
        retry = max(self.cfg.retry_after_s, math.ceil(self.pending_ms / 1000.0))
        return Decision(False, reason=why, retry_after_s=retry)

    def admit(self, n_candidates: int) -> Decision:
        """Decide for a request of ``n_candidates``; an accepted decision must be :meth:`release`-d exactly once."""
        if self.pending_requests >= self.cfg.max_queue:
            return self._shed("queue full")
        options = self._options(n_candidates)
        if not self.cfg.latency_admission:
            threshold = self.cfg.degrade_at if self.cfg.degrade_at is not None else max(1, self.cfg.max_queue // 2)
            if self.pending_requests >= threshold and len(options) > 1:
                return self._accept(*min(options[1:], key=lambda o: o[1] * self.cost.get(o[0], 0.0)))
            return self._accept(*options[0])
        for variant, n, reason in options:
            if self.pending_ms + n * self.cost.get(variant, 0.0) + self.wait_ms <= self.budget_ms:
                return self._accept(variant, n, reason)
        if self.pending_requests == 0:  # an idle server always serves, as cheaply as it can
            return self._accept(*min(options, key=lambda o: o[1] * self.cost.get(o[0], 0.0)))
        return self._shed("predicted latency above the SLO")

    def release(self, decision: Decision) -> None:
        """The request of an accepted ``decision`` finished (answered, failed or cancelled)."""
        if decision.accepted:
            self.pending_requests = max(0, self.pending_requests - 1)
            self.pending_ms = max(0.0, self.pending_ms - decision.cost_ms)
            if self.pending_requests == 0:
                self.pending_ms = 0.0  # no drift from float rounding

    def observe(self, variant: str, candidates: int, seconds: float) -> None:
        """A batch of ``variant`` scored ``candidates`` in ``seconds``: update its cost per candidate."""
        if candidates <= 0:
            return
        ms = seconds * 1000.0 / candidates
        old = self.cost.get(variant)
        a = self.cfg.ewma_alpha
        self.cost[variant] = ms if old is None else (1 - a) * old + a * ms
