"""``compress(cfg)``: teacher (``00_teacher``, optional fine-tune) → ``01_distill`` → ``02_prune`` → (``02_regrow``) → ``03_redistill`` → ablations →
evaluation → report, each step in its own directory under ``cfg.out`` (``docs/compress.md``).

Every stage is the existing stage function (:func:`recsys_slm.distill.trainer.distill`,
:func:`recsys_slm.prune.pruner.prune`, :func:`recsys_slm.compress.regrow.regrow`) writing its own
``from_pretrained`` directory atomically, with its ``recsys_slm.json`` manifest. The pipeline adds a ``compress``
record to that manifest: the stage name, a **config hash** (the stage's resolved config without device/progress
keys, plus the records of the directories it was derived from) and the completion time.

Resume semantics:

* a stage whose directory holds a record with the same hash is **skipped**; a changed config, or a parent that
  was redone, changes the hash, so the stage and everything after it run again;
* before a stage runs, ``OUT/.<stage>.pending.json`` holds its hash; a **killed** stage finds it on the next run
  and its own checkpoint (``OUT/<stage>.work``) resumes it (distillation checkpoints); a checkpoint left by another
  config is discarded; if the kill came after the directory was written but before the record, the record is
  completed from the pending file instead of redoing the stage;
* ``from_stage`` redoes that step and every later one (stages, then ``ablations``, then ``eval``); a model's
  evaluation is kept while its directory is unchanged (``from_stage="eval"`` redoes every evaluation);
* speed (items/s, latency) is measured anew for every model in the same process each time the report is built;
* ``00_teacher`` (only with ``teacher_train``) writes the ``teacher`` directory, usually shared by runs (the
  default is where ``recsys-slm teacher train`` writes): a directory that holds a teacher trained with the same
  keys is reused (adopted when ``teacher train`` made it), a killed fine-tune resumes from its checkpoint, and a
  teacher trained with other keys is never overwritten (an error names both). ``from_stage`` never retrains it.
"""

from __future__ import annotations

import calendar
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_slm.compress.config import (
    FROM_STAGES,
    STAGES,
    TRAIN_DEFAULTS,
    CompressConfig,
    stage_fields,
)
from recsys_slm.config import ConfigError, config_to_dict, from_dict, merge_dicts, save_config
from recsys_slm.data.prompts import PromptConfig
from recsys_slm.distill.trainer import DistillConfig, distill
from recsys_slm.model_dir import (
    MANIFEST_NAME,
    OUTPUT_MARKER,
    atomic_dir,
    config_hash,
    data_identity,
    read_manifest,
    write_json_atomic,
    write_manifest,
)
from recsys_slm.model_dir import model_identity as base_model_identity
from recsys_slm.prune.pruner import PruneConfig, prune
from recsys_slm.training.loop import work_dir

ORDER = (*STAGES, "ablations", "eval")
RECORD_KEY = "compress"
LOG_FILE = "compress.log"
CONFIG_FILE = "compress_config.yaml"
EVAL_FILE = "compress_eval.json"
REGROW_DIR = "02_regrow"
TEACHER_STAGE = "00_teacher"
# Keys that do not change what a stage computes: left out of its config hash.
HASH_EXCLUDE = frozenset({"device", "progress", "eval_batch_size", "keep_checkpoints", "log_every", "resume"})


def _hashable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in HASH_EXCLUDE}


def _token(record: dict[str, Any]) -> dict[str, Any]:
    """What a child's hash depends on: the parent's hash and completion time (a redone parent changes it)."""
    return {
        "stage": record["stage"],
        "config_hash": record["config_hash"],
        "completed_ts": record["completed_ts"],
    }


