"""The README's main job end to end on tiny data and a tiny model, through its command line (run_recipe)."""

from __future__ import annotations

from pathlib import Path

from pipelines.quickstart import cli

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_from_its_yaml(recbole_dir, tiny_lm_dir, tmp_path, capsys):
    argv = [
        "--config", str(ROOT / "pipelines/configs/quickstart/smollm2_movielens.yaml"),
        f"data.source={recbole_dir}", f"data.out={tmp_path / 'data'}", "data.pointwise.history_len=1",
        "data.candidates.num_negatives=2", f"model={tiny_lm_dir}", "split=train", "num_prompts=3",
    ]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "[data] preparing movielens-100k" in out and "Candidate:" in out and "scored 3 prompts" in out
    assert cli(argv) == 0  # second run reuses the prepared data
    assert "[data] using prepared data" in capsys.readouterr().out


def test_quickstart_bad_override_exits_2(capsys):
    assert cli(["num_prompts=lots"]) == 2
    assert "config key 'num_prompts'" in capsys.readouterr().err
