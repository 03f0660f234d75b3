"""The ``recsys-slm`` command line. Each subcommand lives in its own module and registers itself here.

Errors the user can fix (bad config key, invalid data, missing file) print one clear message and exit with
status 2 (usage/config) or 1 (data/runtime), without a traceback; ``RECSYS_SLM_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys

from recsys_slm import __version__
from recsys_slm.cli import data as data_cmd
from recsys_slm.cli import eval as eval_cmd
from recsys_slm.cli import models as models_cmd
from recsys_slm.cli import teacher as teacher_cmd
from recsys_slm.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-slm",
        description="Compress LLM rankers and embedding retrievers for recommender systems.",
    )
    parser.add_argument("--version", action="version", version=f"recsys-slm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_cmd.register(sub)
    models_cmd.register(sub)
    teacher_cmd.register(sub)
    eval_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recsys-slm`` console script; returns the exit status."""
    from recsys_slm.data.schema import DataValidationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if os.environ.get("RECSYS_SLM_DEBUG"):
            raise
        print(f"recsys-slm: config error: {exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        if os.environ.get("RECSYS_SLM_DEBUG"):
            raise
        print(f"recsys-slm: invalid data:\n{exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as exc:
        if os.environ.get("RECSYS_SLM_DEBUG"):
            raise
        print(f"recsys-slm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
