"""``recsys-slm compress`` on tiny models: the pipeline end to end, skip / resume / --from-stage, config errors, and
function-preserving regrowth."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recsys_slm.cli import main
from recsys_slm.compress.config import CompressConfig
from recsys_slm.compress.regrow import regrow, regrow_counts
from recsys_slm.config import ConfigError, from_dict, load_config
from recsys_slm.model_dir import read_manifest
from recsys_slm.models.layers import decoder_layers
from recsys_slm.models.tiny import build_tiny_causal_lm
from recsys_slm.prune.structure import prune_attention_heads, prune_mlp_neurons, sync_config
from recsys_slm.training.loop import work_dir

PROMPT = {"system": "Recommender.", "instruction": "Like it?", "max_tokens": 400}
STAGE_DIRS = ("01_distill", "02_prune", "02_regrow", "03_redistill")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is faster than two fighting over shared cores (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ regrowth
def _pruned(arch: str, tmp_path: Path):
    """A tiny model (4 heads / 2 KV groups, MLP 128) and a copy pruned to 1 head per group and 64 neurons."""
    donor = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path / arch, seed=3, arch=arch))
    donor.eval()
    model = copy.deepcopy(donor)
    for layer in decoder_layers(model):
        prune_attention_heads(layer.self_attn, [1, 2])  # head 1 of group 0, head 2 of group 1
        prune_mlp_neurons(layer.mlp, list(range(0, 128, 2)))
    sync_config(model)
    return donor, model


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_regrow_keeps_the_function_and_adds_the_expected_parameters(arch, tmp_path):
    donor, model = _pruned(arch, tmp_path)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    n_before = _params(model)
    summary = regrow(model, 1.0, donor=donor)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # per layer: 2 heads × 16 dims × 64 (q rows) + 64 × 32 (o columns) [+ 32 q bias for Qwen2]; 64 neurons × 64 × 3
    per_layer = 2 * 16 * 64 * 2 + (32 if arch == "qwen2" else 0) + 64 * 64 * 3
    assert _params(model) - n_before == summary["params_added"] == 2 * per_layer
    assert summary["widths_after"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128}
    assert summary["heads_copied"] == 4 and summary["neurons_copied"] == 128
    # copied rows are exactly the donor's removed heads / neurons; their output columns start at zero
    for layer, d_layer in zip(decoder_layers(model), decoder_layers(donor), strict=True):
        q = {tuple(b.flatten().tolist()) for b in layer.self_attn.q_proj.weight.split(16)}
        assert q == {tuple(b.flatten().tolist()) for b in d_layer.self_attn.q_proj.weight.split(16)}
        assert layer.self_attn.o_proj.weight[:, 16:32].abs().sum() == 0  # group 0's new head
        assert layer.mlp.down_proj.weight[:, 64:].abs().sum() == 0
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 128)
    model.save_pretrained(tmp_path / "regrown")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "regrown")  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, after, atol=1e-6, rtol=0)


def test_regrow_partial_random_and_gradients_reach_the_new_units(tmp_path):
    _, model = _pruned("llama", tmp_path)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    n_before = _params(model)
    summary = regrow(model, 0.5, original_heads=4, original_intermediate=128, seed=0)
    # heads: 0.5 × 2 removed / 2 groups = 0.5 → 1 per group (half up, at most 2 // 2); neurons: 0.5 × 64 = 32
    assert summary["heads_added_per_layer"] == 2 and summary["neurons_added_per_layer"] == 32
    assert summary["heads_random"] == 4 and summary["neurons_random"] == 64
    assert _params(model) - n_before == 2 * (2 * 16 * 64 * 2 + 32 * 64 * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)
    model.train()
    model(ids).logits.sum().backward()
    layer = decoder_layers(model)[0]
    assert layer.self_attn.o_proj.weight.grad[:, 16:32].abs().sum() > 0
    assert layer.mlp.down_proj.weight.grad[:, 64:].abs().sum() > 0


def test_regrow_counts_and_errors(tmp_path):
    assert regrow_counts(6, 3, 600, 9, 1536, 0.5) == (1, 468)  # 0.5 × 3 removed / 3 groups = 0.5, rounded half up
    assert regrow_counts(6, 3, 600, 9, 1536, 0.3) == (0, 281)
    assert regrow_counts(6, 3, 600, 9, 1536, 1.0) == (1, 936)
    assert regrow_counts(4, 2, 64, 6, 128, 0.0) == (0, 0)
    assert regrow_counts(6, 2, 64, 9, 128, 1.0)[0] == 1  # kv_groups pruning: never above the original 9 heads
    _, model = _pruned("llama", tmp_path)
    with pytest.raises(ValueError, match="original widths"):
        regrow(model, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        regrow(model, 1.5, original_heads=4, original_intermediate=128)


# ------------------------------------------------------------------------------------------------ config
def _config(teacher: Path, data_dir: Path, out: Path, cache_dir: Path, **kw) -> dict:
    values = {
        "teacher": str(teacher),
        "out": str(out),
        "data_dir": str(data_dir),
        "device": "cpu",
        "prompt": PROMPT,
        "cache": {"dir": str(cache_dir), "extra_pairs": 6, "top_k": 4, "batch_size": 8},
        "distill": {"student": {"num_layers": 2}, "batch_size": 4, "max_steps": 3, "eval_every": 0,
                    "checkpoint_every": 1, "lr": 1e-3, "warmup_ratio": 0.0, "progress": False},
        "prune": {"method": "magnitude", "heads_keep": 0.5, "neurons_keep": 0.5, "calibration_records": 8,
                  "eval_records": 0, "batch_size": 8},
        "redistill": {"max_steps": 3},
        "regrow": 0.5,
        "eval": {"speed_records": 8, "speed_batch_size": 4, "latency_requests": 3, "candidates_max_records": 5,
                 "batch_size": 8},
        "ablation_train": {"max_steps": 2},
        "note": "tiny random models: not a measurement",
    }  # fmt: skip
    values.update(kw)
    return values


def test_bad_keys_name_the_key(tmp_path):
    base = {"teacher": str(tmp_path / "t"), "out": str(tmp_path / "o")}
    cases = [
        ({"distill": {"objective": {"los": "sft"}}}, "distill.objective.los"),
        ({"distill": {"lr": -1}}, "distill.lr"),
        ({"distill": {"teacher": "x"}}, "distill.teacher"),
        ({"prune": {"heads_keep": 2.0}}, "prune.heads_keep"),
        ({"prune": {"metod": "magnitude"}}, "prune.metod"),
        ({"redistill": {"teacher_source": "student"}}, "redistill.teacher_source"),
        ({"redistill": {"student": {"init": "model"}}}, "redistill.student"),
        ({"redistill": {"max_stepz": 3}}, "redistill.max_stepz"),
        ({"ablations": ["prune_only", "distill_oly"]}, "ablations[1]"),
        ({"regrow": 1.5}, "regrow"),
        ({"eval": {"speed_records": 0}}, "eval.speed_records"),
        ({"eval": {"bootstrap_resamples": 10}}, "eval.bootstrap_resamples"),
        ({"cache": {"top_k": -1}}, "cache.top_k"),
        ({"ablation_train": {"student": {}}}, "ablation_train.student"),
        ({"teacher": ""}, "teacher"),
        ({"unknown_key": 1}, "unknown_key"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            from_dict(CompressConfig, {**base, **extra})
    from recsys_slm.compress.pipeline import compress

    with pytest.raises(ConfigError, match="--from-stage"):
        compress(from_dict(CompressConfig, base), from_stage="04_deploy")
    # overrides reach the sections and are normalised to plain values
    cfg = load_config(CompressConfig, None, [f"teacher={tmp_path / 't'}", "distill.max_steps=7",
                                             "redistill.teacher_source=distill", "prune.method=magnitude"])  # fmt: skip
    assert cfg.distill == {"max_steps": 7} and cfg.prune == {"method": "magnitude"}
    assert cfg.redistill == {"teacher_source": "distill"}


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("teacher") / "teacher", seed=5, num_layers=4)


def _log(out: Path) -> str:
    return (out / "compress.log").read_text()


def test_pipeline_end_to_end_skip_and_from_stage(teacher_dir, tiny_data_dir, tmp_path, capsys):
    from pipelines import compress as compress_job
    from recsys_slm.compress.pipeline import compress

    out = tmp_path / "run"
    values = _config(teacher_dir, tiny_data_dir, out, tmp_path / "cache",
                     ablations=["prune_sft", "distill_only", "prune_only", "redistill_other_teacher"])  # fmt: skip
    report = compress(from_dict(CompressConfig, values))

    assert [s["name"] for s in report["stages"]] == ["teacher", "distill", "prune", "redistill"]
    assert [a["name"] for a in report["ablations"]] == ["prune_only", "prune_sft", "distill_only",
                                                        "redistill_from_distill"]  # fmt: skip
    assert {b["name"] for b in report["baselines"]} >= {"logreg", "popularity"}
    for entry in report["stages"] + report["ablations"]:
        m = entry["metrics"]
        assert 0 <= m["auc"] <= 1 and 0 <= m["ndcg@10"] <= 1, entry["name"]
        assert m["items_per_s"] > 0 and 0 < m["latency_p50_ms"] <= m["latency_p99_ms"]
        assert entry["params"] > entry["non_embedding_params"] > 0
    by = {s["name"]: s for s in report["stages"] + report["ablations"]}
    assert by["distill"]["layers"] == 2 and by["teacher"]["layers"] == 4
    assert by["prune"]["widths"]["heads"] == 2 and by["prune"]["widths"]["intermediate"] == 64
    # regrow 0.5: +1 head per KV group, +32 neurons
    assert by["redistill"]["widths"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 96}
    assert by["prune"]["non_embedding_params"] < by["redistill"]["non_embedding_params"] < by["distill"]["non_embedding_params"]
    # ablations at the final size
    assert by["prune_only"]["widths"] == by["redistill"]["widths"] and by["prune_only"]["layers"] == 2
    assert by["prune_sft"]["non_embedding_params"] == by["redistill"]["non_embedding_params"]
    assert by["distill_only"]["layers"] == 2  # 2 of 4 blocks come closest to the final size
    assert by["prune_sft"]["train"]["steps"] == 2 and by["redistill"]["train"]["steps"] == 3
    assert report["final"]["vs_teacher"]["non_embedding_param_ratio"] < 0.5
    assert len(report["final"]["checks"]) == 3 + 4
    # paired bootstrap intervals of the AUC checks, from the evaluations' predictions (same records)
    iv = report["final"]["intervals"]
    assert set(iv) == {"method", "teacher", "prune_only", "prune_sft", "distill_only", "redistill_from_distill"}
    assert iv["teacher"]["ratio"] == pytest.approx(report["final"]["vs_teacher"]["auc_ratio"])
    auc_checks = [c for c in report["final"]["checks"] if "AUC" in c["check"]]
    assert len(auc_checks) == 5 and all(len(c["interval"]) == 2 for c in auc_checks)
    for a in ("prune_only", "distill_only"):
        assert iv[a]["diff"] == pytest.approx(by["redistill"]["metrics"]["auc"] - by[a]["metrics"]["auc"])

    saved = json.loads((out / "report.json").read_text())
    assert saved["stages"][3]["metrics"]["auc"] == report["stages"][3]["metrics"]["auc"]
    assert {"name", "model_dir", "params", "non_embedding_params", "metrics"} <= set(saved["stages"][0])
    assert "| redistill |" in (out / "report.md").read_text()
    assert (out / "quality_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("teacher", "redistill"):
        assert {"predictions.parquet", "run.trec", "qrels.trec"} <= {p.name for p in (out / "eval" / name / "candidates").iterdir()}
        assert (out / "eval" / name / "pointwise" / "predictions.parquet").is_file()
    for stage in STAGE_DIRS:
        manifest = read_manifest(out / stage)
        assert manifest["compress"]["stage"] == stage and not work_dir(out / stage).exists()
        AutoModelForCausalLM.from_pretrained(out / stage)  # stock transformers
    assert read_manifest(out / "03_redistill")["parent"] == str(teacher_dir)
    assert read_manifest(out / "03_redistill")["config"]["student"]["source"] == str(out / "02_regrow")
    assert not list(out.glob(".*pending*")) and not list(out.glob(".*.tmp-*"))

    # rerun (through the pipelines job): every stage and evaluation complete -> skipped, nothing rewritten
    completed = {s: read_manifest(out / s)["compress"]["completed_ts"] for s in STAGE_DIRS}
    (tmp_path / "all.yaml").write_text(json.dumps({k: v for k, v in values.items() if k != "out"}))
    assert compress_job.cli(["--config", str(tmp_path / "all.yaml"), f"out={out}"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert set(again["run"]["ran"]) == set() and len(again["run"]["skipped"]) == 4 + 4
    assert {s: read_manifest(out / s)["compress"]["completed_ts"] for s in STAGE_DIRS} == completed
    assert _log(out).count("01_distill: complete") == 1 and "eval redistill: unchanged, reused" in _log(out)
    for a, b in zip(report["stages"] + report["ablations"], again["stages"] + again["ablations"], strict=True):
        assert a["metrics"]["auc"] == b["metrics"]["auc"] and a["metrics"]["ndcg@10"] == b["metrics"]["ndcg@10"]

    # --from-stage 03_redistill through the CLI (without the ablations, to stay fast): 01/02 kept, regrow + 03 redone
    (out / "cli.yaml").write_text(json.dumps({k: v for k, v in values.items() if k not in ("out", "ablations")}))
    capsys.readouterr()
    assert main(["compress", "--config", str(out / "cli.yaml"), "--out", str(out), "--from-stage", "redistill"]) == 0
    printed = capsys.readouterr().out
    assert "redistill" in printed and "non_embedding_params / teacher" in printed
    third = json.loads((out / "report.json").read_text())
    assert third["run"]["from_stage"] == "03_redistill"
    assert set(third["run"]["skipped"]) == {"01_distill", "02_prune"}
    assert third["run"]["ran"] == ["02_regrow", "03_redistill"] and third["ablations"] == []
    for s in ("01_distill", "02_prune"):
        assert read_manifest(out / s)["compress"]["completed_ts"] == completed[s]
    for s in ("02_regrow", "03_redistill"):
        assert read_manifest(out / s)["compress"]["completed_ts"] > completed[s]
    # deterministic training: the redone final model scores the same
    assert third["stages"][3]["metrics"]["auc"] == pytest.approx(report["stages"][3]["metrics"]["auc"], abs=1e-3)


def test_killed_stage_resumes_from_its_checkpoint(teacher_dir, tiny_data_dir, tmp_path, monkeypatch):
    from recsys_slm.compress import pipeline

    values = _config(teacher_dir, tiny_data_dir, tmp_path / "full", tmp_path / "cache", regrow=0.0,
                     redistill={"max_steps": 4}, eval={"speed_records": 4, "latency_requests": 2, "candidates": False,
                                                       "baselines": False})  # fmt: skip
    full = pipeline.compress(from_dict(CompressConfig, values))

    real = pipeline.distill
    calls = []

    def killed_in_stage_3(cfg, stop_after_step=None):
        calls.append(cfg.resolved_out().name)
        if cfg.resolved_out().name == "03_redistill" and calls.count("03_redistill") == 1:
            return real(cfg, stop_after_step=3)  # killed after step 3 (checkpoints every step)
        return real(cfg)

    monkeypatch.setattr(pipeline, "distill", killed_in_stage_3)
    killed = {**values, "out": str(tmp_path / "killed")}
    with pytest.raises(KeyboardInterrupt):
        pipeline.compress(from_dict(CompressConfig, killed))
    out = tmp_path / "killed"
    assert (work_dir(out / "03_redistill") / "checkpoint-last").is_dir() and (out / ".03_redistill.pending.json").is_file()
    resumed = pipeline.compress(from_dict(CompressConfig, killed))
    assert resumed["run"]["skipped"] == ["01_distill", "02_prune"] and resumed["run"]["ran"] == ["03_redistill"]
    assert "03_redistill: running" in _log(out) and "resuming from its checkpoint" in _log(out)
    assert read_manifest(out / "03_redistill")["compress"]["resumed"] is True
    for a, b in zip(full["stages"], resumed["stages"], strict=True):
        assert b["metrics"]["auc"] == pytest.approx(a["metrics"]["auc"], abs=1e-3), a["name"]

    # killed after 03 wrote its directory but before the pipeline recorded it: adopted, not redone
    manifest = read_manifest(out / "03_redistill")
    record = manifest.pop("compress")
    (out / "03_redistill" / "recsys_slm.json").write_text(json.dumps(manifest))
    (out / ".03_redistill.pending.json").write_text(json.dumps({"config_hash": record["config_hash"],
                                                                "started": record["completed_ts"] - 60}))  # fmt: skip
    adopted = pipeline.compress(from_dict(CompressConfig, killed))
    assert adopted["run"]["ran"] == [] and "03_redistill" in adopted["run"]["skipped"]
    assert read_manifest(out / "03_redistill")["compress"]["config_hash"] == record["config_hash"]
    assert not (out / ".03_redistill.pending.json").exists()


def test_pipeline_with_osscar_pruning_and_regrowth(teacher_dir, tiny_data_dir, tmp_path):
    """OSSCAR refits o_proj / down_proj, so regrowth must find removed units from q / gate / up rows only; the
    regrown model still computes the pruned model's function."""
    from recsys_slm.compress.pipeline import compress

    out = tmp_path / "run"
    values = _config(teacher_dir, tiny_data_dir, out, tmp_path / "cache", ablations=[],
                     prune={"method": "osscar", "heads_keep": 0.5, "neurons_keep": 0.5, "calibration_records": 8,
                            "eval_records": 0, "batch_size": 8},
                     eval={"speed_records": 4, "latency_requests": 2, "candidates": False, "baselines": False})  # fmt: skip
    report = compress(from_dict(CompressConfig, values))
    by = {s["name"]: s for s in report["stages"]}
    assert by["prune"]["widths"]["intermediate"] == 64
    assert by["redistill"]["widths"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 96}
    assert read_manifest(out / "02_prune")["config"]["method"] == "osscar"
    pruned = AutoModelForCausalLM.from_pretrained(out / "02_prune").eval()
    regrown = AutoModelForCausalLM.from_pretrained(out / "02_regrow").eval()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(regrown(ids).logits, pruned(ids).logits, atol=1e-5, rtol=0)