def model_identity(spec: str) -> dict[str, Any]:
    """:func:`recsys_slm.model_dir.model_identity` plus the compress record of a directory a compress run wrote."""
    identity = base_model_identity(spec)
    if Path(spec).expanduser().is_dir():
        record = (read_manifest(Path(spec).expanduser()) or {}).get(RECORD_KEY) or {}
        # a 00_teacher record only marks who trained / adopted the teacher (its creation time already changes when
        # it is retrained): adopting a teacher must not redo the runs that used it before
        identity["record"] = record.get("config_hash") if record.get("stage") != TEACHER_STAGE else None
    return identity


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    manifest = read_manifest(directory)
    if manifest is None:
        raise RuntimeError(f"stage output {directory} has no {MANIFEST_NAME}; the stage did not finish")
    manifest[RECORD_KEY] = record
    write_json_atomic(directory / MANIFEST_NAME, manifest)


def _created_ts(manifest: dict[str, Any]) -> float:
    try:
        return float(calendar.timegm(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")))
    except (KeyError, TypeError, ValueError):
        return 0.0


@dataclass
class ModelEntry:
    """A model the report evaluates: its report name, directory and identity token."""

    name: str
    model_dir: str
    token: dict[str, Any]
    kind: str  # "stage" | "ablation"


class _Run:
    """State of one ``compress`` invocation."""

    def __init__(self, cfg: CompressConfig, from_stage: str | None) -> None:
        self.cfg = cfg
        self.out = cfg.resolved_out().expanduser().resolve()
        self.data_dir = cfg.resolved_data_dir().expanduser().resolve()
        if from_stage is not None and from_stage not in FROM_STAGES:
            raise ConfigError(f"--from-stage: got {from_stage!r}; allowed: {', '.join(FROM_STAGES)}")
        self.from_step = FROM_STAGES[from_stage] if from_stage is not None else None
        self.force_index = ORDER.index(self.from_step) if self.from_step else len(ORDER)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    # ------------------------------------------------------------------------------------------ plumbing
    def forced(self, step: str) -> bool:
        return ORDER.index(step) >= self.force_index

    def log(self, message: str) -> None:
        print(f"[compress] {message}", flush=True)
        with (self.out / LOG_FILE).open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    def prepare_out(self) -> None:
        """Create ``out`` (refusing a non-empty folder that recsys_slm did not write) and record the config."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"output path {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
            raise FileExistsError(
                f"refusing to write into {out}: it is not empty and was not written by recsys-slm compress (no "
                f"{OUTPUT_MARKER}); choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / OUTPUT_MARKER).touch()
        tmp = out / f".{CONFIG_FILE}.tmp"
        save_config(self.cfg, tmp)
        tmp.replace(out / CONFIG_FILE)

    def stage(
        self, name: str, directory: Path, config: dict[str, Any], parents: list[Any], fn, force: bool
    ) -> dict:
        """Run ``fn`` (which writes ``directory``) unless ``directory`` is complete with the same hash.

        Returns:
            dict: the stage's record (``stage``, ``config_hash``, ``completed``, ``completed_ts``, ``seconds``).
        """
        digest = config_hash(name, _hashable(config), parents)
        pending = directory.parent / f".{directory.name}.pending.json"
        if not force:
            record = self._complete(name, directory, digest, pending)
            if record is not None:
                self.log(f"{name}: complete (config {digest}), skipped")
                self.skipped.append(name)
                return record
        work = work_dir(directory)
        previous = json.loads(pending.read_text()) if pending.is_file() else None
        if work.exists() and (force or previous is None or previous.get("config_hash") != digest):
            self.log(
                f"{name}: discarding checkpoint {work} ("
                + ("--from-stage" if force else "another config")
                + ")"
            )
            shutil.rmtree(work)
        resuming = work.exists()
        directory.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(pending, {"stage": name, "config_hash": digest, "started": time.time()})
        self.log(
            f"{name}: running (config {digest})" + (", resuming from its checkpoint" if resuming else "")
        )
        start = time.perf_counter()
        fn()
        now = time.time()
        record = {
            "stage": name,
            "config_hash": digest,
            "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "completed_ts": now,
            "seconds": round(time.perf_counter() - start, 2),
            "resumed": resuming,
        }
        _write_record(directory, record)
        pending.unlink(missing_ok=True)
        self.log(f"{name}: done in {record['seconds']:.1f} s -> {directory}")
        self.ran.append(name)
        return record

    def _complete(self, name: str, directory: Path, digest: str, pending: Path) -> dict | None:
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is None:
            return None
        record = manifest.get(RECORD_KEY)
        if record is not None:
            return record if record.get("config_hash") == digest else None
        # Killed after the stage wrote its directory but before the record: adopt it if the pending run made it.
        if pending.is_file():
            started = json.loads(pending.read_text())
            if started.get("config_hash") == digest and _created_ts(manifest) >= int(
                started.get("started", 0)
            ):
                now = time.time()
                record = {"stage": name, "config_hash": digest, "completed": manifest.get("created"),
                          "completed_ts": now, "seconds": None, "resumed": True}  # fmt: skip
                _write_record(directory, record)
                pending.unlink(missing_ok=True)
                return record
        return None

    # ------------------------------------------------------------------------------------------ inputs
    def prompt(self) -> PromptConfig:
        """The prompt of every stage: the config's, else the teacher manifest's, else the default."""
        from recsys_slm.evaluation.ranker_eval import resolve_prompt

        if self.cfg.prompt is not None:
            return self.cfg.prompt
        teacher = Path(self.cfg.teacher).expanduser()
        manifest = read_manifest(teacher) if teacher.is_dir() else None
        return resolve_prompt(PromptConfig(), manifest)[0]

    def teacher_stage(self) -> dict | None:
        """Stage ``00_teacher``: fine-tune the teacher into ``cfg.teacher`` unless it is there already (module
        docstring). Returns its record, or None without ``teacher_train``.

        Raises:
            ConfigError: the teacher directory holds a teacher trained with other keys.
        """
        from recsys_slm.ranker.train import TeacherTrainConfig, train_teacher

        if self.cfg.teacher_train is None:
            return None
        t_cfg = from_dict(TeacherTrainConfig, dict(self.cfg.teacher_train), prefix="teacher_train.")
        directory = Path(self.cfg.teacher)
        config = _hashable(config_to_dict(t_cfg))
        parents = [data_identity(self.data_dir)]
        digest = config_hash(TEACHER_STAGE, config, parents)
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is not None and (manifest.get(RECORD_KEY) or {}).get("config_hash") != digest:
            trained = {k: v for k, v in _hashable(manifest.get("config") or {}).items() if k not in ("out", "data_dir")}
            wanted = {k: v for k, v in config.items() if k not in ("out", "data_dir")}
            if trained != wanted:
                differ = sorted(k for k in set(trained) | set(wanted) if trained.get(k) != wanted.get(k))
                raise ConfigError(
                    f"teacher_train: {directory} already holds a teacher trained with other keys ({', '.join(differ)}"
                    "); pass another teacher=DIR to train a new one, or teacher_train=null to use this one as it is"
                )
            record = {"stage": TEACHER_STAGE, "config_hash": digest, "completed": manifest.get("created"),
                      "completed_ts": _created_ts(manifest), "seconds": None, "resumed": False, "adopted": True}  # fmt: skip
            _write_record(directory, record)
            self.log(f"{TEACHER_STAGE}: {directory} was trained with the same keys, adopted")
        return self.stage(TEACHER_STAGE, directory, config, parents, lambda: train_teacher(t_cfg), force=False)

    def ensure_default_data(self) -> None:
        """With ``data_dir`` unset, prepare the embedded default (MovieLens-100K, ``data prepare``'s defaults) into
        the cache unless it is there already, so a preset runs from a fresh clone; a given data_dir is never
        written."""
        from recsys_slm.data.prepare import DataPrepareConfig, is_prepared, prepare_dataset

        if self.cfg.data_dir is not None:
            return
        data_cfg = DataPrepareConfig()
        if data_cfg.resolved_out().expanduser().resolve() != self.data_dir or is_prepared(data_cfg):
            return
        if (self.data_dir / "tasks").is_dir():
            return  # prepared with other settings by the user: use it as it is
        print(f"[compress] data: preparing {data_cfg.dataset} into {self.data_dir}", flush=True)
        prepare_dataset(data_cfg)

    def check_inputs(self) -> None:
        from recsys_slm.models.packaged import PACKAGED_MODELS

        teacher = Path(self.cfg.teacher).expanduser()
        if self.cfg.teacher_train is None and not teacher.is_dir() and self.cfg.teacher not in PACKAGED_MODELS:
            raise FileNotFoundError(
                f"teacher {self.cfg.teacher} is not a model directory; train one (recsys-slm teacher train) and pass "
                "teacher=DIR, or add a teacher_train section so that compress trains it (docs/compress.md)"
            )
        if not (self.data_dir / "tasks").is_dir():
            raise FileNotFoundError(
                f"data_dir {self.data_dir} holds no prepared tasks/; run recsys-slm data prepare or pass data_dir=DIR"
            )

    def teacher_cache(self, prompt: PromptConfig) -> tuple[Path | None, Path | None]:
        """(teacher cache parquet, transfer set parquet) for the distillation stages; built once, shared."""
        from recsys_slm.distill.teacher_cache import TeacherScoreConfig, score_task
        from recsys_slm.distill.transfer_set import TransferSetConfig, build_transfer_set

        given_cache = self.cfg.distill.get("teacher_cache")
        given_ts = self.cfg.distill.get("transfer_set")
        if given_cache is not None:
            return Path(given_cache), Path(given_ts) if given_ts is not None else None
        c = self.cfg.cache
        if not c.enabled:
            return None, Path(given_ts) if given_ts is not None else None
        cache_dir = c.resolved_dir().expanduser().resolve()
        cache_dir.mkdir(parents=True, exist_ok=True)
        if given_ts is not None:
            task = Path(given_ts)
            task_id = {"transfer_set": str(Path(task).resolve()), "mtime_ns": Path(task).stat().st_mtime_ns}
        else:
            ts_cfg = TransferSetConfig(data_dir=self.data_dir, max_labelled=c.max_labelled, extra_pairs=c.extra_pairs,
                                       seed=c.seed)  # fmt: skip
            task_id = {**config_to_dict(ts_cfg), "data": data_identity(self.data_dir)}
            task = cache_dir / f"transfer-{config_hash(task_id)}.parquet"
            if not task.is_file():
                frame, summary = build_transfer_set(ts_cfg)
                tmp = task.with_name(task.name + ".tmp")
                frame.to_parquet(tmp, index=False)
                tmp.replace(task)
                self.log(f"cache: transfer set {task.name}: {summary['labelled']} labelled + "
                         f"{summary['teacher_labelled']} teacher-labelled records")  # fmt: skip
        score_id = {"task": task_id, "teacher": model_identity(self.cfg.teacher), "top_k": c.top_k,
                    "temperature": c.temperature, "prompt": config_to_dict(prompt)}  # fmt: skip
        scores = cache_dir / f"scores-{config_hash(score_id)}.parquet"
        start = time.perf_counter()
        summary = score_task(
            TeacherScoreConfig(model=self.cfg.teacher, task=task, out=scores, data_dir=self.data_dir, prompt=prompt,
                               top_k=c.top_k, temperature=c.temperature, batch_size=c.batch_size,
                               device=self.cfg.device),
            progress=bool(self.cfg.distill.get("progress", True)),
        )  # fmt: skip
        state = "scored now" if summary.get("scored_now") else "warm"
        self.log(f"cache: teacher scores {scores.name} ({summary['records']} records, {state}, "
                 f"{time.perf_counter() - start:.1f} s)")  # fmt: skip
        return scores, task

    # ------------------------------------------------------------------------------------------ stage configs
    def _train_config(self, section: dict[str, Any], prefix: str, **fixed: Any) -> DistillConfig:
        data = merge_dicts(TRAIN_DEFAULTS, section)
        data.setdefault("device", self.cfg.device)
        data.update({k: v for k, v in fixed.items()})
        data["data_dir"] = str(self.data_dir)
        return from_dict(DistillConfig, data, prefix=prefix)

    def distill_config(self, prompt, cache, transfer) -> DistillConfig:
        section = dict(self.cfg.distill)
        section.setdefault("prompt", config_to_dict(prompt))
        return self._train_config(section, "distill.", teacher=self.cfg.teacher, out=str(self.out / STAGES[0]),
                                  teacher_cache=str(cache) if cache else None,
                                  transfer_set=str(transfer) if transfer else None)  # fmt: skip

    def redistill_config(self, prompt, cache, transfer, start: Path, source: str, out: Path) -> DistillConfig:
        section = merge_dicts(
            dict(self.cfg.distill), {k: v for k, v in self.cfg.redistill.items() if k != "teacher_source"}
        )
        section.setdefault("prompt", config_to_dict(prompt))
        section["student"] = {"init": "model", "source": str(start)}
        if source == "teacher":
            teacher, t_cache, t_set = self.cfg.teacher, cache, transfer
        else:  # the stage-1 student, online, on the same records
            teacher, t_cache, t_set = (
                str(self.out / STAGES[0]),
                None,
                transfer if transfer is not None else cache,
            )
        return self._train_config(section, "redistill.", teacher=teacher, out=str(out),
                                  teacher_cache=str(t_cache) if t_cache else None,
                                  transfer_set=str(t_set) if t_set else None)  # fmt: skip

    def prune_config(self, prompt, model: str, out: Path, **keys: Any) -> PruneConfig:
        data = dict(self.cfg.prune)
        data.setdefault("device", self.cfg.device)
        data.setdefault("prompt", config_to_dict(prompt))
        data.update(keys)
        data.update(model=model, out=str(out), data_dir=str(self.data_dir))
        return from_dict(PruneConfig, data, prefix="prune.")

    # ------------------------------------------------------------------------------------------ regrowth
    def regrow_dir(self, pruned: Path, donor_dir: Path, out: Path, prompt: PromptConfig, seed: int) -> None:
        import torch

        from recsys_slm.compress.regrow import regrow
        from recsys_slm.distill.student import keep_layers
        from recsys_slm.models.layers import decoder_layers
        from recsys_slm.models.loading import load_causal_lm

        model, tokenizer = load_causal_lm(pruned, device="cpu", dtype=torch.float32)
        donor, _ = load_causal_lm(donor_dir, device="cpu", dtype=torch.float32)
        removed = set(((read_manifest(pruned) or {}).get("metrics") or {}).get("removed_layers") or [])
        if removed:
            keep_layers(donor, [i for i in range(len(decoder_layers(donor))) if i not in removed])
        summary = regrow(model, self.cfg.regrow, donor=donor, init=self.cfg.regrow_init, seed=seed)
        config = {"fraction": self.cfg.regrow, "init": self.cfg.regrow_init, "seed": seed, "model": str(pruned),
                  "donor": str(donor_dir), "prompt": config_to_dict(prompt)}  # fmt: skip
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp, "regrow", config=config, parent=str(pruned), metrics=summary)

    # ------------------------------------------------------------------------------------------ ablations
    def ablations(self, prompt, cache, transfer, d_cfg: DistillConfig, r_cfg: DistillConfig, start: Path,
                  start_record: dict, rec1: dict, rec3: dict) -> list[ModelEntry]:  # fmt: skip
        wanted = list(self.cfg.ablations)
        if not wanted:
            return []
        force = self.forced("ablations")
        root = self.out / "ablations"
        final = self.out / STAGES[2]
        source = d_cfg.student.source or self.cfg.teacher
        entries: list[ModelEntry] = []
        steps = self._ablation_steps(d_cfg, r_cfg)
        prune_only = None
        if "prune_only" in wanted or "prune_sft" in wanted:
            keys = _matching_prune_keys(source, final, self.cfg.prune)
            p_cfg = self.prune_config(prompt, str(source), root / "prune_only", **keys)
            rec = self.stage("ablation prune_only", root / "prune_only", config_to_dict(p_cfg),
                             [_token(rec3), model_identity(str(source))], lambda: prune(p_cfg), force)  # fmt: skip
            prune_only = rec
            if "prune_only" in wanted:
                entries.append(ModelEntry("prune_only", str(root / "prune_only"), _token(rec), "ablation"))
        base = merge_dicts(dict(self.cfg.distill), dict(self.cfg.ablation_train))
        base.setdefault("prompt", config_to_dict(prompt))
        if steps is not None:
            base["max_steps"] = steps
        if "prune_sft" in wanted:
            section = copy.deepcopy(base)
            section["objective"] = {**section.get("objective", {}), "loss": "sft", "hidden_weight": 0.0}
            section["sources"] = ["labelled"]
            section["on_policy"] = {**section.get("on_policy", {}), "enabled": False}
            section["student"] = {"init": "model", "source": str(root / "prune_only")}
            s_cfg = self._train_config(section, "ablation_train.", teacher=self.cfg.teacher,
                                       out=str(root / "prune_sft"), teacher_cache=str(cache) if cache else None,
                                       transfer_set=str(transfer) if transfer else None)  # fmt: skip
            rec = self.stage("ablation prune_sft", root / "prune_sft", config_to_dict(s_cfg), [_token(prune_only)],
                             lambda: distill(s_cfg), force)  # fmt: skip
            entries.append(ModelEntry("prune_sft", str(root / "prune_sft"), _token(rec), "ablation"))
        if "distill_only" in wanted:
            section = copy.deepcopy(base)
            student = dict(section.get("student", {}))
            student.update(init="teacher_layers", num_layers=_matching_depth(source, final))
            if student.get("selection") == "explicit":
                student.update(selection="evenly", layers=[])
            section["student"] = student
            o_cfg = self._train_config(section, "ablation_train.", teacher=self.cfg.teacher,
                                       out=str(root / "distill_only"), teacher_cache=str(cache) if cache else None,
                                       transfer_set=str(transfer) if transfer else None)  # fmt: skip
            rec = self.stage("ablation distill_only", root / "distill_only", config_to_dict(o_cfg),
                             [_token(rec3), model_identity(self.cfg.teacher)], lambda: distill(o_cfg), force)  # fmt: skip
            entries.append(ModelEntry("distill_only", str(root / "distill_only"), _token(rec), "ablation"))
        if "redistill_other_teacher" in wanted:
            other = "distill" if self.cfg.redistill["teacher_source"] == "teacher" else "teacher"
            name = f"redistill_from_{other}"
            x_cfg = self.redistill_config(prompt, cache, transfer, start, other, root / name)
            parents = [_token(start_record), _token(rec1), model_identity(self.cfg.teacher)]
            rec = self.stage(f"ablation {name}", root / name, config_to_dict(x_cfg), parents, lambda: distill(x_cfg),
                             force)  # fmt: skip
            entries.append(ModelEntry(name, str(root / name), _token(rec), "ablation"))
        return entries

    def _ablation_steps(self, d_cfg: DistillConfig, r_cfg: DistillConfig) -> int | None:
        if "max_steps" in self.cfg.ablation_train:
            return None  # the user's value is in the section already
        if d_cfg.max_steps > 0 and r_cfg.max_steps > 0:
            return d_cfg.max_steps + r_cfg.max_steps
        return None

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_settings(self, prompt: PromptConfig) -> dict[str, Any]:
        e = self.cfg.eval
        return {
            "pointwise_task": str(self.pointwise_task()) if e.pointwise else None,
            "candidates_task": str(self.candidates_task()) if e.candidates else None,
            "pointwise_max_records": e.pointwise_max_records,
            "candidates_max_records": e.candidates_max_records,
            "batch_size": e.batch_size,
            "prompt": config_to_dict(prompt),
            "data_dir": str(self.data_dir),
        }

    def pointwise_task(self) -> Path:
        e = self.cfg.eval
        return (
            Path(e.pointwise_task)
            if e.pointwise_task
            else self.data_dir / "tasks" / "pointwise" / "test.parquet"
        )

    def candidates_task(self) -> Path:
        e = self.cfg.eval
        return (
            Path(e.candidates_task)
            if e.candidates_task
            else self.data_dir / "tasks" / "candidates" / "test.parquet"
        )

    def evaluate(self, name: str, model_dir: str | None, token: Any, prompt: PromptConfig) -> dict[str, Any]:
        """AUC (pointwise) and NDCG@10 etc. (candidates) of one model, or of the baselines (model_dir None), with
        the ranker evaluation harness; kept in ``OUT/eval/<name>/`` and reused while the model is unchanged."""
        from recsys_slm.evaluation.ranker_eval import RankerEvalConfig, evaluate_ranker

        settings = self.eval_settings(prompt)
        key = config_hash(settings, token, data_identity(self.data_dir))
        directory = self.out / "eval" / name
        stored = directory / EVAL_FILE
        if stored.is_file() and self.from_step != "eval":
            data = json.loads(stored.read_text())
            if data.get("key") == key:
                self.log(f"eval {name}: unchanged, reused")
                return data["metrics"]
        e = self.cfg.eval
        self.log(f"eval {name}: scoring the test tasks")
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        with atomic_dir(directory) as tmp:
            for kind, enabled, task, limit in (
                ("pointwise", e.pointwise, self.pointwise_task(), e.pointwise_max_records),
                ("candidates", e.candidates, self.candidates_task(), e.candidates_max_records),
            ):
                if not enabled:
                    continue
                report = evaluate_ranker(RankerEvalConfig(
                    model=model_dir, task=task, out=tmp / kind, data_dir=self.data_dir, batch_size=e.batch_size,
                    max_records=limit, baselines=model_dir is None, device=self.cfg.device, prompt=prompt))  # fmt: skip
                for method, values in report["metrics"].items():
                    metrics.setdefault(method, {})
                    metrics[method].update({k: v for k, v in values.items()})
                metrics.setdefault("_records", {})[kind] = report["task"]["records"]
            write_json_atomic(tmp / EVAL_FILE, {"key": key, "model_dir": model_dir, "settings": settings,
                                                "metrics": metrics})  # fmt: skip
        self.log(f"eval {name}: done in {time.perf_counter() - start:.1f} s")
        return metrics


def _read_config(spec: str | Path):
    from transformers import AutoConfig

    from recsys_slm.models.loading import resolve_model_path

    try:  # registers the non-uniform / low-rank model types when the installed version has them
        import recsys_slm.models.compressed  # noqa: F401
    except ImportError:
        pass
    return AutoConfig.from_pretrained(str(resolve_model_path(spec)))


def _meta_params(config) -> tuple[int, int, int]:
    """(non-embedding params, params per decoder layer, non-embedding params outside the layers) of a model
    built from ``config`` on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from recsys_slm.models.layers import decoder_layers
    from recsys_slm.prune.structure import non_embedding_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = non_embedding_params(model)
    layers = decoder_layers(model)
    in_layers = sum(p.numel() for p in layers.parameters())
    return total, in_layers // max(1, len(layers)), total - in_layers


def _widths(config) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    return {
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "intermediate": int(config.intermediate_size),
    }


def _matching_prune_keys(source: str, final: Path, prune_section: dict[str, Any]) -> dict[str, Any]:
    """PruneConfig keys that cut ``source`` to the widths and depth of the final model (same final size)."""
    src, dst = _widths(_read_config(source)), _widths(_read_config(final))
    keys: dict[str, Any] = {
        "heads_keep": min(1.0, dst["heads"] / src["heads"]),
        "neurons_keep": min(1.0, dst["intermediate"] / src["intermediate"]),
        "layers_keep": 1.0 if dst["layers"] >= src["layers"] else (dst["layers"] - 0.5) / src["layers"],
        "head_mode": "kv_groups"
        if dst["kv_heads"] < src["kv_heads"]
        else prune_section.get("head_mode", "query_heads"),
    }
    available = stage_fields("PruneConfig")
    for key, value in (("param_budget", None), ("uniform", True), ("uniformize", "none")):
        if key in available:
            keys[key] = value
    return keys


def _matching_depth(source: str, final: Path) -> int:
    """Decoder blocks of ``source`` whose non-embedding parameters come closest to the final model's."""
    src_config = _read_config(source)
    _, per_layer, outside = _meta_params(src_config)
    target, _, _ = _meta_params(_read_config(final))
    depth = int(round((target - outside) / max(1, per_layer)))
    return max(1, min(int(src_config.num_hidden_layers), depth))


# ------------------------------------------------------------------------------------------------- main
def compress(cfg: CompressConfig, from_stage: str | None = None) -> dict[str, Any]:
    """Run the pipeline (module docstring) and return the report (the content of ``OUT/report.json``).

    Args:
        cfg (CompressConfig): the resolved config.
        from_stage (str | None): redo this step and every later one: 01_distill | 02_prune | 03_redistill (or
            distill | prune | redistill) | ablations | eval. None = resume / skip what is complete.

    Raises:
        ConfigError: a bad ``from_stage`` or a key only the stages can reject.
        FileNotFoundError: no teacher directory or no prepared data.
    """
    from recsys_slm.compress.report import build_report, write_report

    run = _Run(cfg, from_stage)
    run.ensure_default_data()
    run.check_inputs()
    run.prepare_out()
    run.log(
        f"start: teacher {cfg.teacher} -> {run.out}"
        + (f" (from stage {run.from_step})" if run.from_step else "")
    )
    rec0 = run.teacher_stage()
    prompt = run.prompt()
    cache, transfer = run.teacher_cache(prompt)
    teacher_id = model_identity(cfg.teacher)

    d_cfg = run.distill_config(prompt, cache, transfer)
    rec1 = run.stage(STAGES[0], run.out / STAGES[0], config_to_dict(d_cfg), [teacher_id, data_identity(run.data_dir)],
                     lambda: distill(d_cfg), run.forced(STAGES[0]))  # fmt: skip
    p_cfg = run.prune_config(prompt, str(run.out / STAGES[0]), run.out / STAGES[1])
    rec2 = run.stage(STAGES[1], run.out / STAGES[1], config_to_dict(p_cfg), [_token(rec1)], lambda: prune(p_cfg),
                     run.forced(STAGES[1]))  # fmt: skip
    start, start_record = run.out / STAGES[1], rec2
    if cfg.regrow > 0:
        seed = d_cfg.seed
        regrow_config = {"fraction": cfg.regrow, "init": cfg.regrow_init, "seed": seed}
        start_record = run.stage(
            REGROW_DIR, run.out / REGROW_DIR, regrow_config, [_token(rec2), _token(rec1)],
            lambda: run.regrow_dir(run.out / STAGES[1], run.out / STAGES[0], run.out / REGROW_DIR, prompt, seed),
            run.forced(STAGES[2]),
        )  # fmt: skip
        start = run.out / REGROW_DIR
    source = cfg.redistill["teacher_source"]
    r_cfg = run.redistill_config(prompt, cache, transfer, start, source, run.out / STAGES[2])
    parents = [_token(start_record), teacher_id] + ([_token(rec1)] if source == "distill" else [])
    rec3 = run.stage(STAGES[2], run.out / STAGES[2], config_to_dict(r_cfg), parents, lambda: distill(r_cfg),
                     run.forced(STAGES[2]))  # fmt: skip
    ablations = run.ablations(prompt, cache, transfer, d_cfg, r_cfg, start, start_record, rec1, rec3)

    models = [
        ModelEntry("teacher", cfg.teacher, teacher_id, "stage"),
        ModelEntry("distill", str(run.out / STAGES[0]), _token(rec1), "stage"),
        ModelEntry("prune", str(run.out / STAGES[1]), _token(rec2), "stage"),
        ModelEntry("redistill", str(run.out / STAGES[2]), _token(rec3), "stage"),
        *ablations,
    ]
    quality = {m.name: run.evaluate(m.name, m.model_dir, m.token, prompt) for m in models}
    baselines = run.evaluate("baselines", None, {"baselines": True}, prompt) if cfg.eval.baselines else {}
    report = build_report(run, models, quality, baselines, prompt, {
        "teacher": rec0, "distill": rec1, "prune": rec2, "regrow": start_record if cfg.regrow > 0 else None, "redistill": rec3})  # fmt: skip
    write_report(run.out, report)
    run.log(f"report: {run.out / 'report.json'}, {run.out / 'report.md'}")
    return report
