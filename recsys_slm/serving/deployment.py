"""The Ray Serve deployment of the ranking service and the ``recsys-slm serve`` start/stop loop.

One replica holds every variant, profiles them at start (``RankingEngine.profile``), and serves the FastAPI app
of :mod:`recsys_slm.serving.service` through Serve's HTTP proxy. ``@serve.batch`` merges concurrent /rank
requests (batch size and wait from the config; ``max_ongoing_requests`` is raised above both the batch size and the
service's own queue bound, because Ray's default of 5 silently caps batches and would make Ray's router, not the
service, decide what waits). Scoring runs in one worker thread, so the replica's event loop keeps admitting,
shedding and answering /healthz while a batch computes.

This module imports Ray: only the ``serve`` subcommand imports it (``import recsys_slm`` stays Ray-free).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

from ray import serve

from recsys_slm.config import config_to_dict, from_dict
from recsys_slm.serving.config import ServingConfig, check_servable

APP_NAME = "recsys_slm"
logger = logging.getLogger(__name__)


@serve.deployment(name="ranker", graceful_shutdown_timeout_s=5, max_constructor_retry_count=1)
@serve.ingress()
class RankingDeployment:
    """The replica: engine (models, data, profile) + ServiceCore; the app is built after ``__init__``."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        from recsys_slm.serving.engine import RankingEngine
        from recsys_slm.serving.service import ServiceCore

        config = from_dict(ServingConfig, cfg)
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.engine = RankingEngine(config)
        self.engine.profile()
        self.core = ServiceCore(self.engine, score_fn=self.score_batch)
        self.score_batch.set_max_batch_size(config.batching.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        from recsys_slm.serving.service import build_app

        return build_app(self.core)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score_batch(self, jobs: list) -> list:
        return await self.core.run_batch(jobs)


def build_application(cfg: ServingConfig):
    """The bound Serve application for ``cfg`` (replica resources and request caps from the config)."""
    from ray.serve.schema import LoggingConfig

    return RankingDeployment.options(
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        max_ongoing_requests=cfg.ongoing_requests(),
        max_queued_requests=cfg.ongoing_requests(),  # Ray's router queue is bounded too (backstop: 503)
        ray_actor_options={"num_cpus": cfg.num_cpus},
    ).bind(config_to_dict(cfg))


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot bind {host}:{port} ({exc.strerror}); choose another --port") from None


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - localhost URL we built
        return json.loads(resp.read())


def serve_forever(cfg: ServingConfig, out=sys.stdout) -> int:
    """Start Ray + Serve, deploy, print the URL and the variant choice, then serve until SIGINT/SIGTERM.

    Shutdown (also after a failed start): ``serve.shutdown()`` then ``ray.shutdown()``, which stops every process
    this call started. Returns 0.
    """
    import ray
    from ray.serve.schema import LoggingConfig

    check_servable(cfg)
    _check_port_free(cfg.host, cfg.port)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    stop = threading.Event()
    state = {"ready": False}

    def on_signal(signum, _frame):
        stop.set()
        if not state["ready"]:  # still starting (loading / profiling): interrupt the blocking call
            raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, on_signal)
    started = time.perf_counter()
    try:
        ray.init(
            address=cfg.ray_address or "local",
            num_cpus=cfg.ray_num_cpus if cfg.ray_address is None else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        for s in previous:  # ray.init may install its own handlers
            signal.signal(s, on_signal)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no "connecting to existing Serve app" noise
        http = {"host": cfg.host, "port": cfg.port}
        if cfg.request_timeout_s is not None:
            http["request_timeout_s"] = cfg.request_timeout_s
        serve.start(http_options=http, logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"))
        print(f"recsys-slm serve: loading and profiling {len(cfg.variants)} variant(s) ...", file=out, flush=True)
        serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        state["ready"] = True
        base = f"http://{cfg.host}:{cfg.port}"
        profile = _get_json(f"{base}/profile")
        print(f"recsys-slm serve: ready on {base} in {time.perf_counter() - started:.1f} s; serving variant "
              f"{profile['selected']!r} ({profile['reason']}); degrade variant {profile['degrade_variant']!r}",
              file=out, flush=True)  # fmt: skip
        for row in profile["variants"]:
            print(f"  {row['name']}: quality {row['quality']} ({row['quality_metric']}), p50 {row['p50_ms']} ms, "
                  f"p99 {row['p99_ms']} ms, meets SLO {row['meets_slo']}", file=out, flush=True)  # fmt: skip
        print("recsys-slm serve: POST /rank, /recommend; GET /healthz, /metrics, /profile, /docs. Ctrl-C stops.",
              file=out, flush=True)  # fmt: skip
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        state["ready"] = True  # no KeyboardInterrupt inside the shutdown
        print("recsys-slm serve: shutting down ...", file=out, flush=True)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        print("recsys-slm serve: stopped", file=out, flush=True)
    return 0
