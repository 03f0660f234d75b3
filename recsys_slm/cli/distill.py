"""``recsys-slm distill``: train a smaller student ranker from a teacher (stages 1 and 3)."""

from __future__ import annotations

import argparse
import sys

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser(
        "distill",
        help="distil a teacher ranker into a smaller student (soft/hard labels, token-level, cross-tokenizer)",
        description="Writes OUT (a from_pretrained model directory with recsys_slm.json and metrics.jsonl) "
        "atomically; OUT.work/ holds a resumable checkpoint while it runs: rerun the same command after an "
        "interruption to continue. Config keys: docs/distillation.md.",
    )
    distill.add_argument("--out", default=None, help="output model directory (overrides the config's out)")
    distill.add_argument("--backend", default=None, choices=["local", "ray"],
                         help="local (one process, default) or ray (Ray Train workers; ray.* keys, docs/ray.md)")  # fmt: skip
    add_config_args(distill, "objective.loss=binary_kl student.num_layers=10")
    distill.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from recsys_slm.distill.trainer import DistillConfig
    from recsys_slm.distributed.config import load_with_backend

    flags = with_flags(args.overrides, out=args.out, backend=args.backend)
    distill_and_print(*load_with_backend(DistillConfig, args.config, flags))
    return 0


def distill_and_print(cfg, ray_cfg=None) -> dict:
    """Run ``distill``, print a summary and return it; on Ctrl-C say how to resume and re-raise."""
    from recsys_slm.distill.trainer import distill
    from recsys_slm.training.loop import work_dir

    try:
        if ray_cfg is None:
            summary = distill(cfg)
        else:  # backend=ray: the same training function in Ray Train workers
            from recsys_slm.distributed.train import distill_ray

            summary = distill_ray(cfg, ray_cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume from {work_dir(cfg.resolved_out())}", file=sys.stderr)
        raise

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"student -> {summary['out']}")
    print(
        f"  {summary['student_params'] / 1e6:.1f}M params, {summary['steps']}/{summary['planned_steps']} steps, "
        f"best val AUC {fmt(summary['best_val_auc'])} (step {summary['best_step']}), test AUC "
        f"{fmt(summary.get('test_auc'))}, {summary['s_per_step']:.2f} s/step"
    )
    if "ray" in summary:
        r = summary["ray"]
        print(f"  ray: {r['workers']} workers ({r['address']}), {r['samples_per_s']} samples/s, "
              f"start-up {r['startup_s']} s")
    return summary
