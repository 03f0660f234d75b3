"""A tiny, fully offline serving setup for tests and smoke runs: two tiny random rankers + a serving YAML.

    .venv/bin/python -m serving.tiny --out /tmp/tiny_serving --data-dir DATA   # then:
    recsys-slm serve --config /tmp/tiny_serving/tiny.yaml --port 8011

``DATA`` is any prepared data directory (``recsys-slm data prepare``; the tests use the ``tiny_data_dir``
fixture). The two variants are random tiny Llamas (4 and 1 layers) with made-up qualities (0.8 and 0.6), so the
SLO logic has a slower, better model and a faster, worse one to choose between. Scores are meaningless.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

TINY_PROMPT = {
    "system": "You are a movie recommender. Reply with Yes or No.",
    "instruction": "Will the user like the candidate movie? Answer Yes or No.",
    "user_template": "{instruction}\n{profile}Liked: {liked}\nDisliked: {disliked}\nCandidate: {candidate}",
    "profile_template": "User: {age}-year-old, gender {gender}, occupation {occupation}.\n",
    "candidate_template": "{text}",
    "max_tokens": 384,
}


def tiny_serving_config(out: str | Path, data_dir: str | Path, **overrides: Any) -> Path:
    """Build the two tiny models under ``out`` (once) and write ``out/tiny.yaml``; returns the YAML path.

    ``overrides`` replace top-level keys of the written config (e.g. ``slo={"p99_ms": 5}``).
    """
    from recsys_slm.models.tiny import build_tiny_causal_lm

    out = Path(out)
    models = {"big": (4, 0), "small": (1, 1)}
    for name, (layers, seed) in models.items():
        if not (out / name / "model.safetensors").is_file():
            build_tiny_causal_lm(out / name, seed=seed, num_layers=layers)
    cfg: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 8011,
        "data_dir": str(data_dir),
        "variants": [
            {"name": "big", "model": str(out / "big"), "quality": 0.8},
            {"name": "small", "model": str(out / "small"), "quality": 0.6},
        ],
        "prompt": TINY_PROMPT,
        "history_len": 5,
        "slo": {"p99_ms": 2000, "candidates": 8, "concurrency": 2},
        "profile": {"rounds": 3, "warmup": 1},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
        "overload": {"max_queue": 16, "degrade_max_candidates": 4},
        "limits": {"max_candidates": 20, "max_history": 10, "max_text_chars": 120},
        "device": "cpu",
        "torch_threads": 1,
        "num_cpus": 0.5,
        "ray_num_cpus": 2,
    }
    cfg.update(overrides)
    path = out / "tiny.yaml"
    path.write_text(f"# recsys-slm serve --config {path}\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    print(tiny_serving_config(args.out, args.data_dir))


if __name__ == "__main__":
    main()
