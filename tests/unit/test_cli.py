"""The recsys-slm CLI: data prepare / validate end to end on small local data, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from recsys_slm.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["data", "--help"], ["data", "prepare", "--help"], ["data", "validate", "--help"],
                 ["models", "--help"], ["models", "prepare", "--help"], ["models", "list", "--help"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 0
        assert "usage: recsys-slm" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "recsys_slm.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("recsys-slm ")


def test_data_prepare_from_recbole_folder(recbole_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--dataset", "movielens-100k", "--source", str(recbole_dir), "--out", str(out),
                 "pointwise.history_len=1", "candidates.num_negatives=2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["interactions"], summary["users"], summary["items"]) == (10, 3, 10)
    assert set(summary["dropped"]) >= {"null_timestamp", "unknown_item", "duplicate_event"}
    assert sum(summary["dropped"].values()) == 0
    # history_len=1: every interaction after a user's first → 2 + 2 + 3 = 7 records, split int(5.6)=5 / int(0.7)=0 / 2
    assert summary["tasks"]["pointwise"] == {"train": 5, "val": 0, "test": 2}
    for split in ("train", "val", "test"):
        assert len(pd.read_parquet(out / "tasks" / "pointwise" / f"{split}.parquet")) == summary["tasks"]["pointwise"][split]
    assert (out / "tasks" / "candidates" / "test.parquet").is_file() and (out / "config.yaml").is_file()
    printed = capsys.readouterr().out
    assert "interactions 10  users 3  items 10" in printed and "task pointwise: train 5  val 0  test 2" in printed
    assert not list(tmp_path.glob(".prepared.tmp-*"))  # no temporary directory left behind


def test_data_prepare_bad_override_is_a_config_error(recbole_dir, tmp_path, capsys):
    code = main(["data", "prepare", "--source", str(recbole_dir), "--out", str(tmp_path / "o"), "pointwise.histroy_len=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "config error: unknown config key 'pointwise.histroy_len'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_options_after_overrides(recbole_dir, tmp_path, capsys):
    # argparse alone rejects "KEY=VALUE --flag KEY=VALUE"; main() takes the later KEY=VALUE as overrides too
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "pointwise.history_len=1", "--source", str(recbole_dir), "--out", str(out),
                 "candidates.num_negatives=2", "--dataset", "movielens-100k", "pointwise.max_records=3"])
    assert code == 0
    config = (out / "config.yaml").read_text()
    assert "history_len: 1" in config and "num_negatives: 2" in config and "max_records: 3" in config
    # anything else after an option is still an argparse error naming it
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--out", str(tmp_path / "o"), "a=1", "--source", str(recbole_dir), "stray"])
    assert exc.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "list", "x=1"])  # a command without overrides


def _write_logs(folder, interactions, items):
    folder.mkdir()
    interactions.to_parquet(folder / "interactions.parquet")
    items.to_parquet(folder / "items.parquet")


def test_data_validate_reports_every_problem(tmp_path, capsys):
    interactions = pd.DataFrame({"user_id": ["1", "1", "2", None], "item_id": ["a", "a", "zzz", "b"],
                                 "timestamp": [1, 1, 3, 4], "rating": [5.0, 5.0, 9.0, 2.0]})
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"]})
    _write_logs(tmp_path / "logs", interactions, items)
    code = main(["data", "validate", str(tmp_path / "logs"), "--rating-scale", "1", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "interactions.parquet" in err
    assert "column 'user_id'" in err and "null" in err
    assert "column 'item_id': 1 row references 1 item id missing from" in err and "'zzz'" in err
    assert "repeats an earlier (user_id, item_id, timestamp) event" in err
    assert "column 'rating'" in err


def test_data_validate_missing_column_and_ok_case(tmp_path, capsys):
    items = pd.DataFrame({"item_id": ["a"], "title": ["A"]})
    _write_logs(tmp_path / "bad", pd.DataFrame({"user_id": ["1"], "item_id": ["a"], "rating": [3.0]}), items)
    assert main(["data", "validate", str(tmp_path / "bad" / "interactions.parquet"), str(tmp_path / "bad" / "items.parquet")]) == 1
    err = capsys.readouterr().err
    assert "timestamp" in err and "missing" in err
    _write_logs(tmp_path / "good", pd.DataFrame({"user_id": ["1"], "item_id": ["a"], "timestamp": [5], "rating": [3.0]}), items)
    assert main(["data", "validate", str(tmp_path / "good")]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 interactions")
    assert main(["data", "validate", str(tmp_path / "nothing_here")]) == 1
    assert "nothing_here does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "validate", str(tmp_path / "empty")]) == 1
    assert "no interactions or items table found" in capsys.readouterr().err
