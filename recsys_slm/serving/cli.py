"""``recsys-slm serve``: the ranking service on Ray Serve (registered by :mod:`recsys_slm.cli`)."""

from __future__ import annotations

import argparse

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve an LLM ranker over HTTP (Ray Serve): /rank, /recommend, /healthz, /metrics, /profile",
        description="Loads every variant of the config, profiles them on this machine, serves the best-quality "
        "variant whose p99 meets the SLO, and runs until Ctrl-C / SIGTERM. Keys: docs/serving.md.",
    )
    parser.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config's port)")
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1: this machine only)")
    add_config_args(parser, "slo.p99_ms=500 batching.max_batch_size=8")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.serving.config import ServingConfig

    cfg = load_config(ServingConfig, args.config, with_flags(args.overrides, port=args.port, host=args.host))
    from recsys_slm.serving.deployment import serve_forever  # imports Ray

    return serve_forever(cfg)
