"""The ``recsys-slm`` command line. Each subcommand lives in its own module and registers itself here.

Errors the user can fix print one clear message and exit 2 (config) or 1 (data/runtime) without a traceback
(see :func:`recsys_slm.cli.common.run_guarded`); ``RECSYS_SLM_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from recsys_slm import __version__
from recsys_slm.cli import compress as compress_cmd
from recsys_slm.cli import data as data_cmd
from recsys_slm.cli import distill as distill_cmd
from recsys_slm.cli import eval as eval_cmd
from recsys_slm.cli import models as models_cmd
from recsys_slm.cli import prune as prune_cmd
from recsys_slm.cli import retriever as retriever_cmd
from recsys_slm.cli import teacher as teacher_cmd
from recsys_slm.cli.common import run_guarded


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
    distill_cmd.register(sub)
    prune_cmd.register(sub)
    retriever_cmd.register(sub)
    __import__("recsys_slm.serving.cli", fromlist=["register"]).register(sub)  # recsys-slm serve
    compress_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recsys-slm`` console script; returns the exit status."""
    parser = build_parser()
    # argparse stops collecting the trailing KEY=VALUE overrides at the first option after them
    # (`... max_records=512 --backend ray ray.actors=2`) and would reject the rest; take those as overrides too.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.parse_args(argv)  # the standard "unrecognized arguments" error (exit 2)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
