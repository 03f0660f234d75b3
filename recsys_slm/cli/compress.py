"""``recsys-slm compress``: distill → prune → re-distill, ablations, evaluation and the report, resumable."""

from __future__ import annotations

import argparse
import sys

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    compress = sub.add_parser(
        "compress",
        help="the three-stage pipeline: distill -> prune -> re-distill, ablations, evaluation, report",
        description="Writes OUT/01_distill, OUT/02_prune, OUT/03_redistill (from_pretrained directories with "
        "recsys_slm.json), OUT/ablations/*, OUT/eval/* and OUT/report.{json,md} + quality_vs_cost.png. Completed "
        "stages with the same config are skipped; rerun the same command after an interruption to resume. "
        "Keys: docs/compress.md.",
    )
    compress.add_argument("--out", default=None, help="run directory (overrides the config's out)")
    compress.add_argument(
        "--from-stage",
        default=None,
        metavar="NAME",
        help="redo this step and every later one: 01_distill, 02_prune, 03_redistill (or distill, prune, "
        "redistill), ablations, eval",
    )
    add_config_args(compress, "teacher=runs/teacher distill.max_steps=50 regrow=0.1")
    compress.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    from recsys_slm.compress.config import CompressConfig
    from recsys_slm.config import load_config

    cfg = load_config(CompressConfig, args.config, with_flags(args.overrides, out=args.out))
    compress_and_print(cfg, args.from_stage)
    return 0


def compress_and_print(cfg, from_stage: str | None = None) -> dict:
    """Run ``compress``, print the per-model table and the final checks, and return the report."""
    from recsys_slm.compress.pipeline import compress
    from recsys_slm.compress.report import text_table

    try:
        report = compress(cfg, from_stage)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume ({cfg.resolved_out()})", file=sys.stderr)
        raise
    print()
    for note in report["notes"]:
        print(f"note: {note}")
    print(text_table(report))
    for check in (report.get("final") or {}).get("checks", []):
        state = "n/a" if check["met"] is None else ("met" if check["met"] else "MISSED")
        value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        print(f"  {check['check']}: {value} ({state})")
    print(f"report -> {cfg.resolved_out()}/report.md")
    return report
