"""Config loading: defaults → YAML → key=value overrides; unknown keys and bad values name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from recsys_slm.config import (
    ConfigError,
    check,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
    validate_fields,
)


@dataclass
class Inner:
    ratio: float = 0.5
    importance: Literal["magnitude", "taylor"] = "magnitude"

    def __post_init__(self) -> None:
        validate_fields(self)
        check(0 < self.ratio < 1, "ratio", f"must be in (0, 1), got {self.ratio}")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    out: Path | None = None
    dims: list[int] = field(default_factory=lambda: [64, 128])
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        validate_fields(self)


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner: {ratio: 0.3}\n")
    cfg = load_config(Outer, path, ["inner.importance=taylor", "dims=[8, 16]", "out=/tmp/x", "flag=true"])
    assert cfg.steps == 20
    assert cfg.inner.ratio == 0.3 and cfg.inner.importance == "taylor"
    assert cfg.dims == [8, 16] and cfg.out == Path("/tmp/x") and cfg.flag is True
    assert cfg.name == "run"


def test_unknown_key_names_key_and_known_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'.*known keys: dims, flag, inner, name, out, steps"):
        load_config(Outer, None, ["stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.rate'.*importance, ratio"):
        load_config(Outer, None, ["inner.rate=3"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'inner.importance'.*'random'.*allowed values: 'magnitude', 'taylor'"):
        load_config(Outer, None, ["inner.importance=random"])


def test_bad_types_name_the_key():
    with pytest.raises(ConfigError, match=r"'steps'.*expected an integer"):
        load_config(Outer, None, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"'flag'.*expected true or false"):
        load_config(Outer, None, ["flag=3"])
    with pytest.raises(ConfigError, match=r"'dims\[1\]'.*expected an integer"):
        load_config(Outer, None, ["dims=[1, x]"])


def test_range_check_in_nested_config_carries_its_path():
    with pytest.raises(ConfigError, match=r"config key 'inner.ratio': must be in \(0, 1\), got 1.5"):
        load_config(Outer, None, ["inner.ratio=1.5"])


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="'steps'"):
        Outer(steps="many")  # type: ignore[arg-type]


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(Outer, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, listy)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {importance: l1}\n")
    with pytest.raises(ConfigError, match=r"allowed values.*\(from .*c.yaml\)"):
        load_config(Outer, path)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.ratio=0.25", "out=/tmp/y"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


@dataclass
class Texty:
    lr: float = 1.0
    token: str = " Yes"
    out: Path | None = None
    mode: Literal["yes", "no"] = "yes"

    def __post_init__(self) -> None:
        validate_fields(self)


def test_overrides_keep_text_for_strings_and_paths_and_read_scientific_floats(tmp_path):
    cfg = load_config(Texty, None, ["lr=5e-5", "token=No", "out=/tmp/a: b #c", "mode=no"])
    assert cfg.lr == 5e-5 and cfg.token == "No" and cfg.out == Path("/tmp/a: b #c") and cfg.mode == "no"
    assert load_config(Texty, None, ["out=null"]).out is None
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\n")  # PyYAML reads this as the string '1e-4'
    assert load_config(Texty, path).lr == 1e-4


def test_empty_path_is_rejected_not_taken_as_the_current_directory():
    with pytest.raises(ConfigError, match="config key 'out': got an empty path"):
        load_config(Texty, None, ["out="])
