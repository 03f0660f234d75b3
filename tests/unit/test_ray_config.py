"""The ``backend`` / ``ray.*`` keys and the data-parallel loop seam, without starting Ray (fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_slm.cli import main
from recsys_slm.config import ConfigError
from recsys_slm.distill.trainer import DistillConfig
from recsys_slm.distributed.config import RayConfig, load_with_backend
from recsys_slm.distributed.session import _short_path
from recsys_slm.distributed.train import RayLoopHooks, _buckets


def test_backend_and_ray_keys_are_split_off(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher: t\nbackend: ray\nray:\n  workers: 3\n  cpus_per_worker: 0.5\n")
    cfg, ray_cfg = load_with_backend(DistillConfig, cfg_file, ["ray.max_failures=2", "lr=1e-3"])
    assert isinstance(cfg, DistillConfig) and cfg.lr == 1e-3
    assert ray_cfg == RayConfig(workers=3, cpus_per_worker=0.5, max_failures=2)
    assert ray_cfg.backend_name() == "gloo" and RayConfig(use_gpu=True).backend_name() == "nccl"
    cfg, ray_cfg = load_with_backend(DistillConfig, None, ["teacher=t"])
    assert ray_cfg is None


def test_backend_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'backend'.*'spark'"):
        load_with_backend(DistillConfig, None, ["teacher=t", "backend=spark"])
    with pytest.raises(ConfigError, match=r"ray\.workers.*need backend=ray"):
        load_with_backend(DistillConfig, None, ["teacher=t", "ray.workers=2"])
    with pytest.raises(ConfigError, match=r"ray\.workers': must be >= 1"):
        load_with_backend(DistillConfig, None, ["teacher=t", "backend=ray", "ray.workers=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'ray\.nodes'"):
        load_with_backend(DistillConfig, None, ["teacher=t", "backend=ray", "ray.nodes=2"])
    with pytest.raises(ConfigError, match=r"ray\.comm.*nccl needs GPUs"):
        load_with_backend(DistillConfig, None, ["teacher=t", "backend=ray", "ray.comm=nccl"])
    with pytest.raises(ConfigError, match=r"ray\.object_store_mb': must be >= 75"):
        load_with_backend(DistillConfig, None, ["teacher=t", "backend=ray", "ray.object_store_mb=10"])


def test_ingesting_scorer_defaults_its_task_next_to_out():
    from recsys_slm.distill.teacher_cache import TeacherScoreConfig

    cfg, ray_cfg = load_with_backend(
        TeacherScoreConfig,
        None,
        ["model=m", "out=/x/cache.parquet", "backend=ray", "ray.interactions=[s3://b/logs]"],
    )
    assert str(cfg.task) == "/x/cache.parquet.records" and ray_cfg.interactions == ["s3://b/logs"]


def test_cli_rejects_bad_backend_keys_with_status_2(capsys):
    assert main(["distill", "--backend", "ray", "teacher=t", "ray.cpus_per_worker=0"]) == 2
    assert "cpus_per_worker" in capsys.readouterr().err


def test_hooks_shard_the_global_batch_by_rank(tmp_path):
    batch = np.arange(7)
    shards = [RayLoopHooks(r, 3, tmp_path, report=False).shard(batch) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]
    single = RayLoopHooks(0, 1, tmp_path, report=False)
    assert single.shard(batch).tolist() == list(range(7)) and single.is_main
    assert single.evaluate(lambda: {"val_auc": 0.5}) == {"val_auc": 0.5}  # no process group: runs locally
    params = [torch.nn.Parameter(torch.ones(2))]
    assert single.sync(params, 1.5, {"kd": 2.0}) == (1.5, {"kd": 2.0})


def test_gradient_buckets_cover_every_tensor_once():
    tensors = [torch.zeros(2**20), torch.zeros(3), torch.zeros(2**23), torch.zeros(5)]
    buckets = _buckets(tensors)
    assert [t for b in buckets for t in b] == tensors and len(buckets) == 2


def test_deep_tmp_dirs_reach_ray_through_a_short_symlink(tmp_path):
    short, link = _short_path(Path("/tmp/r/tmp"))
    assert link is None and short == Path("/tmp/r/tmp")
    deep = tmp_path / ("d" * 80) / "tmp"
    deep.mkdir(parents=True)
    short, link = _short_path(deep)
    try:
        assert link is not None and short.resolve() == deep.resolve() and len(str(short)) < 40
    finally:
        link.unlink()
