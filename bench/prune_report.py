"""Collect ``recsys-slm prune`` outputs into one report (one row per importance method).

    python -m bench.prune_report --run magnitude=runs/prune/magnitude --run activation=runs/prune/activation \\
        --out docs/results/prune_movielens

Each row: method, non-embedding parameters before/after, widths, validation AUC before/after pruning (no
retraining), and the forward speedup measured in the pruning run itself; plus the resolved config. Writes
``OUT/report.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from recsys_slm.model_dir import read_manifest, write_json_atomic

    rows = []
    for spec in args.run:
        name, _, path = spec.partition("=")
        manifest = read_manifest(path)
        if manifest is None or manifest.get("stage") != "prune":
            raise SystemExit(f"{path}: not a `recsys-slm prune` output")
        m, c = manifest["metrics"], manifest["config"]
        low_rank = (c.get("low_rank") or {}).get("method", "none")
        rows.append({
            # a run that keeps every head and neuron (low-rank only) has no width importance to speak of
            "name": name, "dir": path, "low_rank": low_rank,
            "method": m["method"] if m["before"]["widths"] != m["after"]["widths"] else "none (widths kept)",
            "uniform": c.get("uniform", True), "model_type": m.get("model_type", "llama"),
            "non_embedding_params_before": m["before"]["non_embedding_params"],
            "non_embedding_params_after": m["after"]["non_embedding_params"],
            "non_embedding_param_ratio": m["non_embedding_param_ratio"],
            "widths_before": m["before"]["widths"], "widths_after": m["after"]["widths"],
            "val_auc_before": m["before"].get("val_auc"), "val_auc_after": m["after"].get("val_auc"),
            "val_records": m["val_records"], "forward_speedup": m["forward_speedup"],
            "removed_layers": m.get("removed_layers", []),
            "s_per_prompt_before": m["before"]["s_per_prompt"], "s_per_prompt_after": m["after"]["s_per_prompt"],
            "device": m["device"], "config": manifest["config"], "code_version": manifest.get("code_version"),
        })  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out) / "report.json", {"runs": rows})
    print("| run | width importance | low-rank | uniform | layers removed | non-emb. params before → after | ratio | val AUC before → after | forward speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['method']} | {r['low_rank']} | {r['uniform']} | {len(r['removed_layers'])} | {r['non_embedding_params_before'] / 1e6:.1f}M → {r['non_embedding_params_after'] / 1e6:.1f}M "
              f"| {r['non_embedding_param_ratio']:.1%} | {r['val_auc_before']:.4f} → {r['val_auc_after']:.4f} "
              f"| {r['forward_speedup']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
