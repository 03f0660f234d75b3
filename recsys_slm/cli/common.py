"""Helpers shared by CLI subcommands: the ``--config FILE key=value ...`` convention."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and trailing ``key=value`` overrides (applied after the file)."""
    parser.add_argument("--config", default=None, help="YAML config file (keys mirror the config dataclass)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides applied after --config, e.g. pointwise.history_len=10 candidates.seed=1",
    )
