"""Check that a model directory loads with stock transformers in a fresh process (recsys_slm never imported) and
scores exactly as recsys_slm scores it.

    python -m bench.stock_load_check DIR [DIR ...] [--records 16]

Renders the first N pointwise validation prompts with the prompt in DIR's manifest, scores them with
``recsys_slm`` (verbalizer logit difference), then scores the same token ids in a subprocess that imports only
torch + transformers (``AutoModelForCausalLM.from_pretrained``) and asserts ``recsys_slm`` is not loaded there.
Prints the largest absolute score difference per directory; exit status 1 if any exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, seqs, yes, no = json.loads(sys.stdin.read())
model = AutoModelForCausalLM.from_pretrained(path).eval()
out = []
with torch.no_grad():
    for seq in seqs:
        logits = model(torch.tensor([seq])).logits[0, -1]
        out.append(float(logits[yes] - logits[no]))
assert "recsys_slm" not in sys.modules
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    import pandas as pd

    from recsys_slm.config import from_dict
    from recsys_slm.data.prompts import PromptConfig, PromptRenderer
    from recsys_slm.data.schema import InteractionLog
    from recsys_slm.model_dir import cache_home, read_manifest
    from recsys_slm.models.loading import load_causal_lm
    from recsys_slm.ranker.ranker import Ranker, RankerConfig

    data_dir = Path(args.data_dir) if args.data_dir else cache_home() / "data" / "movielens-100k"
    log = InteractionLog.load(data_dir)
    frame = pd.read_parquet(data_dir / "tasks" / "pointwise" / "val.parquet").head(args.records)
    worst = 0.0
    for d in args.dirs:
        prompt = from_dict(PromptConfig, read_manifest(d)["config"]["prompt"])
        model, tok = load_causal_lm(d, device="cpu")
        ranker = Ranker(model.eval(), tok, PromptRenderer(prompt, tok, log.items, log.users), RankerConfig(1, False, prompt))
        seqs = [ranker.encode(ranker.renderer.render(list(r.history_item_ids), list(r.history_labels), r.item_id, r.user_id))
                for r in frame.itertuples()]  # fmt: skip
        ours = ranker.scorer.score_token_ids(seqs)
        ours = (ours[:, 0] - ours[:, 1]).tolist()
        payload = json.dumps([str(Path(d).resolve()), seqs, ranker.scorer.yes_id, ranker.scorer.no_id])
        child = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True, text=True, check=True)
        stock = json.loads(child.stdout.strip().splitlines()[-1])
        diff = max(abs(a - b) for a, b in zip(ours, stock, strict=True))
        worst = max(worst, diff)
        print(f"{d}: {model.config.num_hidden_layers} layers, {len(seqs)} prompts, stock transformers in a fresh "
              f"process (recsys_slm not imported) vs recsys_slm: max |score diff| {diff:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
