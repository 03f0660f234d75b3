"""Compare the final metrics of two training outputs (e.g. an uninterrupted run and a killed-and-resumed one).

    python -m bench.compare_runs RUN_A RUN_B [--out FILE] [--tolerance 1e-3]

Prints each shared metric of the two ``recsys_slm.json`` manifests (AUCs, log losses, steps) with the absolute
difference, the largest weight difference between the two ``model.safetensors``, and whether every metric agrees
within the tolerance. Exit status 1 when one does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

METRICS = ("best_val_auc", "best_step", "final_val_auc", "test_auc", "test_logloss", "steps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from recsys_slm.model_dir import read_manifest, write_json_atomic

    a, b = read_manifest(args.run_a)["metrics"], read_manifest(args.run_b)["metrics"]
    rows = {}
    for key in METRICS:
        if a.get(key) is not None and b.get(key) is not None:
            rows[key] = {"a": a[key], "b": b[key], "abs_diff": abs(float(a[key]) - float(b[key]))}
    wa, wb = load_file(str(Path(args.run_a) / "model.safetensors")), load_file(str(Path(args.run_b) / "model.safetensors"))
    max_weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    ok = all(r["abs_diff"] <= args.tolerance for r in rows.values())
    report = {"run_a": args.run_a, "run_b": args.run_b, "tolerance": args.tolerance, "metrics": rows,
              "max_abs_weight_diff": max_weight_diff, "within_tolerance": ok}  # fmt: skip
    for key, r in rows.items():
        print(f"{key:14s} {r['a']!s:>22s} {r['b']!s:>22s}  |diff| {r['abs_diff']:.2e}")
    print(f"max |weight diff| {max_weight_diff:.2e}; within {args.tolerance}: {ok}")
    if args.out:
        write_json_atomic(args.out, report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
