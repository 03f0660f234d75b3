"""``recsys-slm prune``: one-shot structured pruning of a ranker (layers, heads, MLP neurons, low-rank factors)."""

from __future__ import annotations

import argparse
import json

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    prune = sub.add_parser(
        "prune",
        help="prune attention heads (GQA-aware) and MLP neurons uniformly; report params, speed, val AUC",
        description="Writes OUT (a stock from_pretrained directory with recsys_slm.json holding the before/after "
        "report) atomically. Keys: docs/pruning.md.",
    )
    prune.add_argument("--model", default=None, help="model directory to prune (overrides the config's model)")
    prune.add_argument("--out", default=None, help="output directory (overrides the config's out)")
    add_config_args(prune, "method=magnitude heads_keep=0.5 neurons_keep=0.5")
    prune.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.prune.pruner import PruneConfig, prune

    summary = prune(load_config(PruneConfig, args.config, with_flags(args.overrides, model=args.model, out=args.out)))
    before, after = summary["before"], summary["after"]
    auc = (f", val AUC {before['val_auc']:.4f} -> {after['val_auc']:.4f}" if "val_auc" in after else "")
    low_rank = (summary.get("low_rank") or {}).get("method")
    print(f"pruned ({summary['method']}{' + ' + low_rank if low_rank else ''}) -> {summary['out']}")
    print(f"  non-embedding params {before['non_embedding_params']:,} -> {after['non_embedding_params']:,} "
          f"({summary['non_embedding_param_ratio']:.2%}), forward {summary['forward_speedup']:.2f}x faster{auc}")
    print(f"  widths {_widths(before['widths'])} -> {_widths(after['widths'])}")
    return 0


def _widths(per_layer: list[dict]) -> str:
    """One line: the common widths, or each distinct width with its layer count (non-uniform plans)."""
    distinct = {json.dumps(w, sort_keys=True) for w in per_layer}
    if len(distinct) == 1:
        return f"{len(per_layer)} x {distinct.pop()}"
    counts = {w: sum(json.dumps(x, sort_keys=True) == w for x in per_layer) for w in sorted(distinct)}
    return "; ".join(f"{n} x {w}" for w, n in counts.items())
