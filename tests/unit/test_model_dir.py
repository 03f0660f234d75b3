"""atomic_dir: all-or-nothing output directories that never replace a folder recsys_slm did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_slm.model_dir import OUTPUT_MARKER, atomic_dir, read_manifest, write_manifest


def test_success_renames_into_place_and_replaces_own_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1" and (target / OUTPUT_MARKER).is_file()
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert not (target / "a.txt").exists() and (target / "b.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copies left


def test_crash_leaves_no_directory_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "good.txt").write_text("ok")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("killed")
    assert (target / "good.txt").read_text() == "ok"


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "my_logs"
    mine.mkdir()
    (mine / "interactions.parquet").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace .*my_logs: it is not empty and was not written"):
        with atomic_dir(mine):
            pass
    assert (mine / "interactions.parquet").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty folder is fine
        (tmp / "x").write_text("1")
    legacy = tmp_path / "legacy"  # written by an earlier version: manifest but no marker
    legacy.mkdir()
    write_manifest(legacy, "test")
    with atomic_dir(legacy):
        pass


@pytest.mark.parametrize("where", ["cwd", "home", "parent_of_cwd"])
def test_refuses_current_home_and_their_parents(where, tmp_path, monkeypatch):
    work = tmp_path / "w" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": Path("."), "home": tmp_path / "home", "parent_of_cwd": tmp_path / "w"}[where]
    with pytest.raises(ValueError, match="refusing to write output"):
        with atomic_dir(target):
            pass


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path, "prune", config={"ratio": 0.5}, parent="p", metrics={"auc": 0.8})
    m = read_manifest(tmp_path)
    assert m["stage"] == "prune" and m["config"] == {"ratio": 0.5} and m["parent"] == "p"
    assert m["metrics"] == {"auc": 0.8} and m["code_version"]["recsys_slm"]
    (tmp_path / "recsys_slm.json").write_text("{broken")
    with pytest.raises(ValueError, match="recsys_slm.json is not valid JSON"):
        read_manifest(tmp_path)


def test_json_files_get_plain_file_permissions(tmp_path):
    import os
    import stat

    from recsys_slm.model_dir import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_data_dir_or_default_uses_recsys_slm_home(tmp_path, monkeypatch):
    from recsys_slm.model_dir import data_dir_or_default

    monkeypatch.setenv("RECSYS_SLM_HOME", str(tmp_path / "home"))
    assert data_dir_or_default(None) == tmp_path / "home" / "data" / "movielens-100k"
    assert data_dir_or_default("some/dir") == Path("some/dir")
    assert data_dir_or_default(tmp_path) == tmp_path
