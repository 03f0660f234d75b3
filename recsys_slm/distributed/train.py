"""``recsys-slm distill ... backend=ray``: the single-process distillation run data-parallel under Ray Train.

There is one training implementation. Every Ray Train worker (a ``TorchTrainer`` with ``ray.workers`` workers,
gloo on CPU / NCCL on GPU) calls :func:`recsys_slm.distill.trainer.distill` itself, with a
:class:`RayLoopHooks` passed down to :func:`recsys_slm.training.loop.run_loop`:

* **data parallel, same global batch**: every rank computes the same epoch order (a pure function of the seed);
  each global micro-batch of ``batch_size`` records is split by rank (``batch[rank::workers]``); the loop divides
  each rank's summed loss by the *global* record count, and :meth:`RayLoopHooks.sync` all-reduces (sums) the
  gradients before clipping. Each step's gradient is therefore the single-process step's gradient (up to float
  summation order), and so are the learning-rate schedule, the clipping and the AdamW update: same
  ``batch_size``/``grad_accum``/``seed`` ⇒ the same model as one process. This is what
  ``DistributedDataParallel`` computes; the loop's forwards call the model's submodules directly (the answer
  position's hidden state, the verbalizer rows), so the reduction is done explicitly (bucketed ``all_reduce``)
  instead of through DDP's forward wrapper, and rank 0's weights are broadcast before the first step as DDP does.
* **validation** runs on rank 0 and its result is broadcast (every rank takes the same early-stopping and
  best-step decisions); rank 0 alone writes ``out`` (the test evaluation and the model directory).
* **checkpoints** are the loop's own (``<out>.work``): after each one rank 0 reports that directory through
  ``ray.train.report`` (persisted under ``ray.storage_path``); the other ranks report without a checkpoint and keep
  their scratch work directories under ``ray.scratch_dir``. When a worker dies, Ray Train (``FailureConfig``)
  replaces the worker group and every rank restores the last reported checkpoint into its work directory, where
  ``run_loop`` resumes it exactly as a single-process restart does. Rerunning the same command continues a
  killed run (same run name and storage); a single-process ``<out>.work`` checkpoint is resumed too.

Exact equivalence holds for objectives that are sums over records (sft, binary_kl, and the token losses
without masking); on-policy sampling draws per rank, so it matches in distribution only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_slm.distributed.config import RayConfig
from recsys_slm.training.loop import CHECKPOINT_DIR, LoopHooks

logger = logging.getLogger(__name__)

DEFAULT_RUN_NAME = "distill"
_BUCKET_BYTES = 32 * 2**20  # gradient all-reduce buckets (DDP's default is 25 MiB)
SUMMARY_FILE = "summary.json"


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, current, size = [], [], 0
    for t in tensors:
        current.append(t)
        size += t.numel() * t.element_size()
        if size >= _BUCKET_BYTES:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` in place across the process group (flattened into buckets, one collective each)."""
    import torch.distributed as dist

    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` to every rank (bucketed)."""
    import torch.distributed as dist

    for bucket in _buckets(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


class RayLoopHooks(LoopHooks):
    """The :class:`~recsys_slm.training.loop.LoopHooks` of one Ray Train rank (see the module docstring).

    Args:
        rank / world (int): this rank and the number of ranks.
        work (Path): this rank's work directory.
        restored_step (int): the step of the checkpoint this attempt resumed (0 = a fresh start).
        fault (dict | None): test hook ``{"rank": r, "after_step": k}``: rank r SIGKILLs its own process during
            step k + 1, once Ray Train has registered the step-k checkpoint (``checkpoint_every`` must divide k).
        report (bool): report checkpoints through ``ray.train.report`` (False outside Ray Train).
    """

    def __init__(self, rank: int, world: int, work: Path, restored_step: int = 0, fault: dict | None = None,
                 report: bool = True) -> None:  # fmt: skip
        self.rank, self.world, self.work, self.is_main = rank, world, Path(work), rank == 0
        self.step = restored_step
        self.fault = fault
        self.report = report
        self.records = 0  # global records of the steps run by this attempt (counted on every rank)
        self.first_step_at: float | None = None
        self.reports = 0

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def start(self, model: torch.nn.Module) -> None:
        self.first_step_at = time.time()
        if self._distributed():
            broadcast_([p for p in model.parameters() if p.requires_grad], src=0)

    def shard(self, batch: np.ndarray) -> np.ndarray:
        self.records += len(batch)
        return batch[self.rank :: self.world]

    def sync(
        self, params: list[torch.nn.Parameter], loss: float, extra: dict[str, float]
    ) -> tuple[float, dict]:
        import torch.distributed as dist

        self.step += 1
        if self._distributed():
            # A parameter no rank touched keeps grad None (AdamW skips it, as in one process); one that only
            # other ranks touched (this rank had no records in the step) joins the sum with zeros.
            used = torch.tensor(
                [p.grad is not None for p in params], dtype=torch.int32, device=params[0].device
            )
            dist.all_reduce(used)
            reduced = []
            for p, flag in zip(params, used.tolist(), strict=True):
                if flag:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    reduced.append(p.grad)
            all_reduce_(reduced)
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (loss, extra))
            loss = float(sum(g[0] for g in gathered))
            extra = {}
            for _, part in gathered:
                for key, value in part.items():
                    extra[key] = extra.get(key, 0.0) + float(value)
        if self.fault and self.rank == self.fault["rank"] and self.step == self.fault["after_step"] + 1:
            if self.report:  # let Ray Train register the step-k checkpoint first (its reports are per rank)
                import ray.train

                ray.train.get_all_reported_checkpoints(timeout_s=120)
            logger.warning("fault injection: rank %d kills its own process (pid %d) in step %d", self.rank,
                           os.getpid(), self.step)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)
        return loss, extra

    def evaluate(self, fn):
        import torch.distributed as dist

        if not self._distributed():
            return fn()
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def checkpointed(self, work: Path, state) -> None:
        if not self.report:
            return
        import ray.train

        metrics = {"step": state.step, "best_val_auc": state.best_val_auc, "best_step": state.best_step}
        checkpoint = ray.train.Checkpoint.from_directory(str(work)) if self.is_main else None
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)
        self.reports += 1


def _restore(checkpoint, work: Path, main: bool) -> dict[str, Any]:
    """Put the reported checkpoint into this rank's work directory (none: start clean).

    Returns:
        dict: ``step`` and ``train_s`` of the restored state (0 for a fresh start), or ``summary`` when the run
        had already finished.
    """
    from recsys_slm.ranker.checkpoint import read_checkpoint_info

    if checkpoint is None:
        shutil.rmtree(work, ignore_errors=True)  # a stale local checkpoint would desynchronise the ranks
        return {"step": 0, "train_s": 0.0}
    with checkpoint.as_directory() as d:
        src = Path(d)
        if (src / SUMMARY_FILE).is_file():
            return {"summary": json.loads((src / SUMMARY_FILE).read_text())}
        info = read_checkpoint_info(src / CHECKPOINT_DIR)
        if info is None:
            raise RuntimeError(f"Ray checkpoint {checkpoint.path} holds no {CHECKPOINT_DIR}/")
        if src.resolve() != work.resolve():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            names = [p.name for p in src.iterdir()] if main else [CHECKPOINT_DIR]
            for name in names:
                if (src / name).is_dir():
                    shutil.copytree(src / name, work / name)
                elif (src / name).is_file():
                    shutil.copyfile(src / name, work / name)
    return {"step": int(info["state"]["step"]), "train_s": float(info["state"]["train_s"])}


def _train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train rank: ``distill`` with :class:`RayLoopHooks`; rank 0 returns the run summary."""
    import ray
    import ray.train
    from ray.train.torch import get_device

    from recsys_slm.distill.trainer import distill
    from recsys_slm.training.loop import work_dir

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])  # relative paths in the config mean what they meant on the driver
    torch.set_num_threads(config["threads"])
    device = get_device()
    cfg = replace(config["cfg"], device=str(device) if device.type == "cuda" else "cpu", progress=False)
    out = cfg.resolved_out().expanduser().resolve()
    work = work_dir(out) if rank == 0 else Path(config["scratch"]) / f"rank-{rank}.work"
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("initial_checkpoint"):  # a single-process run's <out>.work
        checkpoint = ray.train.Checkpoint.from_directory(config["initial_checkpoint"])
    restored = _restore(checkpoint, work, main=rank == 0)
    if "summary" in restored:  # finished before a late failure: nothing left to do
        return restored["summary"] if rank == 0 else None
    hooks = RayLoopHooks(
        rank, world, work, restored["step"], config.get("fault") if not restored["step"] else None
    )
    summary = distill(cfg, hooks=hooks)
    node = ray.get_runtime_context().get_node_id()
    checkpoint, staging = None, None
    if rank == 0:
        summary = {**summary, "ray_worker": {
            "first_step_at": hooks.first_step_at, "records": hooks.records, "restored_step": restored["step"],
            "restored_train_s": restored["train_s"], "world": world, "node": node,
            "model_in_checkpoint": node != config["driver_node"],
        }}  # fmt: skip
        staging = Path(config["scratch"]) / "final"  # under the run dir, not the system temp dir
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, default=str))
        if node != config["driver_node"]:  # the driver cannot see this node's disk: ship the model
            shutil.copytree(out, staging / "model")
        checkpoint = ray.train.Checkpoint.from_directory(str(staging))
    else:
        if not cfg.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    ray.train.report({"done": True, "step": summary["steps"]}, checkpoint=checkpoint)
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return summary if rank == 0 else None


def _local_path(storage: str) -> Path | None:
    """The local directory of a storage path (None for a URI such as ``s3://``)."""
    if "://" in storage and not storage.startswith("file://"):
        return None
    return Path(storage.removeprefix("file://")).expanduser().resolve()


def _preflight(cfg) -> None:
    """Cheap checks on the driver, before Ray starts (a failing worker would be restarted ``max_failures`` times)."""
    for key in ("teacher_cache", "transfer_set"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).expanduser().is_file():
            raise FileNotFoundError(f"{key} {value} not found")
    data_dir = cfg.resolved_data_dir()
    if not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} not found (prepare it with `recsys-slm data prepare`)")


def distill_ray(cfg, ray_cfg: RayConfig, fault: dict | None = None) -> dict[str, Any]:
    """Run :func:`recsys_slm.distill.trainer.distill` data-parallel with Ray Train (see the module docstring).

    Args:
        cfg (DistillConfig): the same config a single-process run takes.
        ray_cfg (RayConfig): workers, CPUs/GPU per worker, failures, storage, cluster address.
        fault (dict | None): test hook, see :class:`RayLoopHooks`.

    Returns:
        dict: the single-process summary (manifest metrics, ``out``) plus ``ray``: workers, address,
        ``ray_init_s``, ``fit_s``, ``startup_s`` (``fit()`` call to rank 0's first optimizer step: worker start,
        process group, model and data setup), ``samples_per_s`` (records per second of optimizer steps),
        ``restored_from_step``.

    Raises:
        RayResourceError: the workers cannot fit the cluster.
        ConfigError / ValueError / FileNotFoundError: as the single-process run (re-raised from the worker).
        RuntimeError: training failed more than ``ray.max_failures`` times.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys_slm.distributed.session import check_fits, ray_session, unwrap_ray_error
    from recsys_slm.model_dir import MANIFEST_NAME, read_manifest, write_json_atomic
    from recsys_slm.training.loop import work_dir

    _preflight(cfg)
    out = cfg.resolved_out().expanduser().resolve()
    run_dir = out.parent / f"{out.name}.ray"
    storage = ray_cfg.storage_path or str(run_dir / "storage")
    name = ray_cfg.name or DEFAULT_RUN_NAME
    scratch = Path(ray_cfg.scratch_dir or run_dir / "workers").expanduser().resolve()
    local_storage = _local_path(storage)
    run_path = local_storage / name if local_storage is not None else None
    with ray_session(ray_cfg, run_dir) as session:
        gpus = 1.0 if ray_cfg.use_gpu else 0.0
        check_fits("training workers", ray_cfg.workers, ray_cfg.cpus_per_worker, gpus,
                   "ray.workers / ray.cpus_per_worker")  # fmt: skip
        if run_path is not None and not cfg.resume:
            shutil.rmtree(run_path, ignore_errors=True)
        initial = None  # a checkpoint of a single-process run, resumed when this Ray run has none of its own
        local_ckpt = work_dir(out) / CHECKPOINT_DIR / "state.json"
        if cfg.resume and (run_path is None or not run_path.exists()) and local_ckpt.is_file():
            initial = str(work_dir(out))
        resources = {"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1.0} if ray_cfg.use_gpu else {})}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "cfg": cfg, "cwd": os.getcwd(), "scratch": str(scratch), "fault": fault,
                "threads": ray_cfg.threads or max(1, int(ray_cfg.cpus_per_worker)),
                "driver_node": ray.get_runtime_context().get_node_id(),
                "initial_checkpoint": initial,
            },
            torch_config=TorchConfig(backend=ray_cfg.backend_name()),
            scaling_config=ray.train.ScalingConfig(
                num_workers=ray_cfg.workers, use_gpu=ray_cfg.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(local_storage) if local_storage is not None else storage,
                failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures, controller_failure_limit=3),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )  # fmt: skip
        fit_start = time.time()
        sigint = signal.getsignal(signal.SIGINT)  # fit() installs its own handler (Ctrl-C aborts the run)
        try:
            result = trainer.fit()
        except Exception as exc:
            err = unwrap_ray_error(exc)
            if type(err).__module__.startswith("ray."):
                raise RuntimeError(
                    f"Ray Train failed (ray.max_failures={ray_cfg.max_failures} restarts allowed): {err}"
                ) from exc
            raise err from None
        finally:
            signal.signal(signal.SIGINT, sigint)
        fit_s = time.time() - fit_start
        summary = result.return_value
        if not isinstance(summary, dict):  # Ctrl-C: Ray aborted the run; its checkpoints stay for a rerun
            raise KeyboardInterrupt(f"Ray Train run {storage}/{name} aborted before it finished")
        worker = summary.pop("ray_worker")
        if worker["model_in_checkpoint"] and result.checkpoint is not None:
            from recsys_slm.model_dir import atomic_dir

            with result.checkpoint.as_directory() as d, atomic_dir(out) as tmp:
                shutil.copytree(Path(d) / "model", tmp, dirs_exist_ok=True)
        loop_s = summary["train_time_s"] - worker["restored_train_s"]
        ray_stats = {
            "workers": worker["world"],
            "cpus_per_worker": ray_cfg.cpus_per_worker,
            "use_gpu": ray_cfg.use_gpu,
            "comm": ray_cfg.backend_name(),
            "address": session.address,
            "ray_init_s": session.init_s,
            "fit_s": round(fit_s, 2),
            "startup_s": round(worker["first_step_at"] - fit_start, 2),
            "samples_per_s": round(worker["records"] / loop_s, 3) if loop_s > 0 else None,
            "restored_from_step": worker["restored_step"],
            "global_batch": cfg.batch_size * cfg.grad_accum,
            "storage": f"{storage}/{name}",
        }
    manifest = read_manifest(out)
    if manifest is not None:
        manifest.setdefault("metrics", {})["ray"] = ray_stats
        write_json_atomic(out / MANIFEST_NAME, manifest)
    if not cfg.keep_checkpoints:
        if run_path is not None:
            shutil.rmtree(run_path, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if session.started and session.tmp_dir is not None:
            shutil.rmtree(session.tmp_dir, ignore_errors=True)
        for d in (local_storage, run_dir):
            if d is not None and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return {**summary, "ray": ray_stats}
