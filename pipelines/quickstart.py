"""Quickstart: prepare MovieLens-100K and the packaged ranker, render test prompts and print P(" Yes").

    python -m pipelines.quickstart --config pipelines/configs/quickstart/smollm2_movielens.yaml [key=value ...]

(``scripts/quickstart.sh`` runs exactly this after setting up ``.venv/``.) Steps: (1) ``data prepare`` into the
cache unless already prepared with the same config, (2) ``models prepare`` for the ranker, (3) render
``num_prompts`` prompts from the pointwise test split with the model's chat template and score them with the
zero-shot model. Zero-shot SmolLM2 cannot rank (P(Yes) is about 0.2 whatever the history); the teacher
fine-tuning job turns it into a ranker.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import pandas as pd

from recsys_slm.cli.common import run_recipe
from recsys_slm.config import check, validate_fields
from recsys_slm.data.prepare import DataPrepareConfig, is_prepared, prepare_dataset, read_summary
from recsys_slm.data.prompts import PromptConfig, PromptRenderer
from recsys_slm.data.schema import InteractionLog


@dataclass
class QuickstartConfig:
    """Fields: data (DataPrepareConfig), model (str: packaged name, local dir or hub id; default
    "smollm2-135m-instruct"), split (str: pointwise split to sample, default "test"), num_prompts (int, 5),
    show_prompt (int: print the full text of this many prompts, default 1), prompt (PromptConfig)."""

    data: DataPrepareConfig = field(default_factory=DataPrepareConfig)
    model: str = "smollm2-135m-instruct"
    split: str = "test"
    num_prompts: int = 5
    show_prompt: int = 1
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.split in ("train", "val", "test"), "split", f"one of train, val, test; got {self.split!r}")
        check(self.num_prompts > 0, "num_prompts", "must be > 0")


def ensure_data(cfg: DataPrepareConfig) -> dict:
    """Prepare the data directory unless it already holds the same resolved config (idempotent)."""
    if is_prepared(cfg):
        print(f"[data] using prepared data in {cfg.resolved_out()}")
        return read_summary(cfg.resolved_out())
    print(f"[data] preparing {cfg.dataset} into {cfg.resolved_out()}")
    return prepare_dataset(cfg)


def main(cfg: QuickstartConfig) -> pd.DataFrame:
    """Run the quickstart; returns the scored prompts (user_id, item_id, label, p_yes, history_kept)."""
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    summary = ensure_data(cfg.data)
    print(
        f"[data] {summary['interactions']:,} interactions, {summary['users']:,} users, {summary['items']:,} items; "
        f"pointwise train/val/test = {'/'.join(f'{n:,}' for n in summary['tasks']['pointwise'].values())}"
    )
    data_dir = cfg.data.resolved_out()
    log = InteractionLog.load(data_dir)
    records = pd.read_parquet(data_dir / "tasks" / "pointwise" / f"{cfg.split}.parquet").head(cfg.num_prompts)

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(cfg.model)
    print(f"[model] {cfg.model} loaded in {time.perf_counter() - start:.1f}s ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {next(model.parameters()).device})")

    renderer = PromptRenderer(cfg.prompt, tokenizer, log.items, log.users)
    ranker = Ranker(model, tokenizer, renderer, RankerConfig(prompt=cfg.prompt))
    start = time.perf_counter()
    scored = ranker.score_pointwise(records)
    elapsed = time.perf_counter() - start
    p_yes = scored["p_yes"].tolist()

    for i, r in enumerate(records.head(cfg.show_prompt).itertuples()):
        prompt = renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id)
        print(f"\n--- prompt {i + 1} ({prompt.n_tokens} tokens) ---\n{prompt.text}\n--- end of prompt ---")
    print(f"\n{'user':>6} {'item':>6} {'label':>5} {'P(Yes)':>7}  candidate")
    titles = dict(zip(log.items["item_id"], log.items["title"]))
    for record, p in zip(records.itertuples(), p_yes):
        print(f"{record.user_id:>6} {record.item_id:>6} {record.label:>5} {p:7.3f}  {titles[record.item_id]}")
    print(f"\nscored {len(records)} prompts in {elapsed:.2f}s ({len(records) / elapsed:.1f} prompts/s)")
    return pd.DataFrame(
        {
            "user_id": records["user_id"],
            "item_id": records["item_id"],
            "label": records["label"],
            "p_yes": p_yes,
            "history_kept": scored["history_kept"],
        }
    )


def cli(argv: list[str] | None = None) -> int:
    return run_recipe(QuickstartConfig, main, __doc__, argv, example="num_prompts=10 show_prompt=0")


if __name__ == "__main__":
    sys.exit(cli())
