"""Compress a ranker teacher: distill → prune → re-distill, ablations, evaluation and the report.

    python -m pipelines.compress --config pipelines/configs/compress/quick.yaml [key=value ...]

The same job as ``recsys-slm compress`` (which also takes ``--out`` and ``--from-stage``; here they are the
overrides ``out=DIR`` and ``from_stage=NAME``). Presets: ``quick.yaml`` (≈ 12 min on a 2-core CPU, a smoke signal),
``full.yaml`` (the headline, hours on CPU), ``large.yaml`` (Qwen2.5-Coder-0.5B teacher, cross-tokenizer). Writes
``out/01_distill``, ``out/02_prune``, ``out/03_redistill``, ``out/ablations/*``, ``out/eval/*`` and
``out/report.{json,md}`` + ``quality_vs_cost.png``; a rerun skips completed stages and resumes a killed one. See
``docs/compress.md``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from recsys_slm.cli.common import add_config_args, run_guarded


def main(cfg, from_stage: str | None = None) -> dict[str, Any]:
    """Run the pipeline, print the per-model table and return the report."""
    from recsys_slm.cli.compress import compress_and_print

    return compress_and_print(cfg, from_stage)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_config_args(parser, "teacher=runs/teacher out=runs/compress/quick from_stage=03_redistill")
    args = parser.parse_args(argv)

    def run() -> int:
        from recsys_slm.compress.config import CompressConfig
        from recsys_slm.config import load_config

        overrides = [o for o in args.overrides if not o.startswith("from_stage=")]
        from_stage = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("from_stage=")), None)
        main(load_config(CompressConfig, args.config, overrides), from_stage or None)
        return 0

    return run_guarded(run, parser.prog)


if __name__ == "__main__":
    sys.exit(cli())
