"""Helpers shared by CLI subcommands and pipeline recipes: ``--config FILE key=value ...`` and error reporting.

Errors the user can fix (bad config key, invalid data, missing file) print one clear message and exit with
status 2 (config) or 1 (data/runtime), without a traceback; ``RECSYS_SLM_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from recsys_slm.config import ConfigError, load_config

C = TypeVar("C")


def add_config_args(parser: argparse.ArgumentParser, example: str) -> None:
    """Add ``--config FILE`` and trailing ``key=value`` overrides (applied after the file).

    Args:
        parser: the subcommand's parser.
        example (str): one or two overrides that make sense for this subcommand, shown in ``--help``.
    """
    parser.add_argument("--config", default=None, help="YAML config file (keys mirror the config dataclass)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"config overrides applied after --config, e.g. {example}",
    )


def with_flags(overrides: list[str], **flags: Any) -> list[str]:
    """``key=value`` overrides followed by one per command-line flag that was given (flags win over the config
    file and earlier overrides, since later overrides apply last)."""
    return list(overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]


def run_guarded(fn: Callable[[], Any], prog: str = "recsys-slm") -> int:
    """Run ``fn`` and turn user-fixable errors into a one-line message and an exit status."""
    from recsys_slm.data.schema import DataValidationError

    debug = bool(os.environ.get("RECSYS_SLM_DEBUG"))
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        if debug:
            raise
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        if debug:
            raise
        print(f"{prog}: invalid data:\n{exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError, OSError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def run_recipe(config_cls: type[C], main: Callable[[C], Any], doc: str | None, argv: list[str] | None = None,
               example: str = "key=value") -> int:
    """The command line of a pipeline recipe: ``--config FILE key=value ...`` → ``main(config)``.

    Args:
        config_cls: the recipe's config dataclass.
        main: the recipe's ``main(cfg)``.
        doc: the recipe module's docstring (its first paragraph becomes the ``--help`` description).
        argv: arguments (default ``sys.argv[1:]``).
        example: overrides shown in ``--help``.
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    add_config_args(parser, example)
    args = parser.parse_args(argv)
    prog = parser.prog

    def run() -> int:
        main(load_config(config_cls, args.config, args.overrides))
        return 0

    return run_guarded(run, prog)
