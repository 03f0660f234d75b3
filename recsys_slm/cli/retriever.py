"""``recsys-slm retriever train|distill|prune|candidates`` and ``recsys-slm eval retrieval``.

Heavy imports (torch, sentence-transformers, faiss) happen inside the command functions, so building the parser
stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from recsys_slm.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    """``recsys-slm retriever ...``."""
    rt = sub.add_parser(
        "retriever",
        help="train, distil and use two-tower sentence-transformers retrievers (candidate generation)",
        description="Two-tower retriever over the interaction log. Config keys: docs/retriever.md.",
    )
    rsub = rt.add_subparsers(dest="retriever_command", metavar="SUBCOMMAND", required=True)

    train = rsub.add_parser(
        "train",
        help="fine-tune a sentence encoder on (user text, liked item text) pairs with in-batch negatives",
        description="Writes OUT, a sentence-transformers directory (SentenceTransformer(OUT, truncate_dim=d) loads "
        "it) with recsys_slm.json, atomically. Optional Matryoshka / 2D-Matryoshka training (matryoshka.*).",
    )
    _common_flags(train)
    add_config_args(train, "max_steps=200 matryoshka.dims=[768,512,256,128,64,32]")
    train.set_defaults(func=run_train)

    distill = rsub.add_parser(
        "distill",
        help="distil a trained retriever (teacher) into a smaller encoder (embedding + listwise score distillation)",
        description="Writes the student to OUT (sentence-transformers directory + recsys_slm.json), atomically. "
        "--model is the student (e.g. all-minilm-l6-v2 or a pruned copy of the teacher).",
    )
    _common_flags(distill)
    distill.add_argument("--teacher", default=None, help="the trained teacher retriever (distill.teacher)")
    add_config_args(distill, "distill.score_loss=margin_mse distill.label_weight=0.5")
    distill.set_defaults(func=run_distill)

    prune = rsub.add_parser(
        "prune",
        help="prune a retriever's encoder (MLP neurons, layers) for re-distillation; keeps its texts",
        description="Writes OUT (a sentence-transformers directory, SentenceTransformer(OUT) loads it, with "
        "recsys_slm.json) atomically. Then: recsys-slm retriever distill --model OUT --teacher TEACHER. "
        "Keys: docs/retriever.md.",
    )
    _common_flags(prune)
    add_config_args(prune, "neurons_keep=0.5 layers_keep=0.66")
    prune.set_defaults(func=run_prune)

    cand = rsub.add_parser(
        "candidates",
        help="write the retriever's top-k per user as a candidate task parquet for `eval ranker` (two-stage)",
        description="Writes OUT/<split>.parquet (candidate-task columns + retriever_scores) and OUT/retrieval.json. "
        "Then: recsys-slm eval ranker --model RANKER --task OUT/test.parquet --data-dir DATA.",
    )
    _common_flags(cand)
    add_config_args(cand, "k=50 dim=64 index=HNSW32")
    cand.set_defaults(func=run_candidates)


def register_eval(esub: argparse._SubParsersAction) -> None:
    """``recsys-slm eval retrieval`` (registered by :mod:`recsys_slm.cli.eval`)."""
    ev = esub.add_parser(
        "retrieval",
        help="sweep encoders x Matryoshka dims x FAISS indexes on held-out interactions; Recall/NDCG/MRR@K, "
        "latency, bytes/vector, Pareto plot, TREC files",
        description="Writes OUT/{report.json,summary.md,pareto.png,run.trec,qrels.trec,runs/*.trec} atomically. "
        "Definitions and formats: docs/retriever.md.",
    )
    ev.add_argument(
        "--model", action="append", default=None,
        help="encoder to evaluate (retriever directory or packaged name); repeat for several",
    )  # fmt: skip
    ev.add_argument("--out", default=None, help="output directory (replaced atomically)")
    ev.add_argument(
        "--data-dir", default=None, help="prepared data directory (default: the MovieLens-100K cache)"
    )
    add_config_args(ev, "dims=[768,256,64] indexes=[Flat,HNSW32,IVF32,PQ16]")
    ev.set_defaults(func=run_eval)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="encoder spec: packaged name or sentence-transformers directory"
    )
    p.add_argument("--out", default=None, help="output directory (replaced atomically)")
    p.add_argument(
        "--data-dir", default=None, help="prepared data directory (default: the MovieLens-100K cache)"
    )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line as config values (applied last, as Python values: paths stay literal)."""
    values: dict[str, Any] = {}
    if getattr(args, "model", None) is not None and not isinstance(args.model, list):
        values["model"] = args.model
    for key in ("out", "data_dir"):
        if getattr(args, key, None) is not None:
            values[key] = Path(getattr(args, key))
    return values