def _teacher_keys(base: Path) -> dict:
    return {"model": str(base), "freeze_layers": 0, "batch_size": 4, "max_steps": 2, "eval_every": 0,
            "checkpoint_every": 1, "lr": 1e-3, "warmup_ratio": 0.0, "progress": False, "prompt": PROMPT}  # fmt: skip


def test_teacher_stage_trains_reuses_adopts_and_never_overwrites(teacher_dir, tiny_data_dir, tmp_path):
    """teacher_train: stage 00_teacher fine-tunes the teacher first, is skipped on the rerun, adopts a teacher that
    `teacher train` made with the same keys, and refuses to overwrite one trained with other keys."""
    from recsys_slm.compress.pipeline import compress, model_identity
    from recsys_slm.ranker.train import TeacherTrainConfig, train_teacher

    teacher = tmp_path / "teacher"
    values = _config(teacher, tiny_data_dir, tmp_path / "run", tmp_path / "cache", regrow=0.0, ablations=[],
                     teacher_train=_teacher_keys(teacher_dir),
                     eval={"speed_records": 4, "latency_requests": 2, "candidates": False, "baselines": False})  # fmt: skip
    cfg = from_dict(CompressConfig, values)
    assert cfg.teacher == str(teacher) and cfg.teacher_train["out"] == str(teacher)
    assert cfg.teacher_train["data_dir"] == str(tiny_data_dir)
    report = compress(cfg)
    assert report["run"]["ran"][0] == "00_teacher" and report["stage_records"]["teacher"]["stage"] == "00_teacher"
    manifest = read_manifest(teacher)
    assert manifest["stage"] == "teacher_train" and manifest["metrics"]["steps"] == 2
    assert read_manifest(tmp_path / "run" / "01_distill")["parent"] == str(teacher)
    # rerun: the teacher is complete with the same keys -> skipped
    again = compress(from_dict(CompressConfig, values))
    assert "00_teacher" in again["run"]["skipped"] and again["run"]["ran"] == []
    assert read_manifest(teacher)["created"] == manifest["created"]

    # a teacher made by `recsys-slm teacher train` with the same keys is adopted, not retrained
    other = tmp_path / "teacher_cli"
    train_teacher(from_dict(TeacherTrainConfig, {**_teacher_keys(teacher_dir), "out": str(other),
                                                 "data_dir": str(tiny_data_dir)}))  # fmt: skip
    created = read_manifest(other)["created"]
    identity = model_identity(str(other))
    adopted = compress(from_dict(CompressConfig, {**values, "teacher": str(other), "out": str(tmp_path / "run2")}))
    assert "00_teacher" in adopted["run"]["skipped"] and read_manifest(other)["created"] == created
    assert read_manifest(other)["compress"]["adopted"] is True
    assert model_identity(str(other)) == identity  # runs that used this teacher before are not redone

    # ... but one trained with other keys is never overwritten
    changed = {**values, "out": str(tmp_path / "run3"), "teacher_train": {**_teacher_keys(teacher_dir), "lr": 5e-4}}
    with pytest.raises(ConfigError, match=r"teacher_train: .*teacher already holds a teacher trained with other keys \(lr\)"):
        compress(from_dict(CompressConfig, changed))
    assert read_manifest(teacher)["created"] == manifest["created"]


