"""``CompressConfig``: the config of ``recsys-slm compress`` (every key in ``docs/compress.md``).

The stage sections hold the keys of the existing stage configs and are validated against them when the config is
created, so a typo fails before any training with a message naming the full key (``distill.objective.los``):

* ``distill``: :class:`~recsys_slm.distill.trainer.DistillConfig` keys of stage 1 (the pipeline sets ``teacher``,
  ``out`` and ``data_dir``; ``teacher_cache`` defaults to the cache the pipeline builds, ``prompt`` to the
  teacher's);
* ``prune``: :class:`~recsys_slm.prune.pruner.PruneConfig` keys of stage 2 (the pipeline sets ``model``, ``out``,
  ``data_dir``);
* ``redistill``: DistillConfig keys of stage 3 that **override the distill section** (the pipeline sets
  ``teacher``, ``teacher_cache``, ``transfer_set`` and ``student``), plus ``teacher_source``: ``teacher`` (the
  original teacher, through the cache) or ``distill`` (the stage-1 student, run online);
* ``ablation_train``: DistillConfig keys overriding the distill section for the trained ablations;
* ``teacher_train`` (optional): :class:`~recsys_slm.ranker.train.TeacherTrainConfig` keys of stage ``00_teacher``,
  which fine-tunes the teacher into the ``teacher`` directory first (skipped when that directory already holds a
  teacher trained with the same keys). ``config: FILE`` inside it loads a teacher YAML (e.g.
  ``pipelines/configs/teacher/smollm2_movielens.yaml``) that the other keys override; the pipeline sets ``out``
  (= ``teacher``) and ``data_dir``.

Only the keys given are stored (normalised to plain values), so the recorded config stays short and a stage's
config hash changes only when something that reaches that stage changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from recsys_slm.config import (
    ConfigError,
    check,
    config_to_dict,
    expand_model_spec,
    from_dict,
    load_config_data,
    merge_dicts,
    validate_fields,
)
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.model_dir import cache_home, data_dir_or_default

STAGES = ("01_distill", "02_prune", "03_redistill")
# --from-stage accepts these (stage directory names, their short names, and the two steps after the stages)
FROM_STAGES = {
    "01_distill": "01_distill",
    "distill": "01_distill",
    "02_prune": "02_prune",
    "prune": "02_prune",
    "03_redistill": "03_redistill",
    "redistill": "03_redistill",
    "ablations": "ablations",
    "eval": "eval",
}
ABLATIONS = ("prune_sft", "distill_only", "prune_only", "redistill_other_teacher")
Ablation = Literal["prune_sft", "distill_only", "prune_only", "redistill_other_teacher"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Keys of a stage section that the pipeline sets itself (giving one is an error naming it).
DISTILL_FIXED = ("teacher", "out", "data_dir")
PRUNE_FIXED = ("model", "out", "data_dir")
REDISTILL_FIXED = ("teacher", "out", "data_dir", "teacher_cache", "transfer_set", "student")
ABLATION_FIXED = ("teacher", "out", "data_dir", "teacher_cache", "transfer_set", "student")
TEACHER_FIXED = ("out", "data_dir")
# Defaults the pipeline gives every training section unless the section sets the key: the stage's own test pass
# would score the whole test split, which the pipeline's evaluation does once per model anyway.
TRAIN_DEFAULTS: dict[str, Any] = {"test_eval": False}


@dataclass
class CacheSection:
    """The teacher's outputs on the transfer set, computed once and shared by runs (``cache.*``).

    Used when ``distill.teacher_cache`` is not given. The transfer set and the scores are kept under ``dir`` with
    names derived from what produced them, so another ``compress`` run with the same teacher and transfer set
    reuses them (a warm cache) and a different one never overwrites them.

    Fields:
        enabled (bool): build the cache; false = the stages run the teacher online. Default true.
        dir (Path | None): default ``$RECSYS_SLM_HOME/runs/compress/cache``.
        max_labelled (int | None): seeded sample of labelled train records (``data transfer-set``); None = all.
        extra_pairs (int): teacher-labelled pairs added to the transfer set. Default 0.
        seed (int): transfer-set sampling seed. Default 0.
        top_k (int): answer-position top-k stored (token-level losses need > 0). Default 20.
        temperature (float): temperature of the stored top-k. Default 1.0.
        batch_size (int): prompts per teacher forward. Default 16.
    """

    enabled: bool = True
    dir: Path | None = None
    max_labelled: int | None = None
    extra_pairs: int = 0
    seed: int = 0
    top_k: int = 20
    temperature: float = 1.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        validate_fields(self)
        check(self.max_labelled is None or self.max_labelled > 0, "max_labelled",
              f"must be > 0 or null (= all records), got {self.max_labelled}")  # fmt: skip
        check(self.extra_pairs >= 0, "extra_pairs", f"must be >= 0, got {self.extra_pairs}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")

    def resolved_dir(self) -> Path:
        return self.dir if self.dir is not None else cache_home() / "runs" / "compress" / "cache"


@dataclass
class EvalSection:
    """What the report measures for every model (``eval.*``).

    Fields:
        pointwise_task (Path | None): pointwise task for AUC; default ``DATA/tasks/pointwise/test.parquet``.
        candidates_task (Path | None): candidate task for NDCG@10; default ``DATA/tasks/candidates/test.parquet``.
        pointwise_max_records (int | None): first N pointwise records; None = all.
        candidates_max_records (int | None): first N candidate lists (users); None = all.
        pointwise (bool) / candidates (bool): evaluate that task. Default true.
        batch_size (int): prompts per forward in the evaluation. Default 16.
        baselines (bool): evaluate the classical baselines once on the same records. Default true.
        speed_records (int): pointwise prompts scored per model for items/s. Default 128.
        speed_batch_size (int): batch size of the items/s measurement. Default 16.
        latency_requests (int): single-prompt (batch 1) calls per model for latency p50/p99. Default 32.
        bootstrap_resamples (int): user resamples for the intervals of the final checks' AUC ratio and AUC
            differences (``final.intervals``); 0 = none, else >= 100. Default 2000.
    """

    pointwise_task: Path | None = None
    candidates_task: Path | None = None
    pointwise_max_records: int | None = None
    candidates_max_records: int | None = None
    pointwise: bool = True
    candidates: bool = True
    batch_size: int = 16
    baselines: bool = True
    speed_records: int = 128
    speed_batch_size: int = 16
    latency_requests: int = 32
    bootstrap_resamples: int = 2000

    def __post_init__(self) -> None:
        validate_fields(self)
        check(
            self.bootstrap_resamples == 0 or self.bootstrap_resamples >= 100,
            "bootstrap_resamples",
            f"must be 0 (no intervals) or >= 100, got {self.bootstrap_resamples}",
        )
        for key in ("pointwise_max_records", "candidates_max_records"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be > 0 or null (= all records), got {value}")
        for key in ("batch_size", "speed_records", "speed_batch_size", "latency_requests"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        check(
            self.pointwise or self.candidates,
            "pointwise",
            "pointwise and candidates are both false: nothing to evaluate",
        )


@dataclass
class CompressConfig:
    """Config of ``recsys-slm compress`` (keys in ``docs/compress.md``).

    Fields:
        teacher (str): the teacher ranker directory (``$RECSYS_SLM_HOME``/``~`` expand). Required unless
            ``teacher_train`` is given, whose default is ``$RECSYS_SLM_HOME/runs/teacher/<model name>`` (where
            ``recsys-slm teacher train`` writes).
        teacher_train (dict | None): fine-tune the teacher first (stage ``00_teacher``) with these
            TeacherTrainConfig keys (``config: FILE`` loads a teacher YAML under them); None = the teacher exists.
        out (Path | None): run directory; default ``$RECSYS_SLM_HOME/runs/compress/run``.
        data_dir (Path | None): prepared data; default ``$RECSYS_SLM_HOME/data/movielens-100k``.
        device (str): default device of every stage ("auto", "cpu", "cuda", "cuda:N"); a section may set its own.
        prompt (PromptConfig | None): the prompt of every stage; None = the teacher manifest's (or the default).
        cache (CacheSection): the transfer set and the teacher's outputs on it.
        distill (dict): stage 1, DistillConfig keys.
        prune (dict): stage 2, PruneConfig keys.
        redistill (dict): stage 3, DistillConfig keys overriding ``distill``, plus ``teacher_source``.
        regrow (float): share of the removed heads / MLP neurons re-added before stage 3 (0 = off), function-
            preserving (:func:`recsys_slm.compress.regrow.regrow`).
        regrow_init (str): "copy" (the removed units' input weights from the stage-1 model) or "random".
        eval (EvalSection): evaluation and speed measurement.
        ablations (list[str]): any of prune_sft, distill_only, prune_only, redistill_other_teacher.
        ablation_train (dict): DistillConfig keys overriding ``distill`` for prune_sft and distill_only; their
            ``max_steps`` defaults to stage 1's + stage 3's (the same optimizer steps as the pipeline).
        note (str): a line printed at the top of the report (e.g. "smoke-test numbers").
    """

    teacher: str = ""
    teacher_train: dict[str, Any] | None = None
    out: Path | None = None
    data_dir: Path | None = None
    device: str = "auto"
    prompt: PromptConfig | None = None
    cache: CacheSection = field(default_factory=CacheSection)
    distill: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    redistill: dict[str, Any] = field(default_factory=dict)
    regrow: float = 0.0
    regrow_init: Literal["copy", "random"] = "copy"
    eval: EvalSection = field(default_factory=EvalSection)
    ablations: list[Ablation] = field(default_factory=list)
    ablation_train: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.teacher_train is not None:
            self.teacher_train = self._teacher_section(_unwrap(self.teacher_train))
            self.teacher = self.teacher_train["out"]
        check(bool(self.teacher.strip()), "teacher",
              "required: the teacher ranker directory, e.g. teacher=runs/teacher, or a teacher_train section that "
              "fine-tunes one (see docs/compress.md)")  # fmt: skip
        self.teacher = expand_model_spec(self.teacher)
        check(
            bool(_DEVICE.match(self.device)), "device", f"one of auto, cpu, cuda, cuda:N; got {self.device!r}"
        )
        check(
            0.0 <= self.regrow <= 1.0,
            "regrow",
            f"must be in [0, 1] (share of the removed units), got {self.regrow}",
        )
        check(
            len(set(self.ablations)) == len(self.ablations), "ablations", f"has duplicates: {self.ablations}"
        )
        out = self.resolved_out()
        # Validate each section against its stage config now (with the values the pipeline will fill in).
        self.distill = normalize_section(self.distill, "DistillConfig", "distill.", DISTILL_FIXED,
                                         {"teacher": self.teacher, "out": out / STAGES[0]})  # fmt: skip
        self.prune = normalize_section(self.prune, "PruneConfig", "prune.", PRUNE_FIXED,
                                       {"model": str(out / STAGES[0]), "out": out / STAGES[1]})  # fmt: skip
        redistill = dict(self.redistill)
        source = _unwrap(redistill.pop("teacher_source", "teacher"))
        check(source in ("teacher", "distill"), "redistill.teacher_source",
              f"got {source!r}; allowed values: 'teacher', 'distill'")  # fmt: skip
        base = merge_dicts(self.distill, {k: v for k, v in redistill.items()})
        for key in REDISTILL_FIXED:
            check(key not in redistill, f"redistill.{key}", "is set by the pipeline (stage 3 starts from the pruned "
                  "model and learns from the teacher chosen by redistill.teacher_source)")  # fmt: skip
        normalized = normalize_section(base, "DistillConfig", "redistill.", (),
                                       {"teacher": self.teacher, "out": out / STAGES[2],
                                        "student": {"init": "model", "source": str(out / STAGES[1])}},
                                       keep=redistill)  # fmt: skip
        self.redistill = {**normalized, "teacher_source": source}
        for key in ABLATION_FIXED:
            check(
                key not in self.ablation_train,
                f"ablation_train.{key}",
                "is set by the pipeline for each ablation",
            )
        normalized = normalize_section(merge_dicts(self.distill, self.ablation_train), "DistillConfig", "ablation_train.", (),
                                       {"teacher": self.teacher, "out": out / "ablations" / "x"},
                                       keep=self.ablation_train)  # fmt: skip
        self.ablation_train = normalized

    def _teacher_section(self, section: Any) -> dict[str, Any]:
        """The resolved TeacherTrainConfig of stage 00_teacher as plain values (every key, so its hash covers
        the loaded YAML too); ``out`` is the ``teacher`` directory (or the teacher config's default)."""
        from recsys_slm.ranker.train import TeacherTrainConfig

        if not isinstance(section, dict):
            raise ConfigError(f"config key 'teacher_train': expected a mapping of keys, got {section!r}")
        section = {k: _unwrap(v) for k, v in section.items()}
        # out / data_dir are the pipeline's; a saved compress_config.yaml carries them back with the same values
        fixed = {"out": expand_model_spec(self.teacher) if self.teacher.strip() else None,
                 "data_dir": str(self.resolved_data_dir())}  # fmt: skip
        for key in TEACHER_FIXED:
            given = section.pop(key, None)
            check(given is None or (fixed[key] is not None and str(given) == fixed[key]), f"teacher_train.{key}",
                  f"is set by the pipeline (out = the teacher key, data_dir = the data_dir key); got {given!r}")  # fmt: skip
        data: dict[str, Any] = {}
        source = section.pop("config", None)
        if source is not None:
            path = _find_file(str(source))
            check(path is not None, "teacher_train.config", f"file {source} does not exist")
            data, _ = load_config_data(path)
            data.pop("out", None)  # the teacher file's own output dir: the teacher key (or its default) wins
        data = merge_dicts(data, section)
        data["data_dir"] = fixed["data_dir"]
        if fixed["out"] is not None:
            data["out"] = fixed["out"]
        resolved = from_dict(TeacherTrainConfig, data, prefix="teacher_train.")
        plain = config_to_dict(resolved)
        plain["out"] = str(resolved.resolved_out())
        return plain

    def resolved_out(self) -> Path:
        return Path(self.out) if self.out is not None else cache_home() / "runs" / "compress" / "run"

    def resolved_data_dir(self) -> Path:
        return data_dir_or_default(self.data_dir)


# ----------------------------------------------------------------------------------------- section helpers
def _stage_class(name: str):
    if name == "DistillConfig":
        from recsys_slm.distill.trainer import DistillConfig

        return DistillConfig
    from recsys_slm.prune.pruner import PruneConfig

    return PruneConfig


def _find_file(spec: str) -> Path | None:
    """``spec`` as given (absolute or relative to the working directory), else relative to the repository root
    (where ``pipelines/configs`` lives), else None."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    repo = Path(__file__).resolve().parents[2] / spec
    return repo if not path.is_absolute() and repo.is_file() else None


def _unwrap(value: Any) -> Any:
    """A command-line override's YAML reading (a section is a plain mapping, so overrides arrive wrapped)."""
    return getattr(value, "parsed", value)


def _pick(plain: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The resolved values of the keys in ``given`` (nested mappings recursively)."""
    out = {}
    for key, value in given.items():
        resolved = plain.get(key)
        out[key] = (
            _pick(resolved, value) if isinstance(value, dict) and isinstance(resolved, dict) else resolved
        )
    return out


def normalize_section(section: dict[str, Any], cls_name: str, prefix: str, fixed_keys: tuple[str, ...],
                      fills: dict[str, Any], keep: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Validate ``section`` as ``cls_name`` (with ``fills`` for the keys the pipeline sets) and return its given
    keys as plain resolved values.

    Args:
        section: the user's keys (may hold command-line override wrappers).
        cls_name: "DistillConfig" or "PruneConfig".
        prefix: key prefix of error messages ("distill.").
        fixed_keys: keys the user may not give (the pipeline sets them).
        fills: values for required keys while validating.
        keep: the mapping whose keys (recursively) are returned (default: ``section``).

    Raises:
        ConfigError: an unknown key, a bad value or a fixed key (the message names the full key).
    """
    if not isinstance(section, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a mapping of keys, got {section!r}")
    for key in fixed_keys:
        check(key not in section, f"{prefix}{key}", "is set by the pipeline; remove it from this section")
    cls = _stage_class(cls_name)
    data = {**section}
    for key, value in fills.items():
        data.setdefault(key, value)
    resolved = from_dict(cls, data, prefix=prefix)
    plain = config_to_dict(resolved)
    return _pick(plain, section if keep is None else keep)


def stage_fields(cls_name: str) -> set[str]:
    """Field names of a stage config (to set optional keys only where the installed version has them)."""
    return {f.name for f in fields(_stage_class(cls_name))}