def _train_config(args: argparse.Namespace):
    from recsys_slm.config import load_config
    from recsys_slm.retriever.train import RetrieverTrainConfig

    cfg = load_config(RetrieverTrainConfig, args.config, args.overrides)
    cfg = dataclasses.replace(cfg, **_flags(args))
    if getattr(args, "teacher", None):
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=args.teacher))
    return cfg


def _print_training(summary: dict[str, Any], what: str) -> None:
    sps = summary.get("s_per_step")
    print(
        f"{what} -> {summary['out']}: {summary['pairs']:,} pairs, {summary['steps']} steps"
        + (f", {sps:.2f} s/step" if sps else "")
        + f", train loss {summary['train_loss']:.4f}, {summary['embedding_dim']}-d, ladder {summary['ladder']}"
    )
    for name in ("teacher_val", "val"):
        val = summary.get(name)
        if val and val.get("queries"):
            label = "teacher val" if name == "teacher_val" else "val"
            parts = [
                f"d{k[1:]}: R@10 {v['recall@10']:.4f} NDCG@10 {v['ndcg@10']:.4f}"
                for k, v in val.items()
                if k.startswith("d")
            ]
            print(f"  {label} ({val['queries']} queries, exact search) " + "; ".join(parts))


def run_train(args: argparse.Namespace) -> int:
    from recsys_slm.retriever.train import train_retriever

    _print_training(train_retriever(_train_config(args)), "retriever")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from recsys_slm.retriever.train import distill_retriever

    _print_training(distill_retriever(_train_config(args)), "student")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.retriever.prune import RetrieverPruneConfig, prune_retriever

    cfg = load_config(RetrieverPruneConfig, args.config, args.overrides)
    cfg = dataclasses.replace(cfg, **_flags(args))
    r = prune_retriever(cfg)
    before, after = r["encoder_layer_params"]["before"], r["encoder_layer_params"]["after"]
    print(f"pruned ({cfg.method}) -> {r['out_dir']}: layers {r['before']['layers']} -> {r['widths']['layers']}, "
          f"MLP width {r['before']['intermediate']} -> {r['widths']['intermediate']}, encoder-layer params "
          f"{before:,} -> {after:,} ({after / before:.1%}), {r['embedding_dim']}-d")  # fmt: skip
    return 0


def run_candidates(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.retriever.evaluate import RetrieveCandidatesConfig

    cfg = load_config(RetrieveCandidatesConfig, args.config, args.overrides)
    cfg = dataclasses.replace(cfg, **_flags(args))
    stats = cfg.run()
    print(
        f"retrieved top-{stats['k']} for {stats['records']:,} users: target retrieved for "
        f"{stats['target_retrieved']:,} (hit rate {stats['hit_rate']:.4f}); wrote {stats['written']:,} records "
        f"({stats['missing_target']}: dropped {stats['dropped']}, appended {stats['appended']}) to {cfg.out}"
    )
    print(
        f"next: recsys-slm eval ranker --model RANKER --task {cfg.out}/{stats['split']}.parquet "
        f"--data-dir {stats['data_dir']}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from recsys_slm.config import load_config
    from recsys_slm.retriever.evaluate import RetrievalEvalConfig, evaluate_retrieval, text_table

    cfg = load_config(RetrievalEvalConfig, args.config, args.overrides)
    values = _flags(args)
    if args.model:
        values["models"] = list(cfg.models) + list(args.model)
    cfg = dataclasses.replace(cfg, **values)
    report = evaluate_retrieval(cfg)
    q = report["queries"]
    print(
        f"evaluated {len(report['models'])} model(s) on {q['count']:,} held-out targets ({q['split']}, "
        f"{q['eval_split']}), catalogue {report['data']['catalogue']:,} items"
    )
    for m in report["models"]:
        enc = m["encode"]
        print(
            f"  {m['spec']}: {m['params']:,} params, {m['embedding_dim']}-d, encodes "
            f"{enc['queries_per_s'] or 0:.1f} user texts/s, {enc['items_per_s'] or 0:.1f} item texts/s"
        )
    print()
    print(text_table(report))
    for s in report["skipped"]:
        what = f"{s['index']} at dim {s['dim']}" if s["index"] else f"dim {s['dim']}"
        print(f"  skipped {what} ({s['model']}): {s['reason']}")
    for note in report["notes"]:
        print(f"  note: {note}")
    print(f"\nwrote {cfg.out} ({', '.join(f for f in report['files'] if not f.startswith('runs/'))})")
    return 0