def test_teacher_train_section_errors_and_yaml(tiny_data_dir, tmp_path):
    base = _config(tmp_path / "t", tiny_data_dir, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ConfigError, match="teacher_train.lr"):
        from_dict(CompressConfig, {**base, "teacher_train": {"lr": -1}})
    with pytest.raises(ConfigError, match="teacher_train.bogus"):
        from_dict(CompressConfig, {**base, "teacher_train": {"bogus": 1}})
    with pytest.raises(ConfigError, match="teacher_train.out"):
        from_dict(CompressConfig, {**base, "teacher_train": {"out": str(tmp_path / "elsewhere")}})
    with pytest.raises(ConfigError, match="'teacher_train.config': file nope.yaml does not exist"):
        from_dict(CompressConfig, {**base, "teacher_train": {"config": "nope.yaml"}})
    # the shipped teacher YAML, found relative to the repository root, overridden by the section's keys
    cfg = from_dict(CompressConfig, {**base, "teacher": "", "teacher_train": {
        "config": "pipelines/configs/teacher/smollm2_movielens.yaml", "max_steps": 7}})  # fmt: skip
    assert cfg.teacher_train["max_steps"] == 7 and cfg.teacher_train["freeze_layers"] == 20
    assert cfg.teacher.endswith("runs/teacher/smollm2-135m-instruct") and cfg.teacher_train["out"] == cfg.teacher
    # a saved compress_config.yaml (out / data_dir filled in) loads back unchanged
    again = from_dict(CompressConfig, {**base, "teacher": cfg.teacher, "teacher_train": cfg.teacher_train})
    assert again.teacher_train == cfg.teacher_train


