"""``recsys-slm teacher train``: fine-tune a causal LM as a pointwise Yes/No ranker (the teacher)."""

from __future__ import annotations

import argparse
import sys

from recsys_slm.cli.common import add_config_args, with_flags


def register(sub: argparse._SubParsersAction) -> None:
    teacher = sub.add_parser("teacher", help="fine-tune a causal LM as a pointwise ranker (the teacher)")
    tsub = teacher.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND", required=True)
    train = tsub.add_parser(
        "train",
        help="fine-tune on the pointwise train split; keep the best validation-AUC weights",
        description="Writes OUT (a from_pretrained model directory with recsys_slm.json and metrics.jsonl) "
        "atomically; while running, OUT.work/ holds a resumable checkpoint: rerun the same command after an "
        "interruption to continue. Config keys: docs/teacher.md.",
    )
    train.add_argument("--out", default=None, help="output model directory (overrides the config's out)")
    add_config_args(train, "lr=5e-5 max_steps=200")
    train.set_defaults(func=run_train)
    score = tsub.add_parser(
        "score",
        help="cache teacher outputs (verbalizer logits + answer-position top-k) for off-policy distillation",
        description="Scores every record of a pointwise task or transfer set and writes OUT (parquet: the input "
        "columns + teacher_logit_yes/no, teacher_score, teacher_p_yes, teacher_topk_ids/logprobs). Finished "
        "chunks are kept in OUT.parts/, so rerunning after an interruption resumes. Keys: docs/distillation.md.",
    )
    score.add_argument("--model", default=None, help="teacher model directory (overrides the config's model)")
    score.add_argument("--task", default=None, help="task / transfer-set parquet (overrides the config's task)")
    score.add_argument("--out", default=None, help="output parquet (overrides the config's out)")
    score.add_argument("--backend", default=None, choices=["local", "ray"],
                       help="local (one process, default) or ray (an actor pool; ray.* keys, docs/ray.md)")  # fmt: skip
    add_config_args(score, "top_k=20 batch_size=16")
    score.set_defaults(func=run_score)


def run_train(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.ranker.train import TeacherTrainConfig

    train_and_print(load_config(TeacherTrainConfig, args.config, with_flags(args.overrides, out=args.out)))
    return 0


def run_score(args: argparse.Namespace) -> int:
    import json

    from recsys_slm.distill.teacher_cache import TeacherScoreConfig, score_task
    from recsys_slm.distributed.config import load_with_backend

    flags = {"model": args.model, "task": args.task, "out": args.out, "backend": args.backend}
    overrides = with_flags(args.overrides, **flags)
    cfg, ray_cfg = load_with_backend(TeacherScoreConfig, args.config, overrides)
    if ray_cfg is None:
        summary = score_task(cfg)
    else:  # backend=ray: output shards scored by a Ray actor pool, same cache format
        from recsys_slm.distributed.score import score_task_ray

        summary = score_task_ray(cfg, ray_cfg)
    auc = summary.get("teacher_auc_labelled")
    print(f"teacher scores -> {summary['out']}")
    print(
        f"  {summary['records']} records ({summary['scored_now']} scored now, {summary['records_per_s']} rec/s), "
        f"top_k {summary['top_k']}, teacher AUC on labelled rows {'n/a' if auc is None else f'{auc:.4f}'}"
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "prompt"}, indent=2))
    return 0


def train_and_print(cfg) -> dict:
    """Train (``train_teacher``), print a one-line summary and return it; on Ctrl-C say how to resume and
    re-raise (``run_guarded`` turns it into exit status 130). Shared by the CLI and ``pipelines/train_teacher``."""
    from recsys_slm.ranker.train import train_teacher, work_dir

    try:
        summary = train_teacher(cfg)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; rerun the same command to resume from the last checkpoint in "
            f"{work_dir(cfg.resolved_out())}",
            file=sys.stderr,
        )
        raise
    auc = summary["best_val_auc"]
    print(f"teacher -> {summary['out']}")
    print(
        f"  steps {summary['steps']}/{summary['planned_steps']}  best val AUC "
        f"{'n/a' if auc is None else f'{auc:.4f}'} (step {summary['best_step']})  "
        f"{summary['s_per_step']:.2f} s/step  train time {summary['train_time_s']:.0f}s"
        + ("  (stopped early)" if summary["stopped_early"] else "")
    )
    return summary
