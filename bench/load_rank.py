"""Bounded load generator for the ranking service: throughput and latency percentiles per load level, as JSON.

    # closed loop: C clients, each sends its next request when the previous one is answered
    .venv/bin/python -m bench.load_rank --url http://127.0.0.1:8000 --concurrency 1 4 8 --requests 50 --candidates 50
    # open loop (overload runs): requests arrive at a fixed rate whatever the answers
    .venv/bin/python -m bench.load_rank --rate 2 4 --requests 100 --duration 60 --out run.json

Every level stops by itself after ``--requests`` requests or ``--duration`` seconds, whichever comes first
(requests still in flight at the deadline are awaited up to ``--timeout``). Requests are built from the prepared
data (``--data-dir``): a random known user (``user_id`` only: the server looks up the history) and
``--candidates`` random catalogue items; ``--endpoint recommend`` sends ``{"user_id", "n", "k"}`` instead.

Output (stdout, and ``--out``): ``{"url", "endpoint", "candidates", "levels": [...]}``; per level: ``mode``,
``concurrency`` or ``rate``, ``sent``, ``ok``, ``duration_s``, ``throughput_rps`` (successful requests per
second), ``p50_ms``/``p95_ms``/``p99_ms`` (client-side latency of successful requests; open loop measures from
the scheduled send time, so client-side queueing is not hidden), ``server_p50_ms``/``server_p99_ms`` (the
responses' ``latency_ms``), ``errors_by_status`` (e.g. ``{"503": 12, "timeout": 1}``), ``variants`` (requests
per served variant) and ``degraded``. To compare variants, start the server with one variant each
(``recsys-slm serve --config C 'variants=[{name: student, model: DIR}]'``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_bodies(data_dir: Path, n: int, candidates: int, endpoint: str, seed: int) -> list[dict]:
    """``n`` request bodies over known users with history and real catalogue items (deterministic in ``seed``)."""
    import pandas as pd

    items = pd.read_parquet(data_dir / "items.parquet")
    if "is_placeholder" in items.columns:
        items = items[~items["is_placeholder"].astype(bool)]
    item_ids = items["item_id"].astype(str).to_numpy()
    users = pd.read_parquet(data_dir / "interactions.parquet", columns=["user_id"])["user_id"].astype(str).unique()
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        user = str(users[rng.integers(len(users))])
        if endpoint == "recommend":
            bodies.append({"user_id": user, "n": 10, "k": candidates})
        else:
            chosen = rng.choice(item_ids, size=candidates, replace=candidates > len(item_ids))
            bodies.append({"user_id": user, "candidates": [{"item_id": str(i)} for i in chosen]})
    return bodies


class Recorder:
    """Thread-safe per-level results."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency_ms: list[float] = []
        self.server_ms: list[float] = []
        self.errors: Counter = Counter()
        self.variants: Counter = Counter()
        self.degraded = 0
        self.sent = 0

    def record(self, start: float, response=None, error: str | None = None) -> None:
        elapsed = (time.perf_counter() - start) * 1000
        with self.lock:
            self.sent += 1
            if error is not None:
                self.errors[error] += 1
                return
            if response.status_code != 200:
                self.errors[str(response.status_code)] += 1
                return
            body = response.json()
            self.latency_ms.append(elapsed)
            self.server_ms.append(float(body.get("latency_ms", 0.0)))
            self.variants[body.get("variant", "?")] += 1
            self.degraded += bool(body.get("degraded"))


def _send(session, url: str, body: dict, timeout: float, rec: Recorder, start: float | None = None) -> None:
    import requests

    start = time.perf_counter() if start is None else start
    try:
        rec.record(start, session.post(url, json=body, timeout=timeout))
    except requests.Timeout:
        rec.record(start, error="timeout")
    except requests.ConnectionError:
        rec.record(start, error="connection")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def summarize(rec: Recorder, duration: float, **level) -> dict:
    ok = len(rec.latency_ms)
    return {
        **level,
        "sent": rec.sent,
        "ok": ok,
        "duration_s": round(duration, 3),
        "throughput_rps": round(ok / duration, 3) if duration > 0 else None,
        "p50_ms": _pct(rec.latency_ms, 50),
        "p95_ms": _pct(rec.latency_ms, 95),
        "p99_ms": _pct(rec.latency_ms, 99),
        "server_p50_ms": _pct(rec.server_ms, 50),
        "server_p99_ms": _pct(rec.server_ms, 99),
        "errors_by_status": dict(rec.errors),
        "variants": dict(rec.variants),
        "degraded": rec.degraded,
    }


def closed_loop(url: str, bodies: list[dict], concurrency: int, max_requests: int, duration: float,
                timeout: float) -> dict:  # fmt: skip
    """``concurrency`` clients in a loop until ``max_requests`` are sent or ``duration`` seconds pass."""
    import requests

    rec = Recorder()
    counter = iter(range(max_requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client() -> None:
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                _send(session, url, bodies[i % len(bodies)], timeout, rec)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(rec, time.perf_counter() - start, mode="closed", concurrency=concurrency)


def open_loop(url: str, bodies: list[dict], rate: float, max_requests: int, duration: float, timeout: float,
              max_in_flight: int = 256) -> dict:  # fmt: skip
    """Requests scheduled every ``1/rate`` s (whatever the answers) until ``max_requests`` or ``duration``."""
    import requests

    rec = Recorder()
    local = threading.local()

    def session():
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    def fire(body: dict, due: float) -> None:
        _send(session(), url, body, timeout, rec, start=due)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        for i in range(max_requests):
            due = start + i / rate
            if due - start > duration:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(fire, bodies[i % len(bodies)], due)
    return summarize(rec, time.perf_counter() - start, mode="open", rate=rate)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=["rank", "recommend"], default="rank")
    parser.add_argument("--data-dir", type=Path, default=None, help="default $RECSYS_SLM_HOME/data/movielens-100k")
    parser.add_argument("--candidates", type=int, default=50, help="candidates per /rank request (k for recommend)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8], help="closed-loop levels")
    parser.add_argument("--rate", type=float, nargs="*", default=[], help="open-loop levels (requests/s)")
    parser.add_argument("--requests", type=int, default=50, help="requests per level (upper bound)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per level (upper bound)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded requests before the first level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.duration <= 0 or any(c < 1 for c in args.concurrency) or any(r <= 0 for r in args.rate):
        parser.error("--requests, --duration, --concurrency and --rate must be positive")
    from recsys_slm.model_dir import cache_home

    data_dir = args.data_dir or cache_home() / "data" / "movielens-100k"
    bodies = make_bodies(data_dir, max(args.requests, 1), args.candidates, args.endpoint, args.seed)
    url = f"{args.url.rstrip('/')}/{args.endpoint}"
    if args.warmup:
        closed_loop(url, bodies, 1, args.warmup, args.duration, args.timeout)
    levels = [closed_loop(url, bodies, c, args.requests, args.duration, args.timeout) for c in args.concurrency]
    levels += [open_loop(url, bodies, r, args.requests, args.duration, args.timeout) for r in args.rate]
    report = {"url": args.url, "endpoint": args.endpoint, "candidates": args.candidates, "levels": levels}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