def test_default_data_is_prepared_only_when_missing(tiny_data_dir, tmp_path, monkeypatch):
    """data_dir unset: the default MovieLens-100K directory is prepared when absent (here: the call is recorded, not
    run: preparing needs the PyPI download), left alone when it holds prepared tasks; a given data_dir is never
    written."""
    import shutil

    from recsys_slm.compress import pipeline
    from recsys_slm.data import prepare

    monkeypatch.setenv("RECSYS_SLM_HOME", str(tmp_path / "home"))
    calls = []
    monkeypatch.setattr(prepare, "prepare_dataset", lambda cfg: calls.append(cfg.resolved_out()))
    values = _config(tmp_path / "t", tiny_data_dir, tmp_path / "run", tmp_path / "cache")
    pipeline._Run(from_dict(CompressConfig, {**values, "data_dir": None}), None).ensure_default_data()
    assert calls == [tmp_path / "home" / "data" / "movielens-100k"]
    shutil.copytree(tiny_data_dir, tmp_path / "home" / "data" / "movielens-100k")  # prepared by the user
    pipeline._Run(from_dict(CompressConfig, {**values, "data_dir": None}), None).ensure_default_data()
    pipeline._Run(from_dict(CompressConfig, values), None).ensure_default_data()
    assert len(calls) == 1


def test_auc_intervals_say_why_they_are_missing(tmp_path):
    import pandas as pd

    from recsys_slm.compress.report import auc_intervals

    for name, labels in (("teacher", [1, 0, 1, 0]), ("redistill", [1, 0, 1, 0]), ("other", [0, 0, 1, 1])):
        (tmp_path / name / "pointwise").mkdir(parents=True)
        pd.DataFrame({"user_id": ["a", "a", "b", "b"], "label": labels, "score": [0.9, 0.1, 0.8, 0.2]}).to_parquet(
            tmp_path / name / "pointwise" / "predictions.parquet"
        )
    dirs = {n: tmp_path / n for n in ("teacher", "redistill", "other", "gone")}
    got = auc_intervals(dirs, "redistill", "teacher", ["gone"], 100)
    assert got == {"unavailable": f"{tmp_path / 'gone' / 'pointwise' / 'predictions.parquet'} is missing"}
    got = auc_intervals(dirs, "redistill", "teacher", ["other"], 100)
    assert got == {"unavailable": "other's pointwise records differ from redistill's"}
    assert auc_intervals(dirs, "redistill", "teacher", [], 100)["teacher"]["ratio"] == 1.0
